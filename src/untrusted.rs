//! Text that a client chose (a username, a recipient, a command, a PROXY header), made safe to
//! put in a log line: at most [`MAX_CHARS`] characters, control characters, quotes and
//! backslashes escaped, so that 8 KB of anything can neither forge a log line (a newline, an
//! ANSI escape) nor flood the log.
//!
//! ```
//! use director::untrusted::shown;
//! assert_eq!(shown("bob\r\n* OK").to_string(), r"bob\r\n* OK");
//! ```

use std::fmt;

/// The most characters of one untrusted value a log line shows.
pub const MAX_CHARS: usize = 64;

/// Displays untrusted text truncated and escaped. Build it with [`shown`] or [`shown_bytes`].
#[derive(Clone, Copy)]
pub struct Shown<'a> {
    text: ShownText<'a>,
}

#[derive(Clone, Copy)]
enum ShownText<'a> {
    Str(&'a str),
    Bytes(&'a [u8]),
}

/// Whether [`shown`] writes `text` as it is: short printable ASCII with no quote nor
/// backslash (most names).
pub fn is_plain(text: &str) -> bool {
    text.len() <= MAX_CHARS
        && text
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\\' && b != b'"')
}

/// `text`, truncated and escaped for a log line.
pub fn shown(text: &str) -> Shown<'_> {
    Shown {
        text: ShownText::Str(text),
    }
}

/// Bytes that may not be UTF-8 (a raw command line), truncated and escaped for a log line.
pub fn shown_bytes(bytes: &[u8]) -> Shown<'_> {
    Shown {
        text: ShownText::Bytes(bytes),
    }
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.text {
            // Most names: short printable ASCII, written as they are.
            ShownText::Str(s) if is_plain(s) => f.write_str(s),
            ShownText::Str(s) => {
                let cut = s.char_indices().nth(MAX_CHARS).map(|(i, _)| i);
                let head = &s[..cut.unwrap_or(s.len())];
                // Runs of characters that need no escape are written whole.
                let mut plain = 0;
                for (i, c) in head.char_indices() {
                    if needs_escape(c) {
                        f.write_str(&head[plain..i])?;
                        write_char(f, c)?;
                        plain = i + c.len_utf8();
                    }
                }
                f.write_str(&head[plain..])?;
                if let Some(at) = cut {
                    write!(f, "...(+{} bytes)", s.len() - at)?;
                }
                Ok(())
            }
            ShownText::Bytes(b) => {
                for &byte in b.iter().take(MAX_CHARS) {
                    if byte.is_ascii() {
                        write_char(f, byte as char)?;
                    } else {
                        write!(f, "\\x{byte:02x}")?;
                    }
                }
                if b.len() > MAX_CHARS {
                    write!(f, "...(+{} bytes)", b.len() - MAX_CHARS)?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Whether `bytes` (UTF-8) may hold a control character: C0 or DEL, or a C1 character (its
/// first byte is 0xC2, which U+00A0-U+00BF share: those give a false "maybe"). No early exit,
/// so that the compiler checks many bytes at once: text without any is the usual case, a
/// reply or log line is checked whole, and the exact (slower) pass runs only on a "maybe".
pub fn may_hold_controls(bytes: &[u8]) -> bool {
    bytes.chunks(64).any(|chunk| {
        chunk.iter().fold(false, |any, &b| {
            any | (b < 0x20) | (b == 0x7f) | (b == 0xc2)
        })
    })
}

/// Whether `c` is written other than as itself.
fn needs_escape(c: char) -> bool {
    matches!(c, '\\' | '"') || c.is_control() || is_invisible(c)
}

fn write_char(f: &mut fmt::Formatter<'_>, c: char) -> fmt::Result {
    match c {
        '\\' => f.write_str("\\\\"),
        '"' => f.write_str("\\\""),
        '\n' => f.write_str("\\n"),
        '\r' => f.write_str("\\r"),
        '\t' => f.write_str("\\t"),
        c if c.is_control() || is_invisible(c) => write!(f, "\\u{{{:x}}}", c as u32),
        c => fmt::Write::write_char(f, c),
    }
}

/// Characters that change how a line reads without being control characters: bidi overrides
/// and isolates, zero-width characters, line and paragraph separators.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_noticed_wherever_they_are() {
        assert!(!may_hold_controls(
            "plain text, ünïcode and ~".repeat(20).as_bytes()
        ));
        for control in [
            "\n", "\r", "\t", "\u{1b}", "\u{7f}", "\u{85}", "\u{9f}", "\0",
        ] {
            for at in [0, 63, 64, 130] {
                let mut text = "x".repeat(200);
                text.insert_str(at, control);
                assert!(may_hold_controls(text.as_bytes()), "{control:?} at {at}");
            }
        }
    }

    #[test]
    fn control_characters_quotes_and_backslashes_are_escaped() {
        assert_eq!(
            shown("a\r\nb\t\"c\"\\\u{1b}[31m").to_string(),
            "a\\r\\nb\\t\\\"c\\\"\\\\\\u{1b}[31m"
        );
        assert_eq!(shown("evil\u{202e}txt").to_string(), "evil\\u{202e}txt");
        assert_eq!(shown("jörg@example.com").to_string(), "jörg@example.com");
    }

    #[test]
    fn long_text_is_cut_with_the_count_of_what_was_left_out() {
        let long = "u".repeat(8000);
        let s = shown(&long).to_string();
        assert!(s.starts_with(&"u".repeat(MAX_CHARS)));
        assert!(s.ends_with(&format!("...(+{} bytes)", 8000 - MAX_CHARS)));
        assert!(s.len() < 100);
        // Exactly MAX_CHARS is shown whole.
        let exact = "x".repeat(MAX_CHARS);
        assert_eq!(shown(&exact).to_string(), exact);
        // Multi-byte characters are counted as characters and never cut in half.
        let wide = "é".repeat(MAX_CHARS + 1);
        assert!(shown(&wide).to_string().ends_with("...(+2 bytes)"));
    }

    #[test]
    fn bytes_that_are_not_utf8_are_shown_as_hex() {
        assert_eq!(
            shown_bytes(b"a\xff\r\n").to_string(),
            "a\\xff\\r\\n".to_string()
        );
        let long = vec![b'z'; 100];
        assert!(shown_bytes(&long).to_string().ends_with("...(+36 bytes)"));
    }

    #[test]
    fn debug_quotes_the_value() {
        assert_eq!(format!("{:?}", shown("a\nb")), "\"a\\nb\"");
    }
}

//! Replays the fuzzing seeds (`fuzz/seeds/<target>/`) and every input the fuzzer found a bug
//! with (`fuzz/regressions/<target>/`) through the same checks the fuzzer runs
//! (`director::fuzz_targets`), in an ordinary `cargo test`: no nightly, no cargo-fuzz.

use std::path::{Path, PathBuf};

/// A fuzz target: panics when the input breaks a property.
type Target = fn(&[u8]);

/// Every fuzz target, by the name of its directories and of its `fuzz/fuzz_targets/` file.
const TARGETS: &[(&str, Target)] = &[
    ("imap_command", director::fuzz_targets::imap_command),
    ("pop3_command", director::fuzz_targets::pop3_command),
    ("sieve_command", director::fuzz_targets::sieve_command),
    ("lmtp_command", director::fuzz_targets::lmtp_command),
    ("proxy_header", director::fuzz_targets::proxy_header),
    ("sasl", director::fuzz_targets::sasl),
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs one target over every file of `kind` (`seeds` or `regressions`); returns how many.
fn replay(kind: &str, target: &str, check: Target) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let files = files(&dir);
    for file in &files {
        let data = std::fs::read(file).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target} fails on {} (see the panic above)",
            file.display()
        );
    }
    files.len()
}

#[test]
fn every_target_has_seeds_and_passes_them() {
    for (target, check) in TARGETS {
        let n = replay("seeds", target, *check);
        assert!(
            n >= 4,
            "fuzz/seeds/{target}/ has {n} files, expected a handful"
        );
    }
}

#[test]
fn every_regression_still_passes() {
    for (target, check) in TARGETS {
        replay("regressions", target, *check);
    }
}

#[test]
fn every_target_has_a_fuzz_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (target, _) in TARGETS {
        let source = root.join("fuzz_targets").join(format!("{target}.rs"));
        let code = std::fs::read_to_string(&source).expect("a fuzz target file per target");
        assert!(
            code.contains(&format!("director::fuzz_targets::{target}(")),
            "{} does not call director::fuzz_targets::{target}",
            source.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "fuzz/Cargo.toml has no [[bin]] {target}"
        );
    }
}

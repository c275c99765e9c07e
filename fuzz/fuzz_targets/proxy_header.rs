#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    director::fuzz_targets::proxy_header(data);
});

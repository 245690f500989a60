//! `cargo +nightly fuzz run parse_line` from parser/: the line parsers never panic, and the
//! SWAR fast path agrees with the careful parser on every line it accepts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tally_engine::check_line_parsers(data);
});

//! Fuzz target `manifest`: see `bellows_tests::fuzz::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bellows_tests::fuzz::manifest::run(data, bellows_tests::fuzz::process_scratch());
});

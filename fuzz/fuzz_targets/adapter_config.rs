//! Fuzz target `adapter_config`: see `bellows_tests::fuzz::adapter_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bellows_tests::fuzz::adapter_config::run(data, bellows_tests::fuzz::process_scratch());
});

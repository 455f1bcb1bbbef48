//! Fuzz target `store_frame`: see `bellows_tests::fuzz::store_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bellows_tests::fuzz::store_frame::run(data, bellows_tests::fuzz::process_scratch());
});

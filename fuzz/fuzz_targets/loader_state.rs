//! Fuzz target `loader_state`: see `bellows_tests::fuzz::loader_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bellows_tests::fuzz::loader_state::run(data, bellows_tests::fuzz::process_scratch());
});

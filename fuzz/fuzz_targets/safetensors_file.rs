//! Fuzz target `safetensors_file`: see `bellows_tests::fuzz::safetensors_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bellows_tests::fuzz::safetensors_file::run(data, bellows_tests::fuzz::process_scratch());
});

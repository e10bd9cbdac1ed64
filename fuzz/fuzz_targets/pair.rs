//! `cargo +nightly fuzz run pair`: see fuzz/README.md and `nowconnect_core::fuzzing::pair`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nowconnect_core::fuzzing::pair(data));

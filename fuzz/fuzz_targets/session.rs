//! `cargo +nightly fuzz run session`: see fuzz/README.md and `nowconnect_core::fuzzing::session`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nowconnect_core::fuzzing::session(data));

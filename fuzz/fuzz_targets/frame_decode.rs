//! `cargo +nightly fuzz run frame_decode`: see fuzz/README.md and `nowconnect_core::fuzzing::frame_decode`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nowconnect_core::fuzzing::frame_decode(data));

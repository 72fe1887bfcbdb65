//! Arbitrary text into `Config::parse`; see `imds_broker_fuzz::config_text`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imds_broker_fuzz::config_text::run(data));

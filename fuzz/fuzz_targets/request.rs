//! A request head built into an `http::Request` and routed; see `imds_broker_fuzz::request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imds_broker_fuzz::request::run(data));

//! Raw bytes through hyper's HTTP/1.1 server and the router; see `imds_broker_fuzz::wire`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imds_broker_fuzz::wire::run(data));

//! Fuzz targets for everything the network and the operator can feed the daemon: HTTP requests
//! (built directly, and as raw bytes through hyper's parser) and config text.
//!
//! The logic lives here, not in the cargo-fuzz binaries, so that `tests/fuzz_corpus_replay.rs`
//! can include this file by path and replay the committed seeds through the very same functions
//! in a plain `cargo test` (CI needs no cargo-fuzz and no libFuzzer).
//!
//! - [`request`]: a request head built into an `http::Request`, sent through `imds::router`.
//! - [`wire`]: raw bytes over an in-memory connection served the way `server.rs` serves TCP.
//! - [`config_text`]: arbitrary text into `Config::parse`, then what `check` and the policy do
//!   with a config that parses.
//!
//! Request inputs start with one byte that picks the [`Case`] (caller, server mode, the address
//! the caller dialled); see [`Case::split`].

pub mod config_text;
pub mod fixture;
pub mod request;
pub mod wire;

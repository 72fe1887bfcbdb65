//! imds-broker: an EC2-IMDS-compatible endpoint that gives each local application short-lived
//! credentials for its own IAM role.
//!
//! The modules form one-way layers, each using only those below it (`tests/layers.rs` holds
//! the order and fails on an import that points up or on a circle):
//!
//! | layer | modules |
//! |---|---|
//! | binary's commands | [`cli`] |
//! | the daemon's wiring and shutdown | [`daemon`] |
//! | listeners | [`server`] |
//! | surfaces | [`imds`], [`container`], [`admin`], [`exec`], [`explain`], [`doctor`] |
//! | what every surface shares | [`state`], [`admit`], [`failure`], [`reload`] |
//! | credentials | [`credentials`] (cache, refresh, STS) |
//! | the daemon's own credentials | [`source`] (chain, Roles Anywhere, a rotated access key) |
//! | tokens and limits | [`token`] (session and container tokens), [`rate_limit`] |
//! | the audit trail | [`audit`] (events, sealed sink) |
//! | which app | [`policy`] |
//! | who is calling | [`identity`] (`sock_diag`, `cgroup`, `process`, `exe_digest`, `netns`, `container`), [`runtime`] (what the container runtime says) |
//! | configuration | [`config`] |
//! | helpers | [`arn`], [`bounded`], [`glob`], [`secret`], [`time`], [`safe_dir`], [`iam`], [`metrics`], [`signal`], [`systemd`], [`shutdown`], [`http_client`] |
//!
//! How a request flows through them:
//! - [`server`] accepts a connection and asks [`identity`] who owns the other end (netlink
//!   `sock_diag`, checked), once per connection.
//! - [`imds`]'s guard layer runs [`admit`] (relayed, browser or foreign-`Host` requests
//!   refused; the caller's rate), then the [`token`] check, then [`policy`] matches the caller
//!   to an `[[app]]` of the [`config`].
//! - [`credentials`] returns that app's cached role credentials, calling STS AssumeRole when
//!   they need renewing; [`audit`] records the issuance; the surface renders the document.
//! - [`container`] serves the same credentials on the ECS-style endpoint, after the same
//!   [`admit`], to callers that present the token the daemon wrote to their app's file.
//! - Failures become statuses in [`failure`].
//! - [`daemon`] wires it all: [`daemon::run`] takes the config, the bound listeners and a
//!   shutdown future, and runs every background task under one [`shutdown`] tree.
//! - [`cli`] is the binary's entry point (one file per subcommand); [`signal`] turns signals
//!   into shutdown, and into a [`reload`] of the config on SIGHUP.

pub mod admin;
pub mod admit;
pub mod arn;
pub mod audit;
pub mod bounded;
pub mod cli;
pub mod config;
pub mod container;
pub mod credentials;
pub mod daemon;
pub mod doctor;
pub mod exec;
pub mod explain;
pub mod failure;
pub mod glob;
pub mod http_client;
pub mod iam;
pub mod identity;
pub mod imds;
pub mod metrics;
pub mod policy;
pub mod rate_limit;
pub mod reload;
pub mod runtime;
pub mod safe_dir;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod signal;
pub mod source;
pub mod state;
pub mod systemd;
pub mod time;
pub mod token;

//! imds-broker: an EC2-IMDS-compatible endpoint that gives each local application short-lived
//! credentials for its own IAM role.
//!
//! How a request flows through the modules:
//! - [`server`] accepts a connection and asks [`identity`] who owns the other end (netlink
//!   [`sock_diag`]), once per connection.
//! - [`imds`] routes the request through its security layers (forwarded-request refusal,
//!   [`token`] check) to the metadata tree or the credential handler.
//! - [`policy`] maps the caller to an `[[app]]` of the [`config`]; [`credentials`] returns that
//!   app's cached role credentials, calling STS AssumeRole when they need renewing.
//! - [`container`] serves the same credentials on the ECS-style container endpoint, to callers
//!   that present the token the daemon wrote to their app's token file.
//! - [`daemon`] wires it all: [`daemon::run`] takes the config, the bound listeners and a
//!   shutdown future, and runs every background task under one [`shutdown`] tree.
//! - [`cli`] is the binary's entry point (one file per subcommand); [`signal`] turns signals
//!   into shutdown, and into a [`reload`] of the config on SIGHUP.

pub mod admin;
pub mod arn;
pub mod audit;
pub mod cli;
pub mod config;
pub mod container;
pub mod credentials;
pub mod daemon;
pub mod exec;
pub mod explain;
pub mod glob;
pub mod iam;
pub mod identity;
pub mod imds;
pub mod metrics;
pub mod policy;
pub mod rate_limit;
pub mod relay;
pub mod reload;
pub mod safe_dir;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod signal;
pub mod state;
pub mod systemd;
pub mod time;
pub mod token;

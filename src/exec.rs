//! `imds-broker exec --app NAME -- CMD...`: runs a command whose AWS SDK finds the app's
//! credentials on the container endpoint, for apps that cannot reach the link-local IMDS
//! address (or that share a uid with others, so the socket owner cannot tell them apart).

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::container::CREDENTIALS_PATH;

pub const FULL_URI: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";
pub const TOKEN_FILE: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";

/// Variables that would make the SDK use other credentials than the endpoint's: static keys
/// come first in every SDK's chain; a relative URI beats the full one (botocore, Rust, Go);
/// the JS SDK prefers an inline token to the file.
pub const CLEARED: [&str; 5] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
];

/// Where the command's SDK gets its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecError {
    #[error("app {0:?} is not in the config")]
    NoSuchApp(String),
    #[error("app {0:?} has no [app.container] section, so it has no token")]
    NoContainer(String),
    #[error("the container endpoint is off (no [container] section)")]
    EndpointOff,
    #[error(
        "the container endpoint listens on port 0 (chosen at start); pass --url with the real port"
    )]
    EphemeralPort,
}

/// The app's endpoint URL (the first `container.listen` address; a wildcard address is reached
/// on loopback) and token file.
pub fn target(config: &Config, app: &str) -> Result<Target, ExecError> {
    let entry = config
        .apps
        .iter()
        .find(|a| a.name == app)
        .ok_or_else(|| ExecError::NoSuchApp(app.to_owned()))?;
    let container = entry
        .container
        .as_ref()
        .ok_or_else(|| ExecError::NoContainer(app.to_owned()))?;
    let listen = config
        .container
        .as_ref()
        .and_then(|c| c.listen.first())
        .ok_or(ExecError::EndpointOff)?;
    if listen.port() == 0 {
        return Err(ExecError::EphemeralPort);
    }
    Ok(Target {
        url: url_for(*listen, app),
        token_file: container.token_file.clone(),
    })
}

fn url_for(listen: SocketAddr, app: &str) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!(
        "http://{}{CREDENTIALS_PATH}/{app}",
        SocketAddr::new(ip, listen.port())
    )
}

/// What the command's environment gets set (besides removing [`CLEARED`]).
pub fn environment(target: &Target) -> [(&'static str, OsString); 2] {
    [
        (FULL_URI, OsString::from(&target.url)),
        (TOKEN_FILE, target.token_file.clone().into_os_string()),
    ]
}

/// Whether this process can read the token file: an early, clear error instead of an SDK's
/// "no credentials" later.
pub fn check_readable(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str) -> Config {
        let text = format!(
            r#"
            [sts]
            region = "us-east-1"
            [container]
            listen = ["{listen}"]
            token_dir = "/run/t"
            [[app]]
            name = "a"
            match = {{ uid = 4242 }}
            role_arn = "arn:aws:iam::111122223333:role/a"
            container = {{}}
            [[app]]
            name = "b"
            match = {{ uid = 4243 }}
            role_arn = "arn:aws:iam::111122223333:role/b"
            "#
        );
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn points_at_the_apps_own_path_and_file() {
        let t = target(&config("169.254.170.23:80"), "a").unwrap();
        assert_eq!(t.url, "http://169.254.170.23:80/v1/credentials/a");
        assert_eq!(t.token_file, PathBuf::from("/run/t/a.token"));
        let set = environment(&t);
        assert_eq!(set[0], (FULL_URI, OsString::from(&t.url)));
        assert!(CLEARED.contains(&"AWS_ACCESS_KEY_ID"));
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        let t = target(&config("0.0.0.0:8023"), "a").unwrap();
        assert_eq!(t.url, "http://127.0.0.1:8023/v1/credentials/a");
        let t = target(&config("[::]:8023"), "a").unwrap();
        assert_eq!(t.url, "http://[::1]:8023/v1/credentials/a");
    }

    #[test]
    fn refuses_what_cannot_work() {
        let c = config("127.0.0.1:8023");
        assert_eq!(target(&c, "b"), Err(ExecError::NoContainer("b".into())));
        assert_eq!(target(&c, "zz"), Err(ExecError::NoSuchApp("zz".into())));
        assert_eq!(
            target(&config("127.0.0.1:0"), "a"),
            Err(ExecError::EphemeralPort)
        );
    }
}

//! Guards against the daemon using itself as its own source of credentials: if the aws-config
//! default chain would end at IMDS on an address this daemon serves, it would hand out
//! credentials derived from its own output, so start-up is refused.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

const DEFAULT_IMDS_V4: &str = "http://169.254.169.254";
const DEFAULT_IMDS_V6: &str = "http://[fd00:ec2::254]";

#[derive(Debug, thiserror::Error)]
#[error(
    "the daemon's own source-credential chain would read IMDS at {endpoint}, which this daemon \
     serves on {listen}: it would issue credentials derived from itself. Give the daemon source \
     credentials through its environment, a profile, web identity or a container endpoint, and \
     set AWS_EC2_METADATA_DISABLED=true (or point AWS_EC2_METADATA_SERVICE_ENDPOINT at the real \
     IMDS)"
)]
pub struct SelfLoopError {
    pub endpoint: String,
    pub listen: SocketAddr,
}

/// Setting lookup as aws-config sees it: environment first, then the selected profile.
pub trait Settings {
    fn env(&self, key: &str) -> Option<String>;
    fn profile(&self, key: &str) -> Option<String>;
}

/// Checks the IMDS endpoint the default chain would use against the daemon's listen addresses.
pub fn check_not_own_source(
    settings: &dyn Settings,
    listen: &[SocketAddr],
) -> Result<(), SelfLoopError> {
    let disabled = settings
        .env("AWS_EC2_METADATA_DISABLED")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if disabled {
        return Ok(());
    }
    let endpoint = settings
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .or_else(|| settings.profile("ec2_metadata_service_endpoint"))
        .unwrap_or_else(|| {
            let mode = settings
                .env("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE")
                .or_else(|| settings.profile("ec2_metadata_service_endpoint_mode"));
            if mode.is_some_and(|m| m.eq_ignore_ascii_case("ipv6")) {
                DEFAULT_IMDS_V6.into()
            } else {
                DEFAULT_IMDS_V4.into()
            }
        });
    let targets = endpoint_addrs(&endpoint);
    for &l in listen {
        let hit = targets.iter().any(|t| {
            *t == l || (l.ip().is_unspecified() && l.port() == t.port() && is_local_ip(t.ip()))
        });
        if hit {
            return Err(SelfLoopError {
                endpoint,
                listen: l,
            });
        }
    }
    Ok(())
}

/// The socket addresses an `http(s)://host[:port][/path]` endpoint resolves to.
fn endpoint_addrs(endpoint: &str) -> Vec<SocketAddr> {
    let (rest, default_port) = if let Some(r) = endpoint.strip_prefix("http://") {
        (r, 80)
    } else if let Some(r) = endpoint.strip_prefix("https://") {
        (r, 443)
    } else {
        return Vec::new();
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p))
            if !h.ends_with(':') && p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() =>
        {
            (h, p.parse().unwrap_or(default_port))
        }
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![SocketAddr::new(ip, port)];
    }
    (host, port)
        .to_socket_addrs()
        .map(|it| it.collect())
        .unwrap_or_default()
}

/// Whether `ip` is assigned to this host: binding to it succeeds only then. Sends nothing.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The real process environment and aws-config's selected profile.
pub struct ProcessSettings {
    profile: Option<aws_config::profile::ProfileSet>,
}

impl ProcessSettings {
    pub async fn load() -> Self {
        use aws_runtime::env_config::file::EnvConfigFiles;
        use aws_types::os_shim_internal::{Env, Fs};
        let profile =
            aws_config::profile::load(&Fs::real(), &Env::real(), &EnvConfigFiles::default(), None)
                .await
                .ok();
        Self { profile }
    }
}

impl Settings for ProcessSettings {
    fn env(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }

    fn profile(&self, key: &str) -> Option<String> {
        self.profile.as_ref()?.get(key).map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Fake(HashMap<&'static str, &'static str>);

    impl Settings for Fake {
        fn env(&self, key: &str) -> Option<String> {
            self.0.get(key).map(|v| v.to_string())
        }
        fn profile(&self, key: &str) -> Option<String> {
            self.0.get(key).map(|v| v.to_string())
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn refuses_when_chain_points_at_our_listener() {
        let s = Fake(HashMap::from([(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "http://127.0.0.1:8080/",
        )]));
        let err = check_not_own_source(&s, &addrs(&["127.0.0.1:8080"])).unwrap_err();
        assert!(err.to_string().contains("AWS_EC2_METADATA_DISABLED=true"));
        // A wildcard listener on the same port covers loopback too.
        assert!(check_not_own_source(&s, &addrs(&["0.0.0.0:8080"])).is_err());
    }

    #[test]
    fn default_endpoint_conflicts_with_default_listen() {
        let s = Fake::default();
        assert!(check_not_own_source(&s, &addrs(&["169.254.169.254:80"])).is_err());
        let v6 = Fake(HashMap::from([(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
            "IPv6",
        )]));
        assert!(check_not_own_source(&v6, &addrs(&["[fd00:ec2::254]:80"])).is_err());
    }

    #[test]
    fn allowed_when_disabled_or_elsewhere() {
        let off = Fake(HashMap::from([("AWS_EC2_METADATA_DISABLED", "TRUE")]));
        assert!(check_not_own_source(&off, &addrs(&["169.254.169.254:80"])).is_ok());
        let s = Fake::default();
        assert!(check_not_own_source(&s, &addrs(&["127.0.0.1:8080"])).is_ok());
        let other_port = Fake(HashMap::from([(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "http://127.0.0.1:9999",
        )]));
        assert!(check_not_own_source(&other_port, &addrs(&["127.0.0.1:8080"])).is_ok());
    }
}

//! `imds-broker doctor`: from the app's seat, why it does (or does not) get its credentials.
//! Each step is checked in order, as an SDK would meet it, and the first failure comes with a
//! fix: the endpoint is an address of this host, a connection opens, a session token is
//! issued, who the daemon takes the caller for (when `server.debug_whoami` lets it say), which
//! role that is, whether credentials are served and until when, and whether an SDK in this
//! environment would ask IMDS at all.
//!
//! The endpoint's locality is checked before anything is sent: on a host where
//! `169.254.169.254` is not local, a connection would leave the host.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use axum::http::{Request, header};

use crate::http_client;
use crate::imds::WHOAMI_PATH;

/// What one request waits for at most (botocore's IMDS timeout).
const TIMEOUT: Duration = Duration::from_secs(1);
const TOKEN_TTL_SECONDS: &str = "60";
const ROLES: &str = "/latest/meta-data/iam/security-credentials/";

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Worth knowing, not a failure (e.g. the daemon does not describe callers).
    Note,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do about a failure.
    pub fix: Option<String>,
}

/// What to check against.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port` of the IMDS endpoint.
    pub endpoint: SocketAddr,
    /// The role the caller expects, by name.
    pub expect_role: Option<String>,
    /// The environment an SDK would run in (`AWS_*`, `HOME`).
    pub env: Vec<(String, String)>,
    /// Checking from a container's network namespace: where its route to the endpoint goes
    /// (the endpoint is never an address of the container's own namespace).
    pub via: Option<Via>,
}

/// The next hop toward the endpoint from a container's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// The gateway, or the endpoint itself on a directly connected route; `None` if no route.
    pub next_hop: Option<IpAddr>,
    /// Whether the next hop is an address of the host, where the broker listens.
    pub is_host: bool,
}

impl Options {
    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The endpoint an SDK would use: `AWS_EC2_METADATA_SERVICE_ENDPOINT` (`http://host[:port][/]`),
/// else `169.254.169.254:80`.
pub fn sdk_endpoint(env: &[(String, String)]) -> Result<SocketAddr, String> {
    let configured = env
        .iter()
        .find(|(k, _)| k == "AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .map(|(_, v)| v.as_str());
    let Some(url) = configured else {
        return Ok(SocketAddr::from(([169, 254, 169, 254], 80)));
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// endpoints are IMDS endpoints"))?;
    let authority = rest.trim_end_matches('/');
    authority
        .parse::<SocketAddr>()
        .or_else(|_| {
            let host = authority.trim_start_matches('[').trim_end_matches(']');
            host.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 80))
        })
        .map_err(|_| format!("{url:?}: expected http://IP[:port]"))
}

/// The next hop toward `dst` by the IPv4 routing table in `/proc/net/route` form (the longest
/// matching prefix; its gateway, or `dst` itself on a directly connected route).
pub fn next_hop_in(table: &str, dst: std::net::Ipv4Addr) -> Option<IpAddr> {
    // The kernel prints each address's network-order bytes as one native-endian number.
    let field = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| u32::from_be_bytes(v.to_ne_bytes()))
    };
    let dst = u32::from(dst);
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (net, gateway, mask) = (
                field(cols.get(1)?)?,
                field(cols.get(2)?)?,
                field(cols.get(7)?)?,
            );
            (dst & mask == net & mask).then_some((mask.count_ones(), gateway))
        })
        .max_by_key(|(prefix, _)| *prefix)
        .map(|(_, gateway)| {
            let hop = if gateway == 0 { dst } else { gateway };
            IpAddr::V4(std::net::Ipv4Addr::from(hop))
        })
}

/// Every step, in order; checking stops at the first failure of the connection itself.
pub async fn diagnose(options: &Options, local_addresses: &[IpAddr]) -> Vec<Step> {
    let mut steps = Vec::new();
    let endpoint = options.endpoint;
    let ip = endpoint.ip().to_canonical();
    if let Some(via) = &options.via {
        match via {
            Via {
                next_hop: Some(hop),
                is_host: true,
            } => steps.push(ok(
                "route",
                format!("{ip} is reached through {hop}, an address of the host"),
            )),
            Via { next_hop, .. } => {
                let towards = next_hop.map_or("no route at all".to_owned(), |h| {
                    format!("{h}, which is not an address of the host")
                });
                steps.push(fail(
                    "route",
                    format!("from the container, {ip} goes to {towards}"),
                    "give the container a route to the host (a bridge network's default route does), or run it with --network host",
                ));
                return steps;
            }
        }
    } else if ip.is_loopback() || local_addresses.iter().any(|a| a.to_canonical() == ip) {
        steps.push(ok("route", format!("{ip} is an address of this host")));
    } else {
        steps.push(fail(
            "route",
            format!("{ip} is not an address of this host: a connection would leave it"),
            "run `deploy/imds-network.sh up` (local mode puts the IMDS addresses on imds0), \
             or point AWS_EC2_METADATA_SERVICE_ENDPOINT at the broker",
        ));
        return steps;
    }
    let Some(token) = token_step(endpoint, &mut steps).await else {
        return steps;
    };
    let token = token.as_str();
    let get = |path: String| async move { send(endpoint, "GET", &path, Some(token)).await };
    match get(WHOAMI_PATH.into()).await {
        Ok((200, body)) => steps.push(ok("identity", describe_identity(&body))),
        Ok((404, _)) => steps.push(Step {
            name: "identity",
            outcome: Outcome::Note,
            detail: "the daemon does not describe callers (server.debug_whoami is off)".into(),
            fix: None,
        }),
        Ok((status, _)) | Err((status, _)) => {
            steps.push(note("identity", format!("not available (HTTP {status})")))
        }
    }
    let role = match get(ROLES.into()).await {
        Ok((200, body)) => body.trim().to_owned(),
        Ok((404, _)) => {
            steps.push(fail(
                "role",
                "no app's rule matches this caller, so there is no role".into(),
                "see which rule should match and why it does not: \
                 `imds-broker explain --uid UID` (or --pid PID) on the broker's host",
            ));
            return steps;
        }
        other => {
            steps.push(fail(
                "role",
                format!("the role listing failed: {}", status_of(&other)),
                "see the broker's log and `imds-broker status`",
            ));
            return steps;
        }
    };
    match &options.expect_role {
        Some(expected) if *expected != role => {
            steps.push(fail(
                "role",
                format!("this caller is {role:?}, not the expected {expected:?}"),
                "see which rule matches first: `imds-broker explain --uid UID`",
            ));
            return steps;
        }
        _ => steps.push(ok("role", role.clone())),
    }
    match get(format!("{ROLES}{role}")).await {
        Ok((200, body)) => {
            let until = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["Expiration"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "(no Expiration)".into());
            steps.push(ok("credentials", format!("served, valid until {until}")));
        }
        other => {
            steps.push(fail(
                "credentials",
                format!("not served: {}", status_of(&other)),
                "the broker cannot get this role from STS right now: \
                 see `imds-broker status` and its log (sts.assume_role events)",
            ));
            return steps;
        }
    }
    steps.extend(sdk_environment(options));
    steps
}

async fn token_step(endpoint: SocketAddr, steps: &mut Vec<Step>) -> Option<String> {
    match send(endpoint, "PUT", "/latest/api/token", None).await {
        Ok((200, token)) => {
            steps.push(ok("connect", format!("{endpoint} accepts connections")));
            steps.push(ok("token", "a session token was issued".into()));
            Some(token)
        }
        Err((0, e)) => {
            steps.push(fail(
                "connect",
                format!("{endpoint}: {e}"),
                "start the broker (`systemctl start imds-broker`) and check server.listen",
            ));
            None
        }
        other => {
            steps.push(ok("connect", format!("{endpoint} accepts connections")));
            steps.push(fail(
                "token",
                format!("the token PUT failed: {}", status_of(&other)),
                "is this the broker? A proxy in the way (HTTP_PROXY without NO_PROXY for the \
                 endpoint) makes the broker refuse the request",
            ));
            None
        }
    }
}

/// Whether an SDK here would ask IMDS at all: anything earlier in the default credential
/// chain, or IMDS turned off, wins over the broker.
fn sdk_environment(options: &Options) -> Vec<Step> {
    let mut found = Vec::new();
    if options
        .var("AWS_EC2_METADATA_DISABLED")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        found.push((
            "AWS_EC2_METADATA_DISABLED=true turns IMDS off for every SDK".to_owned(),
            "unset AWS_EC2_METADATA_DISABLED",
        ));
    }
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        if options.var(var).is_some() {
            found.push((
                format!("{var} is set: a static key in the environment comes first"),
                "remove the AWS_* key variables from the app's environment",
            ));
        }
    }
    for var in [
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ] {
        if options.var(var).is_some() {
            found.push((
                format!("{var} is set: the SDK takes credentials from there first"),
                "unset it, unless that source is meant to win",
            ));
        }
    }
    let credentials_file = options
        .var("AWS_SHARED_CREDENTIALS_FILE")
        .map(Into::into)
        .or_else(|| {
            options
                .var("HOME")
                .map(|home| Path::new(home).join(".aws/credentials"))
        });
    if let Some(file) = credentials_file
        && std::fs::read_to_string(&file).is_ok_and(|text| text.contains("aws_access_key_id"))
    {
        found.push((
            format!(
                "{} holds an access key: it comes before IMDS",
                file.display()
            ),
            "remove the key from the shared credentials file (the broker replaces it)",
        ));
    }
    if found.is_empty() {
        return vec![ok(
            "sdk",
            "nothing in this environment comes before IMDS in an SDK's credential chain".into(),
        )];
    }
    found
        .into_iter()
        .map(|(detail, fix)| fail("sdk", detail, fix))
        .collect()
}

fn ok(name: &'static str, detail: String) -> Step {
    Step {
        name,
        outcome: Outcome::Ok,
        detail,
        fix: None,
    }
}

fn note(name: &'static str, detail: String) -> Step {
    Step {
        name,
        outcome: Outcome::Note,
        detail,
        fix: None,
    }
}

fn fail(name: &'static str, detail: String, fix: &str) -> Step {
    Step {
        name,
        outcome: Outcome::Fail,
        detail,
        fix: Some(fix.to_owned()),
    }
}

fn status_of(result: &Result<(u16, String), (u16, String)>) -> String {
    match result {
        Ok((status, _)) => format!("HTTP {status}"),
        Err((_, e)) => e.clone(),
    }
}

fn describe_identity(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return "the daemon's answer is not JSON".into();
    };
    let mut parts = vec![format!("{} caller", v["kind"].as_str().unwrap_or("?"))];
    for key in ["uid", "pid", "exe", "cgroup", "unit", "user_unit", "reason"] {
        match &v[key] {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => parts.push(format!("{key}={s}")),
            other => parts.push(format!("{key}={other}")),
        }
    }
    parts.join(" ")
}

/// One request on a fresh connection: the status and body, or `Err((0, why))` when no
/// connection or no whole exchange could be had.
async fn send(
    endpoint: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), (u16, String)> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, endpoint.to_string())
        .header(header::CONNECTION, "close");
    request = match token {
        Some(token) => request.header("x-aws-ec2-metadata-token", token),
        None => request.header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS),
    };
    let request = request
        .body(axum::body::Body::empty())
        .map_err(|e| (0, e.to_string()))?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(|e| (0, e.to_string()))?;
        http_client::exchange(stream, request)
            .await
            .map_err(|e| (0, e.to_string()))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| (0, format!("no answer within {}s", TIMEOUT.as_secs())))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_endpoint_is_the_sdks() {
        assert_eq!(
            sdk_endpoint(&env(&[])).unwrap(),
            "169.254.169.254:80".parse().unwrap()
        );
        for url in ["http://127.0.0.1:8080", "http://127.0.0.1:8080/"] {
            let e = env(&[("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)]);
            assert_eq!(sdk_endpoint(&e).unwrap(), "127.0.0.1:8080".parse().unwrap());
        }
        let e = env(&[(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "http://[fd00:ec2::254]",
        )]);
        assert_eq!(
            sdk_endpoint(&e).unwrap(),
            "[fd00:ec2::254]:80".parse().unwrap()
        );
        let e = env(&[("AWS_EC2_METADATA_SERVICE_ENDPOINT", "https://x")]);
        assert!(sdk_endpoint(&e).is_err());
    }

    #[tokio::test]
    async fn an_endpoint_off_the_host_is_never_connected_to() {
        let options = Options {
            endpoint: "169.254.169.254:80".parse().unwrap(),
            expect_role: None,
            env: Vec::new(),
            via: None,
        };
        // No local address is 169.254.169.254 here: the check stops before any connection.
        let steps = diagnose(&options, &["10.1.2.3".parse().unwrap()]).await;
        assert_eq!(steps.len(), 1);
        assert_eq!((steps[0].name, steps[0].outcome), ("route", Outcome::Fail));
        // From a container whose route leads elsewhere: the same.
        let from_container = Options {
            via: Some(Via {
                next_hop: Some("10.99.0.1".parse().unwrap()),
                is_host: false,
            }),
            ..options
        };
        let steps = diagnose(&from_container, &["169.254.169.254".parse().unwrap()]).await;
        assert_eq!(steps.len(), 1);
        assert_eq!((steps[0].name, steps[0].outcome), ("route", Outcome::Fail));
        assert!(steps[0].detail.contains("10.99.0.1"), "{}", steps[0].detail);
    }

    #[test]
    fn the_route_is_read_from_the_kernels_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0100580A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let hop = |dst: &str| next_hop_in(table, dst.parse().unwrap());
        assert_eq!(hop("169.254.169.254"), Some("10.88.0.1".parse().unwrap()));
        assert_eq!(hop("10.88.3.4"), Some("10.88.3.4".parse().unwrap()));
        assert_eq!(
            next_hop_in("Iface\tDestination\n", "1.2.3.4".parse().unwrap()),
            None
        );
    }

    #[test]
    fn each_thing_ahead_of_imds_in_the_chain_is_named() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".aws")).unwrap();
        std::fs::write(
            home.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = AKIDEXAMPLE\n",
        )
        .unwrap();
        let options = Options {
            endpoint: "127.0.0.1:1".parse().unwrap(),
            expect_role: None,
            env: env(&[
                ("AWS_EC2_METADATA_DISABLED", "TRUE"),
                ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
                ("AWS_PROFILE", "dev"),
                ("HOME", home.path().to_str().unwrap()),
            ]),
            via: None,
        };
        let steps = sdk_environment(&options);
        let details: Vec<&str> = steps.iter().map(|s| s.detail.as_str()).collect();
        assert_eq!(steps.len(), 4, "{details:?}");
        assert!(steps.iter().all(|s| s.outcome == Outcome::Fail));
        assert!(details[0].contains("AWS_EC2_METADATA_DISABLED"));
        assert!(details[1].contains("AWS_ACCESS_KEY_ID"));
        assert!(details[2].contains("AWS_PROFILE"));
        assert!(details[3].contains(".aws/credentials"));
        let clean = Options {
            env: env(&[("HOME", "/nonexistent")]),
            ..options
        };
        let steps = sdk_environment(&clean);
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].outcome, Outcome::Ok);
    }
}

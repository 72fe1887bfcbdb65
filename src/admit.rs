//! The first step of every request on both endpoints, written once: requests relayed by a
//! proxy, sent by a browser, or addressed to a name that is not the daemon's (DNS rebinding)
//! are refused, then the caller's rate is checked. Each refusal is audited as
//! `request.refused` with its reason.
//! - `X-Forwarded-For`/`Forwarded`: real IMDS refuses proxied token requests, and a proxy on
//!   this host would make its own identity stand for its clients'.
//! - `Origin`, `Referer`, `Sec-Fetch-*`: browser markers; no SDK sends them.
//! - a `Host` that is not one of the daemon's own addresses: a page on a rebound DNS name.
//!   Exactly one `Host`, and an origin-form target (a path): a second `Host` or an
//!   absolute-form target (`GET http://evil.example/...`) would give the request two names.

use std::net::IpAddr;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Uri, header};

use crate::audit::{self, DenyReason};
use crate::identity::ConnectionInfo;
use crate::rate_limit::CallerLimiter;

/// Why a request was not admitted; each endpoint answers it in its own protocol's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Relayed, from a browser, or for a foreign `Host`: 403.
    Relayed(&'static str),
    /// Over the caller's rate: 429 with `Retry-After`.
    RateLimited { retry_after: Duration },
}

/// Admits the request on `conn` to `target` with `headers`, or says (and audits) why not.
pub fn admit<I: Iterator<Item = IpAddr>>(
    conn: &ConnectionInfo,
    target: &Uri,
    headers: &HeaderMap,
    own: OwnHosts<'_, I>,
    limiter: &CallerLimiter,
) -> Result<(), Refused> {
    if let Some((reason, message)) = refusal(target, headers, own) {
        audit::request_refused(conn, reason, message);
        return Err(Refused::Relayed(message));
    }
    // One caller (by resolved identity) may not starve the others.
    if let Err(retry_after) = limiter.check(&conn.binding) {
        audit::request_refused(conn, DenyReason::RateLimited, "request rate over the limit");
        return Err(Refused::RateLimited { retry_after });
    }
    Ok(())
}

/// What the `Host` header may name: the address the caller dialled, the endpoint's well-known
/// and configured addresses, `localhost` on loopback, and the operator's extra names.
pub struct OwnHosts<'a, I> {
    pub dialled: IpAddr,
    pub addresses: I,
    pub names: &'a [String],
}

/// Why the request must be refused, if it must.
pub fn refusal<I: Iterator<Item = IpAddr>>(
    target: &Uri,
    headers: &HeaderMap,
    own: OwnHosts<'_, I>,
) -> Option<(DenyReason, &'static str)> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        Some((
            DenyReason::ForeignHost,
            "exactly one Host header is accepted",
        ))
    } else if target.scheme().is_some() || target.authority().is_some() {
        Some((
            DenyReason::ForeignHost,
            "the request target must be a path (origin-form), not an absolute URI",
        ))
    } else if headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED) {
        Some((DenyReason::Forwarded, "forwarded requests are refused"))
    } else if headers.contains_key(header::ORIGIN)
        || headers.contains_key(header::REFERER)
        || headers.keys().any(|k| k.as_str().starts_with("sec-fetch-"))
    {
        Some((DenyReason::Browser, "browser requests are refused"))
    } else if !host_allowed(host, own) {
        Some((
            DenyReason::ForeignHost,
            "the Host header does not name this daemon",
        ))
    } else {
        None
    }
}

/// Checked on every request, so without allocating: names compare case-insensitively,
/// addresses parse in either case.
fn host_allowed<I: Iterator<Item = IpAddr>>(
    host: Option<&HeaderValue>,
    mut own: OwnHosts<'_, I>,
) -> bool {
    // HTTP/1.0 clients may send no Host; browsers always send one.
    let Some(host) = host else { return true };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = strip_port(host);
    if let Ok(ip) = name.parse::<IpAddr>() {
        return ip == own.dialled || own.addresses.any(|a| a == ip);
    }
    (name.eq_ignore_ascii_case("localhost") && own.dialled.is_loopback())
        || own.names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → the host part, unbracketed.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(strip_port("169.254.169.254"), "169.254.169.254");
        assert_eq!(strip_port("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(strip_port("[fd00:ec2::254]:80"), "fd00:ec2::254");
        assert_eq!(strip_port("[::1]"), "::1");
        assert_eq!(strip_port("evil.example:80"), "evil.example");
        assert_eq!(strip_port("fd00:ec2::254"), "fd00:ec2::254");
    }

    fn refused(headers: &[(&str, &str)], dialled: &str) -> Option<DenyReason> {
        refused_target("/latest/api/token", headers, dialled)
    }

    fn refused_target(target: &str, headers: &[(&str, &str)], dialled: &str) -> Option<DenyReason> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let names = vec!["imds.internal".to_string()];
        let own = OwnHosts {
            dialled: dialled.parse().unwrap(),
            addresses: ["169.254.169.254".parse().unwrap()].into_iter(),
            names: &names,
        };
        refusal(&target.parse().unwrap(), &map, own).map(|(reason, _)| reason)
    }

    #[test]
    fn each_kind_of_relay_is_named() {
        assert_eq!(refused(&[], "127.0.0.1"), None);
        assert_eq!(refused(&[("host", "169.254.169.254")], "127.0.0.1"), None);
        assert_eq!(refused(&[("host", "127.0.0.1:80")], "127.0.0.1"), None);
        assert_eq!(refused(&[("host", "LocalHost")], "127.0.0.1"), None);
        assert_eq!(refused(&[("host", "IMDS.internal:80")], "10.0.0.1"), None);
        assert_eq!(refused(&[("host", "imds.internal")], "10.0.0.1"), None);
        assert_eq!(
            refused(&[("host", "localhost")], "10.0.0.1"),
            Some(DenyReason::ForeignHost)
        );
        assert_eq!(
            refused(&[("host", "evil.example")], "127.0.0.1"),
            Some(DenyReason::ForeignHost)
        );
        assert_eq!(
            refused(&[("x-forwarded-for", "1.2.3.4")], "127.0.0.1"),
            Some(DenyReason::Forwarded)
        );
        assert_eq!(
            refused(&[("sec-fetch-site", "cross-site")], "127.0.0.1"),
            Some(DenyReason::Browser)
        );
    }

    /// The security review's "also seen": each of these was served.
    #[test]
    fn one_host_and_a_path_only() {
        let own = ("host", "169.254.169.254");
        for hosts in [
            [own, ("host", "evil.example")],
            [("host", "evil.example"), own],
            [own, own],
        ] {
            assert_eq!(
                refused(&hosts, "127.0.0.1"),
                Some(DenyReason::ForeignHost),
                "{hosts:?}"
            );
        }
        for target in [
            "http://evil.example/latest/api/token",
            "http://169.254.169.254/latest/api/token",
        ] {
            assert_eq!(
                refused_target(target, &[own], "127.0.0.1"),
                Some(DenyReason::ForeignHost),
                "{target}"
            );
        }
        assert_eq!(
            refused_target("/latest/meta-data/", &[own], "127.0.0.1"),
            None
        );
    }
}

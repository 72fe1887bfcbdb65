//! `Host` header parsing shared by the endpoints' DNS-rebinding checks.

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
    use super::strip_port;

    #[test]
    fn host_port_forms() {
        assert_eq!(strip_port("169.254.169.254"), "169.254.169.254");
        assert_eq!(strip_port("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(strip_port("[fd00:ec2::254]:80"), "fd00:ec2::254");
        assert_eq!(strip_port("[::1]"), "::1");
        assert_eq!(strip_port("evil.example:80"), "evil.example");
        assert_eq!(strip_port("fd00:ec2::254"), "fd00:ec2::254");
    }
}

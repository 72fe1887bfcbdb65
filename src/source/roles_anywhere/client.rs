//! The one HTTP exchange with Roles Anywhere: a POST to `/sessions`, over TLS (plain HTTP only
//! when `endpoint_url` says so, for tests), bounded in connect time, total time and answer size.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::error::RolesAnywhereError;

/// A TCP (and TLS) connection that takes longer than this is not coming.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole exchange, connecting included. The SDK's credential cache waits on it, and so do
/// the apps' first requests after a restart.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// A credential set is about 2 KiB; an answer past this is not one, and is not read further.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Where CreateSession goes.
#[derive(Clone, Debug)]
pub struct Endpoint {
    uri: Uri,
    host: String,
    https: bool,
}

impl Endpoint {
    /// `https://rolesanywhere.<region>.amazonaws.com/sessions`, or `<endpoint_url>/sessions`.
    pub fn new(region: &str, endpoint_url: Option<&str>) -> Result<Self, RolesAnywhereError> {
        let Some(url) = endpoint_url else {
            // The region goes into a host name: only what a region can be.
            if region.is_empty()
                || !region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(RolesAnywhereError::Endpoint {
                    url: String::new(),
                    reason: format!("region {region:?} is not a region name"),
                });
            }
            return Self::new(
                region,
                Some(&format!("https://rolesanywhere.{region}.amazonaws.com")),
            );
        };
        let refuse = |reason: &str| RolesAnywhereError::Endpoint {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed: Uri = url.parse().map_err(|_| refuse("not a URL"))?;
        let https = match parsed.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(refuse("must be an http:// or https:// URL")),
        };
        let authority = parsed.authority().ok_or_else(|| refuse("names no host"))?;
        if authority.as_str().contains('@') {
            return Err(refuse("must not carry a user name or password"));
        }
        // The signature covers the path; `/sessions` is the only one Roles Anywhere serves.
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
            return Err(refuse(
                "must be scheme://host[:port], without a path or query",
            ));
        }
        let host = authority.as_str().to_owned();
        let scheme = if https { "https" } else { "http" };
        let uri = format!("{scheme}://{host}/sessions")
            .parse()
            .map_err(|_| refuse("not a URL"))?;
        Ok(Endpoint { uri, host, https })
    }

    /// The `Host` header, as signed and sent.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn path(&self) -> &str {
        self.uri.path()
    }

    pub fn url(&self) -> String {
        self.uri.to_string()
    }
}

/// An answer: its status and its body, whole.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// An HTTP/1.1 client for one endpoint.
pub struct Client {
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Client {
    pub fn new(endpoint: &Endpoint) -> Result<Self, RolesAnywhereError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = if endpoint.https {
            builder
                .with_provider_and_native_roots(provider)
                .map_err(RolesAnywhereError::Tls)?
                .https_only()
                .enable_http1()
                .wrap_connector(tcp)
        } else {
            // A plain-HTTP test endpoint: TLS is never used, so it trusts nothing.
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| RolesAnywhereError::Tls(std::io::Error::other(e)))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            builder
                .with_tls_config(config)
                .https_or_http()
                .enable_http1()
                .wrap_connector(tcp)
        };
        // Sessions are hours apart: a connection kept for the next one would be long dead.
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Ok(Client { http })
    }

    /// POSTs `body` with `headers`, and reads the answer, all within [`EXCHANGE_TIMEOUT`].
    pub async fn post(
        &self,
        endpoint: &Endpoint,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, RolesAnywhereError> {
        self.post_within(endpoint, headers, body, EXCHANGE_TIMEOUT)
            .await
    }

    async fn post_within(
        &self,
        endpoint: &Endpoint,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
        limit: Duration,
    ) -> Result<Answer, RolesAnywhereError> {
        let url = endpoint.url();
        let mut request = hyper::Request::post(endpoint.uri.clone()).header(
            "user-agent",
            concat!("imds-broker/", env!("CARGO_PKG_VERSION")),
        );
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| {
            RolesAnywhereError::Transport {
                url: url.clone(),
                reason: format!("cannot build the request: {e}"),
            }
        })?;
        let exchange =
            async {
                let response = self.http.request(request).await.map_err(|e| {
                    RolesAnywhereError::Transport {
                        url: url.clone(),
                        reason: chain(&e),
                    }
                })?;
                let status = response.status().as_u16();
                let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .map_err(|e| {
                        if e.is::<http_body_util::LengthLimitError>() {
                            RolesAnywhereError::BadResponse {
                                reason: format!("is longer than {MAX_ANSWER_BYTES} bytes"),
                            }
                        } else {
                            RolesAnywhereError::Transport {
                                url: url.clone(),
                                reason: format!("reading the answer: {}", chain(e.as_ref())),
                            }
                        }
                    })?
                    .to_bytes();
                Ok(Answer { status, body })
            };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| RolesAnywhereError::Timeout {
                url: url.clone(),
                limit,
            })?
    }
}

/// An error and its causes, `: `-separated (hyper's own message alone says little).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_endpoint_is_the_regional_one() {
        let e = Endpoint::new("eu-west-3", None).unwrap();
        assert_eq!(
            e.url(),
            "https://rolesanywhere.eu-west-3.amazonaws.com/sessions"
        );
        assert_eq!(e.host(), "rolesanywhere.eu-west-3.amazonaws.com");
        assert!(e.https);
    }

    #[test]
    fn an_endpoint_url_keeps_its_port_in_the_host() {
        let e = Endpoint::new("us-east-1", Some("http://127.0.0.1:8443/")).unwrap();
        assert_eq!(e.url(), "http://127.0.0.1:8443/sessions");
        assert_eq!(e.host(), "127.0.0.1:8443");
        assert_eq!(e.path(), "/sessions");
        assert!(!e.https);
    }

    /// A loopback server that reads a request and then answers with `answer` (or, for `None`,
    /// holds the connection without a word); the endpoint and a client for it.
    async fn server(answer: Option<Vec<u8>>) -> (Endpoint, Client) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 4096];
            let _ = stream.read(&mut request).await;
            match answer {
                Some(answer) => stream.write_all(&answer).await.unwrap(),
                None => std::future::pending().await,
            }
        });
        let endpoint = Endpoint::new("us-east-1", Some(&url)).unwrap();
        let client = Client::new(&endpoint).unwrap();
        (endpoint, client)
    }

    #[tokio::test]
    async fn a_silent_endpoint_times_out() {
        let (endpoint, client) = server(None).await;
        let limit = Duration::from_millis(300);
        let err = client
            .post_within(&endpoint, &[], b"{}".to_vec(), limit)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, RolesAnywhereError::Timeout { limit: l, .. } if l == limit),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_answer_past_the_size_limit_is_not_read() {
        let mut answer = format!(
            "HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\r\n",
            MAX_ANSWER_BYTES + 1
        )
        .into_bytes();
        answer.resize(answer.len() + MAX_ANSWER_BYTES + 1, b' ');
        let (endpoint, client) = server(Some(answer)).await;
        let err = client
            .post(&endpoint, &[], b"{}".to_vec())
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("longer than 65536 bytes"), "{err}");
    }

    #[tokio::test]
    async fn an_answer_within_the_limit_is_read_whole() {
        let answer = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\n{}".to_vec();
        let (endpoint, client) = server(Some(answer)).await;
        let answer = client.post(&endpoint, &[], b"{}".to_vec()).await.unwrap();
        assert_eq!((answer.status, &answer.body[..]), (403, &b"{}"[..]));
    }

    #[test]
    fn bad_endpoints_are_refused() {
        for (region, url) in [
            ("us-east-1", Some("ftp://x")),
            ("us-east-1", Some("https://x/prefix")),
            ("us-east-1", Some("https://x/?a=b")),
            ("us-east-1", Some("https://user:pw@x")),
            ("evil.com/x", None),
        ] {
            assert!(
                matches!(
                    Endpoint::new(region, url),
                    Err(RolesAnywhereError::Endpoint { .. })
                ),
                "{region} {url:?}"
            );
        }
    }
}

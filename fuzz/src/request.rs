//! Target `request`: a request head the fuzzer writes as text is built into an `http::Request`
//! and sent through `imds::router` with the case's connection identity. It reaches requests
//! hyper would parse differently or never produce (any method, absolute-form targets, other
//! HTTP versions), and checks every answer.
//!
//! Input after the selector byte: `METHOD TARGET [VERSION]`, then `Name: value` lines, an empty
//! line and the body; lines end in `\n` or `\r\n`. A header line the `http` crate refuses is
//! dropped, so the rest of the input still counts; a method or target it refuses ends the
//! execution, since no such request can reach the router.

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, Uri, Version, header};
use imds_broker::imds::TOKEN_HEADER;
use tower::ServiceExt;

use super::fixture::{self, Case, Mode, Tokens, assert_no_leak, fixture, substitute_tokens};

/// IMDS answers are a few hundred bytes; anything near this is a bug in itself.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

pub fn run(data: &[u8]) {
    let Some((case, rest)) = Case::split(data) else {
        return;
    };
    let fx = fixture();
    let tokens = fx.tokens(&case);
    let input = substitute_tokens(rest, &tokens);
    let Some(request) = Head::parse(&input).and_then(|head| head.request()) else {
        return;
    };
    let token_ok = token_satisfied(&case, &tokens, &request);
    let router = fx.router(case.mode);
    let mut request = request;
    request.extensions_mut().insert(case.connection());
    let (parts, body) = fx.runtime.block_on(async move {
        let response = router
            .oneshot(request)
            .await
            .unwrap_or_else(|never| match never {});
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, MAX_RESPONSE_BODY)
            .await
            .expect("response body within bounds");
        (parts, body)
    });

    let status = parts.status;
    assert_eq!(
        parts.headers.get(header::SERVER).map(HeaderValue::as_bytes),
        Some(&b"EC2ws"[..]),
        "every answer says it is EC2's metadata server: {parts:?}"
    );
    assert!(
        !status.is_server_error() || case.caller.may_fail_upstream(),
        "{status} for {case:?}, whose STS works: {body:?}"
    );
    if fixture::contains(&body, fixture::SECRET.as_bytes()) {
        assert_eq!(status, 200, "credentials in a {status} answer");
    }
    assert_no_leak(&case, token_ok, &body);
}

/// Whether the request carries exactly the caller's own token, or no token where IMDSv1 is
/// allowed: the only ways to credentials.
fn token_satisfied(case: &Case, tokens: &Tokens, request: &Request<Body>) -> bool {
    let mut presented = request
        .headers()
        .get_all(TOKEN_HEADER)
        .iter()
        .map(HeaderValue::as_bytes);
    match (presented.next(), presented.next()) {
        (Some(token), None) => token == tokens.own.as_bytes(),
        (None, _) => case.mode == Mode::ImdsV1,
        (Some(_), Some(_)) => false,
    }
}

/// A request head as the fuzzer wrote it, not yet validated.
struct Head<'a> {
    method: &'a [u8],
    target: &'a [u8],
    version: Version,
    headers: Vec<(&'a [u8], &'a [u8])>,
    body: &'a [u8],
}

impl<'a> Head<'a> {
    fn parse(input: &'a [u8]) -> Option<Self> {
        let (request_line, mut rest) = split_line(input);
        let mut words = request_line.splitn(3, |&b| b == b' ');
        let method = words.next()?;
        let target = words.next()?;
        let version = match words.next() {
            Some(b"HTTP/0.9") => Version::HTTP_09,
            Some(b"HTTP/1.0") => Version::HTTP_10,
            Some(b"HTTP/2" | b"HTTP/2.0") => Version::HTTP_2,
            Some(b"HTTP/3" | b"HTTP/3.0") => Version::HTTP_3,
            _ => Version::HTTP_11,
        };
        let mut headers = Vec::new();
        while !rest.is_empty() {
            let (line, after) = split_line(rest);
            rest = after;
            if line.is_empty() {
                break;
            }
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let value = &line[colon + 1..];
                let start = value
                    .iter()
                    .position(|&b| b != b' ' && b != b'\t')
                    .unwrap_or(value.len());
                headers.push((&line[..colon], &value[start..]));
            }
        }
        Some(Self {
            method,
            target,
            version,
            headers,
            body: rest,
        })
    }

    fn request(&self) -> Option<Request<Body>> {
        let mut request = Request::new(Body::from(self.body.to_vec()));
        *request.method_mut() = Method::from_bytes(self.method).ok()?;
        *request.uri_mut() = Uri::try_from(self.target).ok()?;
        *request.version_mut() = self.version;
        for &(name, value) in &self.headers {
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                request.headers_mut().append(name, value);
            }
        }
        Some(request)
    }
}

/// The first line (without its `\n` or `\r\n`) and what follows it.
fn split_line(input: &[u8]) -> (&[u8], &[u8]) {
    let (line, rest) = match input.iter().position(|&b| b == b'\n') {
        Some(end) => (&input[..end], &input[end + 1..]),
        None => (input, &input[input.len()..]),
    };
    (line.strip_suffix(b"\r").unwrap_or(line), rest)
}

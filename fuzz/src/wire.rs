//! Target `wire`: raw bytes, as a client would send them, into hyper's HTTP/1.1 server with the
//! limits `server.rs` sets, then through `imds::router`. Covers what the network reaches before
//! routing: request-line and header parsing, bodies and chunked encoding, pipelined requests on
//! one keep-alive connection. The connection must always finish, and on its own.
//!
//! Input after the selector byte: the bytes the client writes before it closes its side.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use super::fixture::{self, Case, Mode, assert_no_leak, fixture, substitute_tokens};

/// In memory, a connection is over in microseconds once the client has closed its side; one
/// still open after this hangs, which over TCP would hold a connection slot.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// Room for the whole exchange, so neither side waits on the other's buffer.
const PIPE_BYTES: usize = 256 * 1024;

pub fn run(data: &[u8]) {
    let Some((case, rest)) = Case::split(data) else {
        return;
    };
    let fx = fixture();
    let input = substitute_tokens(rest, &fx.tokens(&case));
    let info = case.connection();
    let service = fx.router(case.mode).map_request(
        move |mut request: axum::http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(info.clone());
            request
        },
    );
    let output = fx.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(PIPE_BYTES);
        // The daemon's own connection settings, plus `half_close`: this client closes its
        // sending side after the input, and without it hyper would drop the requests still in
        // flight at that EOF, so no answer would be checked.
        let connection = imds_broker::server::http1_builder()
            .half_close(true)
            .serve_connection(TokioIo::new(server), TowerToHyperService::new(service));
        let exchange = async {
            // Errors here only mean the server closed first, which it may.
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut output = Vec::new();
            let _ = client.read_to_end(&mut output).await;
            output
        };
        let both = async {
            // A protocol error ends the connection; that is an answer, not a failure.
            let (_, output) = tokio::join!(connection, exchange);
            output
        };
        tokio::time::timeout(CONNECTION_DEADLINE, both)
            .await
            .unwrap_or_else(|_| panic!("connection still open after {CONNECTION_DEADLINE:?}"))
    });

    assert!(
        output.is_empty() || output.starts_with(b"HTTP/1."),
        "not an HTTP/1.x answer: {:?}",
        String::from_utf8_lossy(&output)
    );
    // Over the wire the token's header can take many shapes; that the input carried the
    // caller's own token (or IMDSv1 is on) is as much as can be required without parsing it.
    let token_ok = case.mode == Mode::ImdsV1 || fixture::contains(rest, fixture::OWN_TOKEN);
    assert_no_leak(&case, token_ok, &output);
}

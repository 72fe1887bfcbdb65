//! The reference server for `tests/bench/load.py`: the daemon's own HTTP stack (tokio's default
//! multi-threaded runtime, one task per connection, `server::http1_builder()`, an axum router)
//! answering "hello" with nothing else. The gap between this and the broker is the cost of
//! identity resolution, the security layers, the token check, the policy lookup, the credential
//! cache and the audit trail.
//!
//! Prints `listening on ADDR` like the daemon; serves until killed.

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use imds_broker::server::http1_builder;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:0")
        .parse()
        .map_err(std::io::Error::other)?;
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    // Any path: the benchmark asks for the broker's credential path on both servers.
    let router = Router::new().fallback(get(|| async { "hello" }));
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _ = http1_builder()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

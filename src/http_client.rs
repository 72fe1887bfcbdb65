//! A body-less HTTP/1.1 request and its whole response over a stream the caller connected,
//! with hyper's client: for the commands that talk to a daemon (`status`, `token`, `doctor`).

use std::io;

/// One request and its response over `stream`, with hyper's HTTP/1 client.
pub async fn exchange<S>(
    stream: S,
    request: axum::http::Request<axum::body::Body>,
) -> io::Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let invalid = |e: hyper::Error| io::Error::new(io::ErrorKind::InvalidData, e);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(invalid)?;
    // The connection is driven alongside the exchange, and ends once the exchange (which owns
    // the sender) is done.
    let exchange = async move {
        let response = sender.send_request(request).await.map_err(invalid)?;
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (result, _) = tokio::join!(exchange, connection);
    result
}

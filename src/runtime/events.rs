//! Following the runtime's event stream (`GET /events`): each container event makes the cache
//! forget that container, and the cache is trusted only while the stream is connected.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::Inner;
use super::api::{self, MAX_RESPONSE_BYTES};
use super::error::RuntimeError;

/// Container events only: `{"type":["container"]}`, URL-encoded.
const CONTAINER_FILTER: &str = "%7B%22type%22%3A%5B%22container%22%5D%7D";

/// How far back the stream starts. Docker sends the `200` before it subscribes to its events,
/// so a change in between would be missed; asking for the events since a moment before the
/// request replays it (and a few already seen, which only costs a request each).
const REPLAY: Duration = Duration::from_secs(2);

/// The first retry after the stream fails; doubled on each failure after that.
pub const RETRY_FIRST: Duration = Duration::from_millis(250);
/// While the stream is down every lookup is a request, so retrying matters, but a runtime
/// that is away (restarting, not installed) is asked at most this often.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// Follows the stream until `shutdown` resolves, reconnecting after each failure.
pub(super) async fn watch(inner: &Inner, shutdown: impl Future<Output = ()> + Send) {
    tokio::pin!(shutdown);
    let mut delay = RETRY_FIRST;
    // Each outage is logged once as a warning, its retries at debug level.
    let mut reported = false;
    loop {
        let mut was_connected = false;
        let ended = tokio::select! {
            () = &mut shutdown => break,
            ended = follow(inner, &mut was_connected) => ended,
        };
        inner.cache.disconnected();
        if was_connected {
            delay = RETRY_FIRST;
            reported = false;
        }
        if reported {
            tracing::debug!(error = %ended, retry_in = ?delay, "container runtime events still unavailable");
        } else {
            tracing::warn!(
                error = %ended,
                retry_in = ?delay,
                "container runtime events unavailable: container metadata is not cached until they are back"
            );
            reported = true;
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
    inner.cache.disconnected();
}

/// One connection of the stream, until it fails; why it ended.
async fn follow(inner: &Inner, was_connected: &mut bool) -> RuntimeError {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(REPLAY)
        .as_secs();
    let path = format!("/events?since={since}&filters={CONTAINER_FILTER}");
    let mut stream = match inner.api.stream(&path).await {
        Ok(stream) => stream,
        Err(e) => return e,
    };
    inner.cache.connected();
    *was_connected = true;
    tracing::info!(socket = %stream.socket.display(), "following container runtime events");
    let mut decoder = Decoder::default();
    loop {
        let chunk = match stream.next().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return api::protocol(&stream.socket, "the event stream ended"),
            Err(e) => return e,
        };
        let decoded = decoder.push(&chunk, |change| match change {
            Change::Container(id) => inner.cache.changed(&id),
            Change::Unidentified => inner.cache.changed_unknown(),
        });
        if let Err(e) = decoded {
            return api::protocol(&stream.socket, e);
        }
    }
}

/// What an event says changed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    Container(String),
    /// A container event without a full id.
    Unidentified,
}

/// Splits the stream's bytes into JSON objects: one per line (podman) or back to back
/// (Docker), either one split anywhere across chunks.
#[derive(Default)]
pub(super) struct Decoder {
    pending: Vec<u8>,
}

impl Decoder {
    /// Adds `bytes` and reports the change each complete event names.
    pub fn push(&mut self, bytes: &[u8], mut apply: impl FnMut(Change)) -> Result<(), String> {
        self.pending.extend_from_slice(bytes);
        let mut values = serde_json::Deserializer::from_slice(&self.pending).into_iter::<Value>();
        let consumed = loop {
            match values.next() {
                Some(Ok(event)) => apply_event(&event, &mut apply)?,
                // The rest is an event cut short: kept for the next chunk.
                Some(Err(e)) if e.is_eof() => break values.byte_offset(),
                Some(Err(e)) => return Err(format!("unreadable event: {e}")),
                None => break values.byte_offset(),
            }
        };
        self.pending.drain(..consumed);
        if self.pending.len() > MAX_RESPONSE_BYTES {
            return Err(format!(
                "an event longer than {MAX_RESPONSE_BYTES} bytes, refused"
            ));
        }
        Ok(())
    }
}

fn apply_event(event: &Value, apply: &mut impl FnMut(Change)) -> Result<(), String> {
    if !event.is_object() {
        return Err("an event that is not a JSON object".to_owned());
    }
    // Docker before API 1.22 sent container events without a `Type`.
    match event.get("Type").and_then(Value::as_str) {
        None | Some("container") => {}
        Some(_) => return Ok(()),
    }
    let id = event
        .pointer("/Actor/ID")
        .or_else(|| event.get("id"))
        .and_then(Value::as_str);
    apply(match id {
        Some(id) if api::is_full_id(id) => Change::Container(id.to_owned()),
        _ => Change::Unidentified,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "6ca462c7f0b71316d0a1291dd88368860d3c56bb5d1e7c324d8b506ddfd312ac";
    const B: &str = "0c6e1f0fe6e4e8ec4cb4d75a4fd50a5b53e16b0e48b0ee3cf7d3b3e4d1f1e2a3";

    fn event(action: &str, id: &str) -> String {
        format!(
            r#"{{"status":"{action}","id":"{id}","Type":"container","Action":"{action}","Actor":{{"ID":"{id}","Attributes":{{"name":"web","k":"v"}}}},"scope":"local","time":1,"timeNano":1}}"#
        )
    }

    fn decode(chunks: &[&[u8]]) -> Result<Vec<Change>, String> {
        let mut decoder = Decoder::default();
        let mut changes = Vec::new();
        for chunk in chunks {
            decoder.push(chunk, |c| changes.push(c))?;
        }
        Ok(changes)
    }

    #[test]
    fn lines_and_back_to_back_objects_split_anywhere() {
        let expected = vec![
            Change::Container(A.to_owned()),
            Change::Container(B.to_owned()),
        ];
        let lines = format!("{}\n{}\n", event("start", A), event("rename", B));
        let back_to_back = format!("{}{}", event("die", A), event("destroy", B));
        for text in [lines, back_to_back] {
            let bytes = text.as_bytes();
            assert_eq!(decode(&[bytes]).unwrap(), expected);
            for cut in 1..bytes.len() {
                let (head, tail) = bytes.split_at(cut);
                assert_eq!(decode(&[head, tail]).unwrap(), expected, "cut at {cut}");
            }
            let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(decode(&bytewise).unwrap(), expected);
        }
    }

    #[test]
    fn other_types_are_skipped_and_unnamed_containers_reported() {
        let text = format!(
            "{}{}{}{}",
            r#"{"Type":"image","Action":"pull","Actor":{"ID":"sha256:1"}}"#,
            r#"{"Type":"container","Action":"rename","Actor":{"ID":"short"}}"#,
            r#"{"status":"die","id":""#.to_owned() + A + r#""}"#,
            r#"{"Type":"container","Action":"kill"}"#,
        );
        assert_eq!(
            decode(&[text.as_bytes()]).unwrap(),
            vec![
                Change::Unidentified,
                Change::Container(A.to_owned()),
                Change::Unidentified
            ]
        );
    }

    #[test]
    fn garbage_and_endless_events_end_the_stream() {
        assert!(decode(&[b"{\"Type\":\"container\"}\nnot json"]).is_err());
        assert!(decode(&[b"[1, 2]"]).is_err());
        let mut decoder = Decoder::default();
        decoder
            .push(b"{\"Type\":\"container\",\"pad\":\"", |_| {})
            .unwrap();
        let padding = vec![b'x'; MAX_RESPONSE_BYTES];
        assert!(decoder.push(&padding, |_| {}).is_err());
    }
}

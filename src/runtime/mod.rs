//! Asks the container runtime (dockerd or `podman system service`, over the Docker Engine API on
//! its Unix socket) what a container is: its name, image and labels, which rules match on and
//! only the runtime knows.
//!
//! A credential broker must not answer from stale labels, so answers are kept only while the
//! runtime's event stream is connected and are dropped on each event about their container
//! (`cache.rs` states the exact rule). Every request is bounded in time and size.

mod api;
mod cache;
mod error;
mod events;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub use api::{API_TIMEOUT, MAX_RESPONSE_BYTES};
pub use cache::{MAX_AGE, MAX_ENTRIES};
pub use error::RuntimeError;
pub use events::{RETRY_FIRST, RETRY_MAX};

use crate::identity::container::ContainerMeta;

/// The runtime client and its cache; share it as `Arc<Runtime>`.
pub struct Runtime {
    inner: Arc<Inner>,
}

/// What the lookup tasks share with the runtime.
struct Inner {
    api: api::Client,
    cache: cache::Cache,
}

/// A container as `find` reports it, for operator commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub meta: ContainerMeta,
    /// The container's main process (`State.Pid`); `None` when it runs none.
    pub pid: Option<u32>,
    pub running: bool,
}

impl Runtime {
    /// `sockets` are tried in order; the first that accepts a connection is used until it
    /// stops accepting.
    pub fn new(sockets: Vec<PathBuf>) -> Self {
        Runtime {
            inner: Arc::new(Inner {
                api: api::Client::new(sockets),
                cache: cache::Cache::new(),
            }),
        }
    }

    /// What the runtime says about container `id` (its full 64-hex-digit id): from the cache
    /// while that can be trusted, else from `GET /containers/{id}/json`. Concurrent calls for
    /// one id share one request.
    pub async fn inspect(&self, id: &str) -> Result<Arc<ContainerMeta>, RuntimeError> {
        // A name or a prefix may come to mean another container; a full id never does.
        if !api::is_full_id(id) {
            return Err(api::bad_id("id (64 hex digits)", id));
        }
        let mut answer = match self.inner.cache.begin(id) {
            cache::Lookup::Hit(meta) => return Ok(meta),
            cache::Lookup::Join(answer) => answer,
            cache::Lookup::Lead(leader) => {
                let answer = leader.answer();
                let inner = self.inner.clone();
                // On its own task, so a caller that gives up does not fail those who joined.
                tokio::spawn(async move {
                    let outcome = inner.fetch(&leader.id).await;
                    inner.cache.finish(leader, outcome);
                });
                answer
            }
        };
        let abandoned = || {
            RuntimeError::Protocol(format!(
                "the lookup of container {id} ended without an answer"
            ))
        };
        match answer.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or_else(|| Err(abandoned())),
            Err(_) => Err(abandoned()),
        }
    }

    /// A container by name or id (full or a prefix), for operator commands; never cached.
    pub async fn find(&self, name_or_id: &str) -> Result<Inspected, RuntimeError> {
        self.inner
            .api
            .inspect("find", name_or_id, api::By::NameOrId)
            .await
    }

    /// Follows the runtime's events until `shutdown` resolves, reconnecting after a failure
    /// (from [`RETRY_FIRST`], doubling up to [`RETRY_MAX`]). Until it runs, and whenever the
    /// stream is down, nothing is cached. One watcher per `Runtime`: the cache trusts the
    /// last one to connect or fail.
    pub async fn watch_events(self: Arc<Self>, shutdown: impl Future<Output = ()> + Send) {
        events::watch(&self.inner, shutdown).await;
    }

    /// The socket that answered last; `None` before the first request or if none answered.
    pub fn socket_in_use(&self) -> Option<PathBuf> {
        self.inner.api.in_use()
    }

    /// Whether the event stream is connected, that is whether answers are being cached.
    pub fn events_connected(&self) -> bool {
        self.inner.cache.status().connected
    }
}

impl Inner {
    async fn fetch(&self, id: &str) -> cache::Outcome {
        let inspected = self.api.inspect("inspect", id, api::By::Id).await?;
        Ok(Arc::new(inspected.meta))
    }
}

#[cfg(test)]
mod tests;

//! The daemon's shared state: one cheap-to-clone handle that every connection and handler uses.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::credentials::{Clock, CredentialCache, CredentialSource};
use crate::token::TokenKey;

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    config: ArcSwap<Config>,
    token_key: TokenKey,
    cache: CredentialCache,
    clock: Arc<dyn Clock>,
    started_at: SystemTime,
}

impl AppState {
    pub fn new(
        config: Config,
        token_key: TokenKey,
        source: Arc<dyn CredentialSource>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let cache = CredentialCache::new(source, clock.clone(), config.credentials);
        Self {
            inner: Arc::new(Shared {
                started_at: clock.now(),
                config: ArcSwap::from_pointee(config),
                token_key,
                cache,
                clock,
            }),
        }
    }

    /// The config in force now. Each request works on one snapshot, so a reload never changes
    /// the rules halfway through a request.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    pub fn token_key(&self) -> &TokenKey {
        &self.inner.token_key
    }

    pub fn cache(&self) -> &CredentialCache {
        &self.inner.cache
    }

    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    pub fn started_at(&self) -> SystemTime {
        self.inner.started_at
    }
}

//! The daemon's shared state: one cheap-to-clone handle that every connection and handler uses,
//! and the background work that goes with it (credential refresh, config reload).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::audit;
use crate::config::{App, Config, OnFailure};
use crate::credentials::{
    CacheError, Clock, CredentialCache, CredentialSource, Credentials, StsBudget, TokioTime,
};
use crate::identity::Caller;
use crate::metrics::Counters;
use crate::shutdown::Tasks;
use crate::source::Source;
use crate::time::{BootTime, Moment};
use crate::token::TokenKey;
use crate::token::container::TokenStore;

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    config: ArcSwap<Config>,
    token_key: TokenKey,
    cache: CredentialCache,
    counters: Counters,
    clock: Arc<dyn Clock>,
    started_at: SystemTime,
    /// The container endpoint's tokens, when it is on.
    container_tokens: OnceLock<Arc<TokenStore>>,
    /// The daemon's own credential source, for status, metrics and readiness.
    own_source: OnceLock<Arc<Source>>,
    /// Background work: the reloader and token rotation here, the cache's refresher and STS
    /// workers in a child node.
    tasks: Tasks,
}

/// What a config reload changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub apps: usize,
    /// Cache entries dropped because no app asks for that AssumeRole input any more.
    pub dropped: usize,
    /// Settings that only take effect on restart (listeners, hop limit, state dir, STS
    /// endpoint, limits, admin listener, audit file).
    pub needs_restart: bool,
}

impl AppState {
    /// A state with a shutdown tree of its own ([`AppState::stop_background`] stops it).
    pub fn new(
        config: Config,
        token_key: TokenKey,
        source: Arc<dyn CredentialSource>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::under(config, token_key, source, clock, Tasks::new())
    }

    /// A state whose background work runs under `tasks` (a node of the daemon's tree).
    pub fn under(
        config: Config,
        token_key: TokenKey,
        source: Arc<dyn CredentialSource>,
        clock: Arc<dyn Clock>,
        tasks: Tasks,
    ) -> Self {
        let budget = StsBudget::new(config.sts.max_calls_per_second, config.sts.burst, TokioTime);
        let cache = CredentialCache::under(
            source,
            clock.clone(),
            config.credentials,
            budget,
            tasks.child(),
        );
        Self {
            inner: Arc::new(Shared {
                started_at: clock.now(),
                config: ArcSwap::from_pointee(config),
                token_key,
                cache,
                counters: Counters::default(),
                clock,
                container_tokens: OnceLock::new(),
                own_source: OnceLock::new(),
                tasks,
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

    /// `app`'s credentials for `caller` on `endpoint` (`imds`, `container`): from the cache,
    /// fetched if need be, and audited either way. The one path both surfaces issue through.
    ///
    /// With `[audit] on_failure = "refuse"` (the default), nothing is issued while the audit
    /// writer reports its last write or fsync failed ([`audit::health`]): the caller gets a
    /// transient failure (503), so its SDK retries. The writer is asynchronous, so the
    /// issuance whose event is the first to fail has already left; the state flips for the
    /// callers after it, and flips back after the writer's next successful write.
    pub async fn issue(
        &self,
        caller: &Caller,
        endpoint: &'static str,
        app: &App,
    ) -> Result<Arc<Credentials>, CacheError> {
        if self.config().audit.on_failure == OnFailure::Refuse
            && let Some(why) = audit::health::failing()
        {
            audit::credentials_unrecordable(caller, endpoint, app, &why);
            // Transient, so both surfaces answer 503 and SDKs retry; the detail is logged only.
            return Err(CacheError::AuditUnavailable(why.to_string()));
        }
        match self.cache().get(app.assume_role_input()).await {
            Ok(creds) => {
                let recorded = audit::credentials_issued(
                    caller,
                    endpoint,
                    app,
                    (&creds.access_key_id, creds.expiration),
                );
                // The check above passed, but the writer's queue filled meanwhile and this
                // issuance's line was dropped: refused like the callers after it will be.
                if !recorded && self.config().audit.on_failure == OnFailure::Refuse {
                    let why = audit::health::BACKLOGGED;
                    audit::credentials_unrecordable(caller, endpoint, app, why);
                    return Err(CacheError::AuditUnavailable(why.to_owned()));
                }
                self.counters().served(&app.name);
                Ok(creds)
            }
            Err(e) => {
                audit::credentials_unavailable(caller, endpoint, app, &e.to_string());
                Err(e)
            }
        }
    }

    pub fn cache(&self) -> &CredentialCache {
        &self.inner.cache
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Hands the container endpoint's token store to the state, so that reloads keep the
    /// tokens in line with the apps (once, at start).
    pub fn attach_container_tokens(&self, tokens: Arc<TokenStore>) {
        let _ = self.inner.container_tokens.set(tokens);
    }

    /// Hands the daemon's own credential source to the state (once, at start).
    pub fn attach_source(&self, source: Arc<Source>) {
        let _ = self.inner.own_source.set(source);
    }

    pub fn own_source(&self) -> Option<&Arc<Source>> {
        self.inner.own_source.get()
    }

    pub fn container_tokens(&self) -> Option<&Arc<TokenStore>> {
        self.inner.container_tokens.get()
    }

    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// The boot clock, for intervals the daemon grants (see `crate::time`).
    pub fn boot_time(&self) -> BootTime {
        self.inner.clock.boot_time()
    }

    /// Now on both clocks.
    pub fn moment(&self) -> Moment {
        let clock = &self.inner.clock;
        Moment {
            wall: clock.now(),
            boot: clock.boot_time(),
        }
    }

    pub fn started_at(&self) -> SystemTime {
        self.inner.started_at
    }

    /// Schedules the first fetch of every `prefetch` app at a random moment of
    /// `credentials.prefetch_spread` (a fleet restarted at once must not call STS in one second)
    /// and starts the background refresher (until [`AppState::stop_background`]).
    pub fn start_refresher(&self) {
        let config = self.config();
        self.cache()
            .prefetch_spread(prefetched(&config), config.credentials.prefetch_spread);
        self.cache().start_refresher();
    }

    /// Swaps in a new config: cached credentials stay for apps whose AssumeRole input did not
    /// change, the others are dropped; new `prefetch` apps are fetched, spread over
    /// `credentials.prefetch_spread` like at start (a config push reaches a fleet at once too).
    pub fn apply_config(&self, config: Config) -> ReloadSummary {
        let old = self.config();
        let keep: HashSet<_> = config
            .apps
            .iter()
            .map(|a| a.assume_role_input().clone())
            .collect();
        let needs_restart = old.server.listen != config.server.listen
            || old.server.state_dir != config.server.state_dir
            || old.server.hop_limit != config.server.hop_limit
            || old.sts.region != config.sts.region
            || old.sts.endpoint_url != config.sts.endpoint_url
            || old.limits != config.limits
            || old.admin != config.admin
            || old.audit != config.audit
            || old.containers != config.containers
            || old.source != config.source
            || old.container.as_ref().map(|c| &c.listen)
                != config.container.as_ref().map(|c| &c.listen);
        let cache = self.cache();
        cache.set_policy(config.credentials);
        if (old.sts.max_calls_per_second, old.sts.burst)
            != (config.sts.max_calls_per_second, config.sts.burst)
        {
            cache
                .budget()
                .reconfigure(config.sts.max_calls_per_second, config.sts.burst);
        }
        let prefetch: Vec<_> = prefetched(&config).collect();
        let spread = config.credentials.prefetch_spread;
        let apps = config.apps.len();
        // Swap first: a request on the old snapshot may still create an entry for an old input,
        // but never one the new config would be served from.
        let config = Arc::new(config);
        self.inner.config.store(config.clone());
        let dropped = cache.retain(|input| keep.contains(input));
        cache.prefetch_spread(prefetch, spread);
        // After the swap: a new app's token file appears once the app can be served.
        if let Some(store) = self.container_tokens() {
            crate::token::container::record(&store.reconcile(&config.apps, self.moment()));
        }
        ReloadSummary {
            apps,
            dropped,
            needs_restart,
        }
    }

    /// Runs `task`, named `name`, as background work that [`AppState::stop_background`]
    /// cancels (through the token it is given) and waits for.
    pub fn spawn_background<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.inner
            .tasks
            .spawn(name, task(self.inner.tasks.token().clone()));
    }

    /// Stops the refresher, every STS worker and the other background tasks, and waits for them.
    pub async fn stop_background(&self) {
        self.inner.tasks.stop().await;
    }
}

fn prefetched(config: &Config) -> impl Iterator<Item = crate::credentials::AssumeRoleInput> + '_ {
    config
        .apps
        .iter()
        .filter(|a| a.prefetch)
        .map(|a| a.assume_role_input().clone())
}

//! The daemon, wired in one place: [`run`] takes a loaded config, the bound [`Listeners`] and a
//! shutdown future, starts every task under one shutdown tree, serves until the future
//! completes, and drains. The binary (`imds-broker serve`) and the tests' in-process daemon
//! go through the same code.
//!
//! The shutdown tree ([`Tasks`]): one root; under it the accept loops (a child node), the
//! shared state's background work (a child node: config reloader, container token rotation,
//! and below it the credential cache's refresher and STS workers, whose per-entry tokens are
//! children of the cache's), and on the root itself the admin listener and the systemd
//! watchdog. Draining goes from the outside in:
//! 1. stop accepting, give in-flight requests until [`SHUTDOWN_GRACE`] after the signal;
//! 2. stop the state's background work (nothing can ask it for credentials any more);
//! 3. stop the admin listener and the watchdog, which answered and pinged throughout;
//! 4. close the audit file.
//!
//! Steps 2 and 3 get what is left of the grace period, and at least [`TASKS_GRACE`].

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::admin::{self, AdminListener};
use crate::audit::seal::EpochPolicy;
use crate::audit::sink::{AuditSink, OpenError, SealSettings, Unstarted};
use crate::config::{AdminListen, Config};
use crate::credentials::{Clock, CredentialSource};
use crate::safe_dir::{self, DirError, SafeDir};
use crate::server::{self, BindError, SHUTDOWN_GRACE, Serving};
use crate::shutdown::Tasks;
use crate::signal::Hangups;
use crate::source::Source;
use crate::state::AppState;
use crate::token::container::TokenStore;
use crate::token::file as token_file;
use crate::token::{KeyError, TokenKey};
use crate::{audit, reload, systemd};

/// The least time the background tasks get to end once cancelled, even when draining the
/// connections used up [`SHUTDOWN_GRACE`]: they stop as soon as they see their token.
pub const TASKS_GRACE: Duration = Duration::from_secs(1);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("refusing server.state_dir: {0}")]
    StateDir(#[source] DirError),
    #[error("cannot open the audit file: {source}")]
    Audit { path: PathBuf, source: OpenError },
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("container endpoint: {0}")]
    Container(String),
    #[error("cannot listen for admin requests: {source}")]
    Admin {
        admin: AdminListen,
        source: io::Error,
    },
    #[error("cannot load the token key: {0}")]
    TokenKey(#[source] KeyError),
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
}

impl StartError {
    /// Logs the error, with the file or listener it concerns as a field.
    pub fn log(&self) {
        match self {
            StartError::Audit { path, .. } => tracing::error!(path = %path.display(), "{self}"),
            StartError::Admin { admin, .. } => tracing::error!(admin = %admin, "{self}"),
            _ => tracing::error!("{self}"),
        }
    }
}

/// Checks the state directory (it must be the daemon's, reached without a link; one others may
/// read is narrowed, and said so) and starts the audit sink. Call it before anything else
/// writes into the directory: before [`Listeners::bind`] (the admin socket is there by default).
pub fn open_audit(config: &Config, audit: Unstarted) -> Result<AuditSink, StartError> {
    let state_dir = &config.server.state_dir;
    let (_, narrowed) = SafeDir::private(state_dir).map_err(StartError::StateDir)?;
    let seal = config.audit.seal.then(|| SealSettings {
        state_dir: state_dir.clone(),
        policy: EpochPolicy {
            every: config.audit.seal_epoch,
            events: config.audit.seal_epoch_events,
        },
    });
    let sink = audit
        .start(&config.audit.path, seal)
        .map_err(|source| StartError::Audit {
            path: config.audit.path.clone(),
            source,
        })?;
    if let Some(mode) = narrowed {
        safe_dir::report_narrowed(state_dir, mode);
    }
    Ok(sink)
}

/// The daemon's bound listeners.
pub struct Listeners {
    pub imds: Vec<TcpListener>,
    /// Empty without `[container]`.
    pub container: Vec<TcpListener>,
    pub admin: AdminListener,
}

impl Listeners {
    /// Binds the IMDS addresses, the container endpoint's and the admin listener, in that order.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let hop_limit = config.server.hop_limit;
        let imds = server::bind(&config.server.listen, hop_limit).await?;
        let container = match &config.container {
            None => Vec::new(),
            Some(c) => server::bind(&c.listen, hop_limit)
                .await
                .map_err(|e| StartError::Container(e.to_string()))?,
        };
        let admin = admin::bind(&config.admin)
            .await
            .map_err(|source| StartError::Admin {
                admin: config.admin.clone(),
                source,
            })?;
        Ok(Self {
            imds,
            container,
            admin,
        })
    }
}

/// What the daemon uses besides its config and listeners; tests pass fakes.
pub struct Services {
    /// Where credentials come from: STS, or a fake.
    pub source: Arc<dyn CredentialSource>,
    pub clock: Arc<dyn Clock>,
    /// Reload requests: SIGHUP for the binary.
    pub hangups: Hangups,
    /// The started sink ([`open_audit`]): reopened on every reload, closed last.
    pub audit: Option<AuditSink>,
    /// Print one `listening on ADDR` line per listener on stdout once serving (IMDS first,
    /// then the container endpoint, each in config order), so scripts and tests can use port 0.
    pub announce: bool,
    /// Ping systemd's watchdog at half this interval, from READY=1 on.
    pub watchdog: Option<Duration>,
    /// The daemon's own credential source, loaded (its upkeep runs under the daemon's tree);
    /// `None` in tests that give `source` directly.
    pub own: Option<Arc<Source>>,
}

/// A started daemon: serving, until [`Daemon::run`]'s shutdown future completes.
pub struct Daemon {
    state: AppState,
    tasks: Tasks,
    serving: Serving,
    audit: Option<AuditSink>,
    addrs: Vec<SocketAddr>,
}

/// How the daemon stopped: what was still running when the grace period ran out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stopped {
    pub open_connections: usize,
    /// Tasks of the shutdown tree still running, by name.
    pub tasks_left: BTreeMap<&'static str, usize>,
}

/// Starts the daemon on `listeners` and serves until `shutdown` completes; returns once it has
/// drained.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    services: Services,
) -> Result<Stopped, StartError> {
    Ok(start(config, listeners, services)
        .await?
        .run(shutdown)
        .await)
}

/// Everything [`run`] does before it waits for the shutdown future: the token key and store,
/// the shared state and its background work, the admin listener, the accept loops; then the
/// announcement, READY=1 and, only after it, the watchdog (a ping must never overtake READY).
pub async fn start(
    config: Config,
    listeners: Listeners,
    services: Services,
) -> Result<Daemon, StartError> {
    let Services {
        source,
        clock,
        hangups,
        audit,
        announce,
        watchdog,
        own,
    } = services;
    let token_key =
        TokenKey::load_or_create(&config.server.state_dir).map_err(StartError::TokenKey)?;
    let container_tokens = open_token_store(&config)?;
    let metrics = crate::metrics::install().map_err(StartError::Metrics)?;
    tracing::info!(
        config = %config.path.display(),
        apps = config.apps.len(),
        "imds-broker started"
    );
    let path = config.path.clone();
    let addrs: Vec<SocketAddr> = listeners
        .imds
        .iter()
        .chain(&listeners.container)
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let status = format!(
        "serving {} app(s) on {}",
        config.apps.len(),
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    audit::config_loaded(&path, config.apps.len(), 0);

    let tasks = Tasks::new();
    let own_settings = (config.source.clone(), config.sts.clone());
    let state = AppState::under(config, token_key, source, clock, tasks.child());
    if let Some(own) = own {
        own.start(&own_settings.0, &own_settings.1, &tasks);
        state.attach_source(own);
    }
    // Prefetch apps and the background refresher, then reloads on SIGHUP.
    state.start_refresher();
    let mut endpoints: Vec<_> = {
        let router = crate::imds::router(state.clone());
        listeners
            .imds
            .into_iter()
            .map(|l| (l, router.clone()))
            .collect()
    };
    if let Some(tokens) = container_tokens {
        let router = crate::container::start(&state, tokens);
        endpoints.extend(listeners.container.into_iter().map(|l| (l, router.clone())));
    }
    reload::spawn_reloader(state.clone(), path, hangups, audit.clone());
    tasks.spawn(
        "admin listener",
        admin::serve(
            listeners.admin,
            admin::router(state.clone(), metrics),
            tasks.token().clone(),
        ),
    );
    let serving = server::start(&state, endpoints, &tasks);
    // Only now is everything listening (IMDS and admin): say so, to scripts and to systemd.
    if announce {
        announce_addrs(&addrs);
    }
    systemd::ready(&status);
    // After READY=1: a ping from a worker thread could otherwise overtake it.
    if let Some(interval) = watchdog {
        tasks.spawn(
            "systemd watchdog",
            systemd::watchdog(interval, tasks.token().clone()),
        );
    }
    Ok(Daemon {
        state,
        tasks,
        serving,
        audit,
        addrs,
    })
}

impl Daemon {
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The root of the shutdown tree: every task the daemon runs.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// The IMDS listeners' addresses, then the container endpoint's.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Serves until `shutdown` completes, then drains (see the module documentation) and
    /// returns what was still running when the grace period ran out.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Stopped {
        shutdown.await;
        systemd::stopping();
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let open_connections = self.serving.drain(deadline).await;
        let deadline = deadline.max(Instant::now() + TASKS_GRACE);
        // Nothing can ask for credentials any more: the refresher, STS workers, reloader and
        // token rotation.
        let _ = tokio::time::timeout_at(deadline, self.state.stop_background()).await;
        // Then what answered and pinged while the rest drained: the admin listener, the
        // watchdog (and anything left above).
        self.tasks.cancel();
        let _ = tokio::time::timeout_at(deadline, self.tasks.wait()).await;
        let tasks_left = self.tasks.running();
        if !tasks_left.is_empty() {
            tracing::warn!(
                tasks = ?tasks_left,
                "tasks still running after the shutdown grace period; leaving them"
            );
        }
        // Everything audited is written and its sealing epoch ended: the key left on disk
        // cannot re-seal any of it.
        if let Some(audit) = &self.audit {
            audit.close();
        }
        tracing::info!("stopped");
        Stopped {
            open_connections,
            tasks_left,
        }
    }
}

/// The container endpoint's token store (with the tokens of an earlier run), when
/// `[container]` is configured.
fn open_token_store(config: &Config) -> Result<Option<Arc<TokenStore>>, StartError> {
    let Some(settings) = &config.container else {
        return Ok(None);
    };
    token_file::ensure_token_dir(&settings.token_dir)
        .map_err(|e| StartError::Container(format!("{}: {e}", settings.token_dir.display())))?;
    let tokens = TokenStore::open(&config.server.state_dir)
        .map_err(|e| StartError::Container(e.to_string()))?;
    Ok(Some(Arc::new(tokens)))
}

fn announce_addrs(addrs: &[SocketAddr]) {
    let mut out = std::io::stdout().lock();
    for addr in addrs {
        let _ = writeln!(out, "listening on {addr}");
    }
    let _ = out.flush();
}

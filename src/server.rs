//! Listeners and connections: binds the configured addresses, resolves each accepted
//! connection's caller once, serves HTTP/1.1 on it with tight limits, and drains on shutdown.
//! Accept loops run in the shutdown tree; connections are watched by a graceful-shutdown
//! counter, so the drain can give them a deadline.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use metrics::Gauge;
use std::collections::HashMap;
use std::sync::Mutex;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::audit;
use crate::config::Limits;
use crate::identity::container::Meta;
use crate::identity::exe_digest::ExeDigests;
use crate::identity::netns::{Namespaces, Refresh};
use crate::identity::{self, Caller, ConnectionInfo, Resolver};
use crate::policy;
use crate::runtime::Runtime;
use crate::shutdown::Tasks;
use crate::state::AppState;

/// A client must send a complete request head within this time, and an idle keep-alive
/// connection is closed after it: slow or silent clients cannot hold connections open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// IMDS requests are a request line and a few short headers.
pub const MAX_HEADERS: usize = 32;
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long in-flight requests get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Descriptors kept back from connections, whatever the limit: the audit file, the listeners
/// (IMDS, container endpoint, admin) and the admin's own connections, the netlink socket each
/// caller lookup opens and the /proc handles it reads (one or two per connection being
/// identified at once), the container runtime's sockets, the runtime's epoll and eventfds.
/// Without them, a full house of connections would make every new caller's identification fail.
pub const DESCRIPTOR_RESERVE_MIN: u64 = 64;
/// The share of a large descriptor limit kept back instead, when it is more than the minimum:
/// lookups run in parallel with the connections, so their need grows with the load.
pub const DESCRIPTOR_RESERVE_PERCENT: u64 = 10;
/// When descriptors or connection slots run short, connections that have sent no complete
/// request for this long are all closed at once (a client sends its request head within
/// milliseconds of connecting); if none is this old, the single oldest such connection is.
pub const SHED_IDLE_AGE: Duration = Duration::from_secs(1);

/// The descriptors kept back from connections under a limit of `nofile`.
pub fn descriptor_reserve(nofile: u64) -> u64 {
    DESCRIPTOR_RESERVE_MIN.max(nofile.saturating_mul(DESCRIPTOR_RESERVE_PERCENT) / 100)
}

/// `limits.max_connections` as configured and as it is enforced under the descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCap {
    pub configured: u32,
    pub effective: u32,
    /// The soft RLIMIT_NOFILE it was fitted to; `None`: unlimited.
    pub nofile: Option<u64>,
}

impl ConnectionCap {
    /// `configured`, or less if it does not fit `nofile` with [`descriptor_reserve`] kept back
    /// (always at least one connection).
    pub fn fit(configured: u32, nofile: Option<u64>) -> Self {
        let effective = match nofile {
            None => configured,
            Some(nofile) => {
                let fits = nofile.saturating_sub(descriptor_reserve(nofile)).max(1);
                u32::try_from(fits).map_or(configured, |fits| configured.min(fits))
            }
        };
        Self {
            configured,
            effective,
            nofile,
        }
    }

    /// [`ConnectionCap::fit`] to the process's soft descriptor limit now.
    pub fn for_this_process(configured: u32) -> Self {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        Self::fit(configured, limit.current)
    }

    /// What to warn at start when the configured value was lowered.
    pub fn warning(&self) -> Option<String> {
        let nofile = self.nofile?;
        (self.effective < self.configured).then(|| {
            format!(
                "limits.max_connections = {} does not fit the descriptor limit (RLIMIT_NOFILE {nofile}, {} kept for the daemon's own files and sockets): at most {} connections are kept open",
                self.configured,
                descriptor_reserve(nofile),
                self.effective
            )
        })
    }
}

/// The soft descriptor limit before and after [`raise_descriptor_limit`], and the hard one
/// (`None`: unlimited).
#[derive(Debug, Clone, Copy)]
pub struct DescriptorLimit {
    pub before: Option<u64>,
    pub now: Option<u64>,
    pub hard: Option<u64>,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (to `fs.nr_open` if the hard limit is
/// unlimited): systemd and most shells start services at 1024 soft, far below what the hard
/// limit allows.
pub fn raise_descriptor_limit() -> io::Result<DescriptorLimit> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let target = limit.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|n| n.trim().parse().ok())
    });
    let mut result = DescriptorLimit {
        before: limit.current,
        now: limit.current,
        hard: limit.maximum,
    };
    if target.is_none() || target == limit.current {
        return Ok(result);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: target,
            maximum: limit.maximum,
        },
    )?;
    result.now = getrlimit(Resource::Nofile).current;
    Ok(result)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Binds every address, or fails naming the one that could not be bound. Every packet the
/// listeners and their connections send leaves with `hop_limit` as IP TTL / IPv6 hop limit,
/// the SYN-ACK included, so a client more than that many routers away cannot even connect.
pub async fn bind(addrs: &[SocketAddr], hop_limit: u32) -> Result<Vec<TcpListener>, BindError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .and_then(|l| set_hop_limit(&l, addr, hop_limit).map(|()| l))
            .map_err(|source| BindError { addr, source })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn set_hop_limit(listener: &TcpListener, addr: SocketAddr, hops: u32) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    match addr {
        SocketAddr::V4(_) => socket.set_ttl_v4(hops),
        SocketAddr::V6(_) => {
            socket.set_unicast_hops_v6(hops)?;
            // A dual-stack socket also carries IPv4 connections.
            if !socket.only_v6()? {
                socket.set_ttl_v4(hops)?;
            }
            Ok(())
        }
    }
}

/// Open connections, in total and per caller identity, and the registry that can shed them.
struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_caller: Mutex<HashMap<Arc<str>, u32>>,
    max_per_caller: u32,
    /// [`crate::metrics::OPEN_CONNECTIONS`], its handle kept (one atomic add per connection).
    open: Gauge,
    /// Every open connection by accept order (oldest first), holding its place under the total
    /// limit. Locked once when a connection opens and once when it ends, never per request.
    registry: Mutex<BTreeMap<u64, Tracked>>,
    next_id: AtomicU64,
}

/// A connection as the registry sees it.
struct Tracked {
    opened: Instant,
    /// Set once a request head has been read: from then on the connection is not idle.
    served: Arc<AtomicBool>,
    /// Closes the connection (its task drops the socket).
    cancel: CancellationToken,
    /// Given back as soon as the connection is shed, before its task has closed the socket:
    /// the descriptor reserve covers the moment in between.
    _slot: OpenSlot,
}

/// An admitted connection's handle on its registry entry; the entry goes when it is dropped.
struct Admitted {
    limits: Arc<ConnectionLimits>,
    id: u64,
    served: Arc<AtomicBool>,
    cancel: CancellationToken,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limits
            .registry
            .lock()
            .expect("connection registry lock")
            .remove(&self.id);
    }
}

/// A connection's place under the total limit, counted as open while it is held.
struct OpenSlot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// Holds one caller's connection slot; gives it back when the connection ends.
struct CallerSlot {
    limits: Arc<ConnectionLimits>,
    key: Arc<str>,
}

impl ConnectionLimits {
    /// `max_connections` is the fitted [`ConnectionCap::effective`], not the configured value.
    fn new(limits: Limits, max_connections: u32) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_connections as usize)),
            per_caller: Mutex::new(HashMap::new()),
            max_per_caller: limits.max_connections_per_caller,
            open: metrics::gauge!(crate::metrics::OPEN_CONNECTIONS),
            registry: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// A new connection's place: under the total limit if one is free, else after shedding
    /// idle connections ([`ConnectionLimits::shed_idle`]); `None` if there is none to shed.
    fn admit(self: &Arc<Self>, now: Instant) -> Option<Admitted> {
        let slot = match self.open() {
            Some(slot) => slot,
            None => {
                let shed = self.shed_idle(now);
                if shed > 0 {
                    tracing::warn!(
                        shed,
                        "connection limit reached: closed connections that had sent no request"
                    );
                }
                self.open()?
            }
        };
        let served = Arc::new(AtomicBool::new(false));
        let cancel = CancellationToken::new();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.registry
            .lock()
            .expect("connection registry lock")
            .insert(
                id,
                Tracked {
                    opened: now,
                    served: served.clone(),
                    cancel: cancel.clone(),
                    _slot: slot,
                },
            );
        Some(Admitted {
            limits: self.clone(),
            id,
            served,
            cancel,
        })
    }

    /// Closes the connections that have not sent a complete request head: all that are
    /// [`SHED_IDLE_AGE`] old or older, or if there is none, the oldest. Their places under the
    /// total limit are free when this returns. Returns how many were closed.
    fn shed_idle(&self, now: Instant) -> usize {
        let mut registry = self.registry.lock().expect("connection registry lock");
        let idle: Vec<(u64, Instant)> = registry
            .iter()
            .filter(|(_, t)| !t.served.load(Ordering::Relaxed))
            .map(|(&id, t)| (id, t.opened))
            .collect();
        let mut victims: Vec<u64> = idle
            .iter()
            .filter(|(_, opened)| now.saturating_duration_since(*opened) >= SHED_IDLE_AGE)
            .map(|&(id, _)| id)
            .collect();
        if victims.is_empty() {
            victims.extend(idle.first().map(|&(id, _)| id));
        }
        for id in &victims {
            if let Some(tracked) = registry.remove(id) {
                tracked.cancel.cancel();
            }
        }
        victims.len()
    }

    /// A place under the total limit, if one is free.
    fn open(&self) -> Option<OpenSlot> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        self.open.increment(1.0);
        Some(OpenSlot {
            _permit: permit,
            open: self.open.clone(),
        })
    }

    fn claim(self: &Arc<Self>, key: Arc<str>) -> Option<CallerSlot> {
        let mut open = self.per_caller.lock().expect("connection count lock");
        let count = open.entry(key.clone()).or_default();
        if *count >= self.max_per_caller {
            return None;
        }
        *count += 1;
        Some(CallerSlot {
            limits: self.clone(),
            key,
        })
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .per_caller
            .lock()
            .expect("connection count lock");
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Everything that identifies callers, shared by every connection.
struct Identify {
    resolver: Arc<Resolver>,
    digests: Arc<ExeDigests>,
    /// The container runtime's API, with `[containers]`.
    runtime: Option<Arc<Runtime>>,
}

impl Identify {
    /// Who is on the other end of `peer -> local`, as far as the current rules need to know;
    /// `None` if the lookup itself failed.
    async fn identify(
        &self,
        state: &AppState,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<Caller> {
        let config = state.config();
        let caller = self
            .resolver
            .resolve_async(peer, local, crate::policy::needs(&config.apps))
            .await?;
        let caller = if policy::wants_container_meta(&config.apps, &caller) {
            with_container_meta(caller, self.runtime.as_deref()).await
        } else {
            caller
        };
        Some(if policy::wants_exe_hash(&config.apps, &caller) {
            identity::with_exe_digest(caller, &self.digests).await
        } else {
            caller
        })
    }
}

/// The resolver `config` asks for: with `[containers]`, one that also looks in the host's other
/// network namespaces and recognises containers.
fn resolver(config: &crate::config::Config) -> Resolver {
    if config.containers.is_none() {
        return Resolver::new();
    }
    match Namespaces::new() {
        Ok(namespaces) => Resolver::with_containers(Arc::new(namespaces)),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the daemon's own network namespace: callers in other namespaces are treated as remote");
            Resolver::new()
        }
    }
}

/// `caller` with what the container runtime says about its container. A runtime that cannot
/// answer leaves the reason instead: rules that need the answer then refuse the caller.
async fn with_container_meta(mut caller: Caller, runtime: Option<&Runtime>) -> Caller {
    let Some(container) = (match &mut caller {
        Caller::Local(local) => local.container.as_mut(),
        _ => None,
    }) else {
        return caller;
    };
    let id = container.reference.id.clone();
    container.meta = match runtime {
        None => Meta::Unavailable("no container runtime is configured".into()),
        Some(runtime) => match runtime.inspect(&id).await {
            Ok(meta) if *meta.id == *id => Meta::Known(meta),
            Ok(meta) => Meta::Unavailable(
                format!("the runtime answered for {} when asked about {id}", meta.id).into(),
            ),
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "container runtime did not describe a caller's container; rules that need it refuse the caller");
                Meta::Unavailable(e.to_string().into())
            }
        },
    };
    caller
}

/// How often the namespace index is refreshed when no caller asks: the sockets it keeps hold
/// their namespaces alive, so a stopped container's namespace is let go within this long.
const NAMESPACE_SWEEP: std::time::Duration = std::time::Duration::from_secs(30);

async fn sweep_namespaces(namespaces: Arc<Namespaces>, stop: tokio_util::sync::CancellationToken) {
    loop {
        namespaces
            .refresh_since_with(std::time::Instant::now(), Refresh::Full)
            .await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(NAMESPACE_SWEEP) => {}
        }
    }
}

/// What a refused connection gets before it is closed: it never reached HTTP routing.
const REFUSED_CONNECTION: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nServer: EC2ws\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The accept loops, running; [`Serving::drain`] stops them.
pub struct Serving {
    accepting: Tasks,
    graceful: Arc<GracefulShutdown>,
}

/// Starts serving each listener's router (IMDS, the container endpoint): one accept loop per
/// listener, under a child of `tasks`. Every connection is identified the same way, and the
/// connection limits are shared: a caller cannot double its share by using both endpoints.
pub fn start(
    state: &AppState,
    endpoints: Vec<(TcpListener, axum::Router)>,
    tasks: &Tasks,
) -> Serving {
    let config = state.config();
    let identify = Arc::new(Identify {
        resolver: Arc::new(resolver(&config)),
        digests: Arc::new(ExeDigests::from_limits(&config.limits)),
        runtime: config
            .containers
            .as_ref()
            .map(|c| Arc::new(Runtime::new(c.runtime_sockets.clone()))),
    });
    let cap = ConnectionCap::for_this_process(config.limits.max_connections);
    if let Some(warning) = cap.warning() {
        tracing::warn!(
            configured = cap.configured,
            effective = cap.effective,
            "{warning}"
        );
    }
    let limits = Arc::new(ConnectionLimits::new(config.limits, cap.effective));
    let graceful = Arc::new(GracefulShutdown::new());
    let accepting = tasks.child();
    if let Some(runtime) = &identify.runtime {
        accepting.spawn(
            "container runtime events",
            runtime
                .clone()
                .watch_events(accepting.token().clone().cancelled_owned()),
        );
    }
    if let Some(namespaces) = identify.resolver.namespaces() {
        accepting.spawn(
            "network namespace sweep",
            sweep_namespaces(namespaces.clone(), accepting.token().clone()),
        );
    }
    for (listener, router) in endpoints {
        accepting.spawn(
            "accept loop",
            accept_loop(
                listener,
                state.clone(),
                identify.clone(),
                limits.clone(),
                router,
                graceful.clone(),
                accepting.token().clone(),
            ),
        );
    }
    Serving {
        accepting,
        graceful,
    }
}

impl Serving {
    /// Stops accepting (the listeners close), then gives in-flight requests until `deadline`
    /// to finish. Returns how many connections were still open then (they are left to end on
    /// their own).
    pub async fn drain(self, deadline: tokio::time::Instant) -> usize {
        tracing::info!("shutting down: no new connections");
        self.accepting.stop().await;
        let graceful = Arc::into_inner(self.graceful).expect("accept loops have ended");
        let open = graceful.count();
        if tokio::time::timeout_at(deadline, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                open_connections = open,
                grace_secs = SHUTDOWN_GRACE.as_secs(),
                "connections still open after the shutdown grace period; closing them"
            );
            return open;
        }
        0
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: AppState,
    identify: Arc<Identify>,
    limits: Arc<ConnectionLimits>,
    router: axum::Router,
    graceful: Arc<GracefulShutdown>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(admitted) = limits.admit(Instant::now()) else {
                    tracing::warn!(%peer, "connection refused: total connection limit reached");
                    tokio::spawn(refuse(stream));
                    continue;
                };
                let connection = serve_connection(
                    stream,
                    peer,
                    (admitted.served.clone(), limits.clone()),
                    state.clone(),
                    identify.clone(),
                    router.clone(),
                    graceful.watcher(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        () = admitted.cancel.cancelled() => {
                            tracing::debug!(%peer, "idle connection closed to make room");
                        }
                        () = connection => {}
                    }
                    drop(admitted);
                });
            }
            Err(e) => {
                // Out of descriptors: idle connections give theirs back before the next try.
                let shed = if out_of_descriptors(&e) {
                    limits.shed_idle(Instant::now())
                } else {
                    0
                };
                tracing::warn!(error = %e, shed, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// EMFILE (this process) or ENFILE (the whole system).
fn out_of_descriptors(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error()
        .is_some_and(|code| matches!(Errno::from_raw(code), Errno::EMFILE | Errno::ENFILE))
}

/// The address the client dialled. Behind a DNAT redirect (the EC2 deployment sends
/// 169.254.169.254:80 to the broker's loopback port) the client's socket is keyed by that
/// original destination, which conntrack remembers; without NAT it is the local address.
fn dialled_address(stream: &TcpStream, local: SocketAddr) -> SocketAddr {
    use nix::sys::socket::{getsockopt, sockopt};
    let original = match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).map(|a| {
            SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            ))
        }),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst)
            .map(|a| SocketAddr::from((a.sin6_addr.s6_addr, u16::from_be(a.sin6_port)))),
    };
    original.unwrap_or(local)
}

/// The HTTP/1.1 settings of every IMDS connection: header timeout, header count and size.
pub fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
}

/// `//latest/api/token` → `/latest/api/token`: the AWS SDK for JavaScript v2 doubles the slash
/// when its configured endpoint ends in `/`, which AWS CLI v2 needs. Only the leading run of
/// slashes: the rest of the path is the routes' to judge.
fn single_leading_slash(uri: &mut axum::http::Uri) {
    let path = uri.path();
    if !path.starts_with("//") {
        return;
    }
    let rest = path.trim_start_matches('/');
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    // Still an origin-form target (a path), so this cannot fail; keep the original if it did.
    if let Ok(single) = format!("/{rest}{query}").parse() {
        *uri = single;
    }
}

async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, stream.write_all(REFUSED_CONNECTION)).await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    (served, limits): (Arc<AtomicBool>, Arc<ConnectionLimits>),
    state: AppState,
    identify: Arc<Identify>,
    router: axum::Router,
    watcher: Watcher,
) {
    let local = match stream.local_addr() {
        Ok(local) => dialled_address(&stream, local),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "connection gone before it was identified");
            return;
        }
    };
    // Once per connection: every request on a keep-alive connection comes from the same socket,
    // so from the same owner.
    let Some(caller) = identify.identify(&state, peer, local).await else {
        tracing::error!(%peer, "identifying the caller failed");
        return;
    };
    tracing::debug!(%caller, %local, "connection accepted");
    let info = ConnectionInfo::new(caller, local);
    let Some(_slot) = limits.claim(info.binding.clone()) else {
        audit::connection_refused(&info, "too many open connections");
        refuse(stream).await;
        return;
    };
    let service = router.map_request(move |mut request: axum::http::Request<Incoming>| {
        // A plain store to this connection's own flag: no lock, no contention.
        served.store(true, Ordering::Relaxed);
        request.extensions_mut().insert(info.clone());
        single_leading_slash(request.uri_mut());
        request
    });
    let connection =
        http1_builder().serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_limits() -> Limits {
        Limits {
            requests_per_second: 1,
            burst: 1,
            max_connections: 2,
            max_connections_per_caller: 2,
            exe_hash_max_mib: 1,
            exe_hash_mib_per_second: 1,
        }
    }

    #[test]
    fn max_connections_is_fitted_below_the_descriptor_limit_with_a_reserve() {
        assert_eq!(descriptor_reserve(128), 64);
        assert_eq!(descriptor_reserve(1024), 102);
        assert_eq!(descriptor_reserve(65536), 6553);
        // Fits: unchanged, no warning.
        let fits = ConnectionCap::fit(4096, Some(65536));
        assert_eq!(fits.effective, 4096);
        assert_eq!(fits.warning(), None);
        assert_eq!(ConnectionCap::fit(4096, None).effective, 4096);
        assert_eq!(ConnectionCap::fit(100, Some(256)).effective, 100);
        // Does not fit: what is left after the reserve.
        assert_eq!(ConnectionCap::fit(4096, Some(128)).effective, 64);
        assert_eq!(ConnectionCap::fit(4096, Some(256)).effective, 192);
        assert_eq!(ConnectionCap::fit(4096, Some(1024)).effective, 922);
        // Never none at all.
        assert_eq!(ConnectionCap::fit(4096, Some(10)).effective, 1);
        assert_eq!(
            ConnectionCap::fit(4096, Some(1024)).warning().unwrap(),
            "limits.max_connections = 4096 does not fit the descriptor limit (RLIMIT_NOFILE 1024, \
             102 kept for the daemon's own files and sockets): at most 922 connections are kept open"
        );
    }

    #[test]
    fn only_running_out_of_descriptors_sheds_on_a_failed_accept() {
        use nix::errno::Errno;
        for (errno, out) in [
            (Errno::EMFILE, true),
            (Errno::ENFILE, true),
            (Errno::ECONNABORTED, false),
            (Errno::ENOBUFS, false),
        ] {
            let e = io::Error::from_raw_os_error(errno as i32);
            assert_eq!(out_of_descriptors(&e), out, "{errno}");
        }
    }

    #[test]
    fn idle_connections_are_shed_oldest_first_and_all_old_ones_at_once() {
        let limits = Arc::new(ConnectionLimits::new(test_limits(), 2));
        let t0 = Instant::now();
        let a = limits.admit(t0).unwrap();
        let b = limits.admit(t0).unwrap();
        // Full, every connection young: only the oldest idle one goes.
        let c = limits.admit(t0).unwrap();
        assert!(a.cancel.is_cancelled());
        assert!(!b.cancel.is_cancelled());
        // One that has sent a request is never shed.
        b.served.store(true, Ordering::Relaxed);
        let d = limits.admit(t0 + SHED_IDLE_AGE).unwrap();
        assert!(c.cancel.is_cancelled() && !b.cancel.is_cancelled());
        d.served.store(true, Ordering::Relaxed);
        assert!(
            limits.admit(t0 + SHED_IDLE_AGE * 2).is_none(),
            "nothing idle"
        );
        // A connection that ends gives its place back.
        drop(d);
        let e = limits.admit(t0).unwrap();
        drop((a, c));
        assert!(!e.cancel.is_cancelled());
        // All idle ones past the age go together.
        let limits = Arc::new(ConnectionLimits::new(test_limits(), 3));
        let old: Vec<_> = (0..3).map(|_| limits.admit(t0).unwrap()).collect();
        assert_eq!(limits.shed_idle(t0 + SHED_IDLE_AGE), 3);
        assert!(old.iter().all(|c| c.cancel.is_cancelled()));
        assert_eq!(limits.total.available_permits(), 3);
    }

    #[test]
    fn leading_slashes_collapse_to_one_and_nothing_else_changes() {
        for (from, to) in [
            ("//latest/api/token", "/latest/api/token"),
            ("///latest/meta-data/", "/latest/meta-data/"),
            ("//latest/meta-data/?x=1", "/latest/meta-data/?x=1"),
            ("/latest//meta-data/", "/latest//meta-data/"),
            ("/latest/api/token", "/latest/api/token"),
        ] {
            let mut uri: axum::http::Uri = from.parse().unwrap();
            single_leading_slash(&mut uri);
            assert_eq!(uri, to, "{from}");
        }
    }

    #[test]
    fn open_connections_are_counted_while_their_slot_is_held_and_stop_at_the_limit() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let limits = ConnectionLimits::new(test_limits(), 2);
        let open = || {
            let line = format!("{} ", crate::metrics::OPEN_CONNECTIONS);
            let text = metrics.render();
            text.lines()
                .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
                .unwrap_or_else(|| panic!("{line}not in\n{text}"))
        };
        assert_eq!(open(), "0");
        let first = limits.open().unwrap();
        let second = limits.open().unwrap();
        assert!(limits.open().is_none(), "over max_connections");
        assert_eq!(open(), "2");
        drop(first);
        assert_eq!(open(), "1");
        drop(second);
        assert_eq!(open(), "0");
    }
}

//! Listeners and connections: binds the configured addresses, resolves each accepted
//! connection's caller once, serves HTTP/1.1 on it with tight limits, and drains on shutdown.
//! Accept loops run in the shutdown tree; connections are watched by a graceful-shutdown
//! counter, so the drain can give them a deadline.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// Open connections, in total and per caller identity.
struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_caller: Mutex<HashMap<Arc<str>, u32>>,
    max_per_caller: u32,
    /// [`crate::metrics::OPEN_CONNECTIONS`], its handle kept (one atomic add per connection).
    open: Gauge,
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
    fn new(limits: Limits) -> Self {
        Self {
            total: Arc::new(Semaphore::new(limits.max_connections as usize)),
            per_caller: Mutex::new(HashMap::new()),
            max_per_caller: limits.max_connections_per_caller,
            open: metrics::gauge!(crate::metrics::OPEN_CONNECTIONS),
        }
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
    let limits = Arc::new(ConnectionLimits::new(state.config().limits));
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
                let Some(slot) = limits.open() else {
                    tracing::warn!(%peer, "connection refused: total connection limit reached");
                    tokio::spawn(refuse(stream));
                    continue;
                };
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    (slot, limits.clone()),
                    state.clone(),
                    identify.clone(),
                    router.clone(),
                    graceful.watcher(),
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
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
    (_slot, limits): (OpenSlot, Arc<ConnectionLimits>),
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
        let limits = ConnectionLimits::new(Limits {
            requests_per_second: 1,
            burst: 1,
            max_connections: 2,
            max_connections_per_caller: 2,
            exe_hash_max_mib: 1,
            exe_hash_mib_per_second: 1,
        });
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

//! The stage endpoint: a reverse proxy on a stable loopback port that forwards each HTTP/1.1 request to one
//! backend of the live group, follows a routes file that kiln rewrites to switch groups, and reports the applied
//! generation and per-backend in-flight counts in a status file so kiln knows when an old group is drained.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};

/// Request bodies up to this size are buffered so a failed attempt can be replayed on another backend.
pub const MAX_BUFFERED_BODY: usize = 1 << 20;
const CONTROL_TICK: Duration = Duration::from_millis(10);
const WAIT_TICK: Duration = Duration::from_millis(5);
/// A backend that refused a connection is tried last for this long, so a dead backend costs one refused connect
/// per interval instead of one per request.
const DOWN_FOR: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Shorter than the idle timeout of the example service, so the proxy is the side that closes an idle pooled
/// connection and never sends a request onto one the backend is closing.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Also bounds how long an idle client keep-alive connection is kept.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// After SIGTERM, requests already in progress get this long to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot encode {what}: {source}")]
    Encode { what: &'static str, source: serde_json::Error },
    #[error("cannot start the proxy: {source}")]
    Runtime { source: io::Error },
    #[error("cannot listen on 127.0.0.1:{port}: {}", bind_problem(*port, source))]
    Bind { port: u16, source: io::Error },
    #[error("cannot install the SIGTERM/SIGINT handler: {source}")]
    Signal { source: io::Error },
    #[error("the proxy has not applied routes generation {generation} after {waited:?} (its status shows {seen:?})")]
    ApplyTimeout { generation: u64, waited: Duration, seen: Option<u64> },
    #[error("backends still have requests in flight after {waited:?}: {busy:?}{}",
        if *no_status { " (the proxy wrote no status)" } else { "" })]
    DrainTimeout { waited: Duration, busy: BTreeMap<u16, u64>, no_status: bool },
}

/// Why a listener could not bind, in words that name the port: "address already in use" alone does not say that
/// another process holds the stage's port.
pub fn bind_problem(port: u16, source: &io::Error) -> String {
    if source.kind() == io::ErrorKind::AddrInUse {
        format!("another process already listens on port {port} ({source}); stop it or give the stage another port")
    } else {
        source.to_string()
    }
}

/// Where requests go. `generation` must grow with every write so waiters can tell old routes from new.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Routes {
    pub generation: u64,
    /// Loopback ports.
    pub backends: Vec<u16>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ProxyStatus {
    pub pid: i32,
    pub port: u16,
    /// The last routes generation applied.
    pub generation: u64,
    /// Requests in flight per backend port; every current backend is listed, an old one until it is idle.
    pub in_flight: BTreeMap<u16, u64>,
}

/// Writes `routes` atomically: a reader sees the old file or the new one, never a mix.
pub fn write_routes(routes_file: &Path, routes: &Routes) -> Result<(), ProxyError> {
    let text = serde_json::to_vec(routes).map_err(|source| ProxyError::Encode { what: "routes", source })?;
    write_atomic(routes_file, &text, true)
}

pub fn read_status(status_file: &Path) -> Option<ProxyStatus> {
    serde_json::from_slice(&std::fs::read(status_file).ok()?).ok()
}

/// Waits until the status shows `generation` (or a later one) applied; returns how long that took.
pub fn wait_applied(status_file: &Path, generation: u64, timeout: Duration) -> Result<Duration, ProxyError> {
    let start = Instant::now();
    loop {
        let seen = read_status(status_file).map(|s| s.generation);
        if seen.is_some_and(|g| g >= generation) {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(ProxyError::ApplyTimeout { generation, waited: start.elapsed(), seen });
        }
        std::thread::sleep(WAIT_TICK);
    }
}

/// Waits until no request is in flight to any of `backends`. Meaningful after `wait_applied` for routes that no
/// longer hold them: from then on the proxy sends them nothing new, so their counts only fall.
pub fn wait_drained(status_file: &Path, backends: &[u16], timeout: Duration) -> Result<(), ProxyError> {
    let start = Instant::now();
    loop {
        let status = read_status(status_file);
        let busy: BTreeMap<u16, u64> = status
            .as_ref()
            .map(|s| backends.iter().filter_map(|p| s.in_flight.get(p).filter(|&&n| n > 0).map(|&n| (*p, n))).collect())
            .unwrap_or_default();
        if status.is_some() && busy.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(ProxyError::DrainTimeout { waited: start.elapsed(), busy, no_status: status.is_none() });
        }
        std::thread::sleep(WAIT_TICK);
    }
}

fn write_atomic(path: &Path, data: &[u8], durable: bool) -> Result<(), ProxyError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let err = |source| ProxyError::Write { path: path.to_path_buf(), source };
    let file_name = path.file_name().ok_or_else(|| err(io::Error::other("no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.{}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(data)?;
        if durable {
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

// ---- shared routing state -------------------------------------------------------------------------------------

struct State {
    routes: Routes,
    cursor: usize,
    in_flight: BTreeMap<u16, u64>,
    down_until: BTreeMap<u16, Instant>,
}

/// Routes and in-flight counts live under one lock: a backend is chosen and counted in the same critical section
/// as a routes switch, so once a switch is applied no request can still be on its way to an old backend uncounted.
struct Shared {
    state: Mutex<State>,
    /// Bumped on every change the status file reports, so the control thread writes only when needed.
    changes: AtomicU64,
}

enum Pick {
    To(Lease),
    NoBackends,
    Exhausted,
}

impl Shared {
    fn new() -> Shared {
        let state = State {
            routes: Routes { generation: 0, backends: Vec::new() },
            cursor: 0,
            in_flight: BTreeMap::new(),
            down_until: BTreeMap::new(),
        };
        Shared { state: Mutex::new(state), changes: AtomicU64::new(1) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, and the state stays consistent at every await-free step anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    fn apply(&self, routes: Routes) {
        let mut st = self.lock();
        let State { in_flight, down_until, .. } = &mut *st;
        in_flight.retain(|port, n| *n > 0 || routes.backends.contains(port));
        for port in &routes.backends {
            in_flight.entry(*port).or_insert(0);
        }
        down_until.retain(|port, _| routes.backends.contains(port));
        st.routes = routes;
        drop(st);
        self.changed();
    }

    /// Round-robin over the current backends, skipping those already tried for this request and preferring those
    /// that did not just refuse a connection.
    fn pick(self: &Arc<Self>, tried: &[u16]) -> Pick {
        let mut st = self.lock();
        let n = st.routes.backends.len();
        if n == 0 {
            return Pick::NoBackends;
        }
        let start = st.cursor;
        st.cursor = st.cursor.wrapping_add(1);
        let now = Instant::now();
        let order = (0..n).map(|i| st.routes.backends[(start + i) % n]).filter(|p| !tried.contains(p));
        let up = order.clone().find(|p| st.down_until.get(p).is_none_or(|&until| until <= now));
        let Some(port) = up.or_else(|| order.clone().next()) else {
            return Pick::Exhausted;
        };
        *st.in_flight.entry(port).or_insert(0) += 1;
        drop(st);
        self.changed();
        Pick::To(Lease { shared: Arc::clone(self), port })
    }

    fn mark_down(&self, port: u16) {
        let mut st = self.lock();
        if st.routes.backends.contains(&port) {
            st.down_until.insert(port, Instant::now() + DOWN_FOR);
        }
    }

    fn release(&self, port: u16) {
        let mut st = self.lock();
        let State { routes, in_flight, .. } = &mut *st;
        if let Some(n) = in_flight.get_mut(&port) {
            *n = n.saturating_sub(1);
            if *n == 0 && !routes.backends.contains(&port) {
                in_flight.remove(&port);
            }
        }
        drop(st);
        self.changed();
    }

    fn status(&self, port: u16) -> ProxyStatus {
        let st = self.lock();
        ProxyStatus {
            pid: std::process::id() as i32,
            port,
            generation: st.routes.generation,
            in_flight: st.in_flight.clone(),
        }
    }
}

/// One request's claim on a backend; counted in flight until dropped, which is when the response body has been
/// sent to the client or abandoned.
struct Lease {
    shared: Arc<Shared>,
    port: u16,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.release(self.port);
    }
}

// ---- bodies -----------------------------------------------------------------------------------------------------

/// A request body as sent to a backend: wholly buffered (replayable) or, past the buffer limit, the buffered
/// prefix followed by the rest of the client's stream (one attempt only).
enum OutBody {
    Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
    Stream { prefix: Option<Bytes>, rest: Incoming },
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            OutBody::Full { data, trailers } => {
                if let Some(d) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            OutBody::Stream { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full { data, trailers } => data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none(),
            OutBody::Stream { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            // With trailers the length must stay open so the message is sent chunked and the trailers survive.
            OutBody::Full { data, trailers: None } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            OutBody::Full { .. } => SizeHint::default(),
            OutBody::Stream { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

/// What the client receives: a backend's body, holding its lease until done, or a body made here.
enum RespBody {
    Upstream { inner: Incoming, _lease: Lease },
    Local(Option<Bytes>),
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Upstream { inner, .. } => Pin::new(inner).poll_frame(cx),
            RespBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Upstream { inner, .. } => inner.is_end_stream(),
            RespBody::Local(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Upstream { inner, .. } => inner.size_hint(),
            RespBody::Local(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

fn local_response(status: StatusCode, text: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::Local(Some(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Reads the body up to the buffer limit. Past it, returns the part read and the rest of the stream.
async fn buffer_body(mut body: Incoming, limit: usize) -> Result<OutBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(OutBody::Full { data: None, trailers: None });
    }
    if body.size_hint().lower() > limit as u64 {
        return Ok(OutBody::Stream { prefix: None, rest: body });
    }
    let mut buf = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                buf.extend_from_slice(&data);
                if buf.len() > limit {
                    return Ok(OutBody::Stream { prefix: Some(buf.freeze()), rest: body });
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok().or(trailers),
        }
    }
    Ok(OutBody::Full { data: Some(buf.freeze()), trailers })
}

// ---- forwarding -------------------------------------------------------------------------------------------------

/// Connection-level headers (RFC 9110 7.6.1) belong to one hop and are not forwarded, nor are the headers that the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"] {
        headers.remove(name);
    }
}

/// Methods a client may safely repeat (RFC 9110 9.2.2): only these are replayed after a backend may already have
/// received them. A request that never reached a backend (refused connect) is replayed whatever its method.
fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE)
}

struct Proxy {
    shared: Arc<Shared>,
    client: Client<HttpConnector, OutBody>,
}

impl Proxy {
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<RespBody>, Infallible> {
        let (parts, body) = req.into_parts();
        let mut body = match buffer_body(body, MAX_BUFFERED_BODY).await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::debug!(error = %e, "proxy: client request body failed");
                return Ok(local_response(StatusCode::BAD_REQUEST, "bad request body\n"));
            }
        };
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // hyper already answered any `Expect: 100-continue` while the body was read; the backend must not wait.
        if body.as_ref().is_some_and(|b| matches!(b, OutBody::Full { .. })) {
            headers.remove(header::EXPECT);
        }
        let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded) {
            headers.insert("x-forwarded-for", v);
        }
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string();

        let mut tried: Vec<u16> = Vec::new();
        loop {
            let lease = match self.shared.pick(&tried) {
                Pick::To(lease) => lease,
                Pick::NoBackends => return Ok(local_response(StatusCode::SERVICE_UNAVAILABLE, "no backends\n")),
                Pick::Exhausted => return Ok(local_response(StatusCode::BAD_GATEWAY, "no backend answered\n")),
            };
            tried.push(lease.port);
            let upstream = |out: OutBody, uri: Uri| {
                let mut req = Request::new(out);
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = uri;
                *req.version_mut() = Version::HTTP_11;
                *req.headers_mut() = headers.clone();
                if !req.headers().contains_key(header::HOST) {
                    if let Ok(host) = HeaderValue::from_str(&format!("127.0.0.1:{}", lease.port)) {
                        req.headers_mut().insert(header::HOST, host);
                    }
                }
                req
            };
            let (result, replayable) = match &body {
                Some(OutBody::Full { data, trailers }) => {
                    let out = OutBody::Full { data: data.clone(), trailers: trailers.clone() };
                    let Ok(uri) = format!("http://127.0.0.1:{}{target}", lease.port).parse::<Uri>() else {
                        return Ok(local_response(StatusCode::BAD_REQUEST, "bad request target\n"));
                    };
                    let result = self.client.request(upstream(out, uri)).await;
                    (result.map_err(|e| Failure { refused: e.is_connect(), error: format!("{e:?}") }), true)
                }
                _ => {
                    // A streamed body can be sent only once, so the connection is made before the body is
                    // committed to it: a refused connect still moves on to the next backend.
                    let stream = match connect(lease.port).await {
                        Ok(stream) => stream,
                        Err(e) => {
                            self.shared.mark_down(lease.port);
                            tracing::warn!(backend = lease.port, error = %e, "proxy: backend refused a connection");
                            continue;
                        }
                    };
                    let (Some(out), Ok(uri)) = (body.take(), target.parse::<Uri>()) else {
                        return Ok(local_response(StatusCode::BAD_REQUEST, "bad request target\n"));
                    };
                    let result = send_on(stream, upstream(out, uri)).await;
                    (result.map_err(|e| Failure { refused: false, error: format!("{e:?}") }), false)
                }
            };
            match result {
                Ok(resp) => {
                    let (mut rparts, inner) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    return Ok(Response::from_parts(rparts, RespBody::Upstream { inner, _lease: lease }));
                }
                Err(Failure { refused, error }) => {
                    if refused {
                        self.shared.mark_down(lease.port);
                    }
                    let retry = replayable && (refused || idempotent(&parts.method));
                    tracing::warn!(backend = lease.port, error, retry, "proxy: backend failed before answering");
                    drop(lease);
                    if !retry {
                        return Ok(local_response(StatusCode::BAD_GATEWAY, "backend failed\n"));
                    }
                }
            }
        }
    }
}

/// Why an attempt failed before any response came back.
struct Failure {
    /// The backend refused the connection, so it cannot have seen the request.
    refused: bool,
    error: String,
}

async fn connect(port: u16) -> io::Result<tokio::net::TcpStream> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends one request on its own connection, outside the pool.
async fn send_on(stream: tokio::net::TcpStream, req: Request<OutBody>) -> Result<Response<Incoming>, hyper::Error> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "proxy: streamed backend connection ended with an error");
        }
    });
    sender.send_request(req).await
}

// ---- the process --------------------------------------------------------------------------------------------------

pub(crate) static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_shutdown_signal(_: libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

pub(crate) fn install_signal_handlers() -> Result<(), ProxyError> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the struct is fully set.
        let r = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_shutdown_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(ProxyError::Signal { source: io::Error::last_os_error() });
        }
    }
    Ok(())
}

/// Where the proxy's listening socket comes from.
#[derive(Debug, Clone, Copy)]
pub enum Listen {
    /// Bind the stage's port itself.
    Port(u16),
    /// A socket already listening on `port`, inherited as this descriptor from the stage's supervisor, which keeps
    /// it open across restarts of the proxy so connections wait in its backlog meanwhile.
    Inherited { fd: std::os::fd::RawFd, port: u16 },
}

/// Binds the stage's port as the proxy does, for a supervisor that hands the socket on to its proxy.
pub fn bind_std(port: u16) -> Result<std::net::TcpListener, ProxyError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| ProxyError::Runtime { source })?;
    runtime.block_on(async { listen(port)?.into_std().map_err(|source| ProxyError::Bind { port, source }) })
}

/// Runs until SIGTERM or SIGINT, then stops accepting, lets requests in progress finish (up to a grace period),
/// removes the status file and returns.
pub fn serve(listen_on: Listen, routes_file: &Path, status_file: &Path) -> Result<(), ProxyError> {
    install_signal_handlers()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-proxy")
        .enable_all()
        .build()
        .map_err(|source| ProxyError::Runtime { source })?;
    let (listener, port) = match listen_on {
        Listen::Port(port) => (runtime.block_on(async { listen(port) })?, port),
        Listen::Inherited { fd, port } => {
            use std::os::fd::FromRawFd;
            // SAFETY: the supervisor passes a listening socket at this descriptor, which nothing else here owns.
            let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            let err = |source| ProxyError::Bind { port, source };
            std_listener.set_nonblocking(true).map_err(err)?;
            let _guard = runtime.enter();
            (tokio::net::TcpListener::from_std(std_listener).map_err(err)?, port)
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);

    let shared = Arc::new(Shared::new());
    let mut control = Control::new(routes_file, status_file, port);
    // Routes and status are in place before the first connection is accepted.
    control.tick(&shared);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let control_shared = Arc::clone(&shared);
    let control_thread = std::thread::Builder::new()
        .name("kiln-proxy-control".into())
        .spawn(move || {
            while !SHUTDOWN.load(Ordering::SeqCst) {
                std::thread::sleep(CONTROL_TICK);
                control.tick(&control_shared);
            }
            let _ = stop_tx.send(true);
            control
        })
        .map_err(|source| ProxyError::Runtime { source })?;

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .build(connector);
    let proxy = Arc::new(Proxy { shared: Arc::clone(&shared), client });

    runtime.block_on(accept_loop(listener, proxy, stop_rx));
    let control = control_thread.join().ok();
    drop(runtime);
    // A status left behind would claim a proxy that no longer runs.
    if let Some(control) = control {
        let _ = std::fs::remove_file(&control.status_file);
    }
    Ok(())
}

fn listen(port: u16) -> Result<tokio::net::TcpListener, ProxyError> {
    let err = |source| ProxyError::Bind { port, source };
    let socket = tokio::net::TcpSocket::new_v4().map_err(err)?;
    // A restarted proxy must get its stage's port back at once, even with old connections in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).map_err(err)?;
    socket.listen(1024).map_err(err)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).keep_alive(true);
    loop {
        tokio::select! {
            _ = stop.wait_for(|&s| s) => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of descriptors; the listener recovers once connections close.
                        tracing::warn!(error = %e, "proxy: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = Arc::clone(&proxy);
                let service = hyper::service::service_fn(move |req| Arc::clone(&proxy).handle(req, peer));
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "proxy: client connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("proxy: requests still in progress after the shutdown grace period");
    }
}

/// Follows the routes file and keeps the status file current; runs on its own thread so file I/O never stalls
/// request handling.
struct Control {
    routes_file: PathBuf,
    status_file: PathBuf,
    port: u16,
    last_routes: Option<Vec<u8>>,
    written: u64,
}

impl Control {
    fn new(routes_file: &Path, status_file: &Path, port: u16) -> Control {
        Control {
            routes_file: routes_file.to_path_buf(),
            status_file: status_file.to_path_buf(),
            port,
            last_routes: None,
            written: 0,
        }
    }

    fn tick(&mut self, shared: &Shared) {
        // Read and compared whole each tick: the file is tiny, and unlike mtime and size its bytes cannot miss
        // two quick writes of the same length.
        if let Ok(bytes) = std::fs::read(&self.routes_file) {
            if self.last_routes.as_deref() != Some(bytes.as_slice()) {
                match serde_json::from_slice::<Routes>(&bytes) {
                    Ok(routes) => {
                        let (generation, backends) = (routes.generation, &routes.backends);
                        tracing::info!(generation, ?backends, "proxy: routes applied");
                        shared.apply(routes);
                    }
                    Err(e) => {
                        let file = self.routes_file.display();
                        tracing::warn!(%file, error = %e, "proxy: routes file unreadable; keeping the current routes")
                    }
                }
                self.last_routes = Some(bytes);
            }
        }
        let changes = shared.changes.load(Ordering::SeqCst);
        if changes != self.written {
            let status = shared.status(self.port);
            let written = serde_json::to_vec(&status)
                .map_err(|source| ProxyError::Encode { what: "status", source })
                .and_then(|text| write_atomic(&self.status_file, &text, false));
            match written {
                Ok(()) => self.written = changes,
                Err(e) => tracing::warn!(error = %e, "proxy: cannot write status"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(shared: &Arc<Shared>, tried: &[u16]) -> Lease {
        match shared.pick(tried) {
            Pick::To(l) => l,
            Pick::NoBackends => panic!("no backends"),
            Pick::Exhausted => panic!("exhausted"),
        }
    }

    #[test]
    fn a_port_in_use_is_named_as_held_by_another_process() {
        let in_use = io::Error::from(io::ErrorKind::AddrInUse);
        let text = ProxyError::Bind { port: 18081, source: in_use }.to_string();
        assert!(text.starts_with("cannot listen on 127.0.0.1:18081: another process already listens on port 18081"));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(!ProxyError::Bind { port: 80, source: denied }.to_string().contains("another process"));
    }

    #[test]
    fn routes_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("routes.json");
        let routes = Routes { generation: 7, backends: vec![4000, 4001] };
        write_routes(&file, &routes).unwrap();
        let read: Routes = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(read, routes);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
    }

    #[test]
    fn picks_round_robin_and_skips_tried_backends() {
        let shared = Arc::new(Shared::new());
        assert!(matches!(shared.pick(&[]), Pick::NoBackends));
        shared.apply(Routes { generation: 1, backends: vec![1, 2, 3] });
        let ports: Vec<u16> = (0..6).map(|_| lease(&shared, &[]).port).collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3]);
        assert_eq!(lease(&shared, &[1, 2]).port, 3);
        assert!(matches!(shared.pick(&[1, 2, 3]), Pick::Exhausted));
    }

    #[test]
    fn a_refusing_backend_is_tried_last() {
        let shared = Arc::new(Shared::new());
        shared.apply(Routes { generation: 1, backends: vec![1, 2] });
        shared.mark_down(1);
        let ports: Vec<u16> = (0..4).map(|_| lease(&shared, &[]).port).collect();
        assert_eq!(ports, [2, 2, 2, 2]);
        assert_eq!(lease(&shared, &[2]).port, 1, "still used when nothing else is left");
    }

    #[test]
    fn in_flight_counts_follow_leases_across_a_switch() {
        let shared = Arc::new(Shared::new());
        shared.apply(Routes { generation: 1, backends: vec![1] });
        let old = lease(&shared, &[]);
        shared.apply(Routes { generation: 2, backends: vec![2] });
        let status = shared.status(9);
        assert_eq!(status.generation, 2);
        assert_eq!(status.in_flight, BTreeMap::from([(1, 1), (2, 0)]));
        let new = lease(&shared, &[]);
        assert_eq!(new.port, 2);
        drop(old);
        assert_eq!(shared.status(9).in_flight, BTreeMap::from([(2, 1)]), "an idle old backend is forgotten");
        drop(new);
        assert_eq!(shared.status(9).in_flight, BTreeMap::from([(2, 0)]));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("host", HeaderValue::from_static("example"));
        h.insert("content-length", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort();
        assert_eq!(left, ["content-length", "host"]);
    }

    #[test]
    fn control_applies_new_routes_and_writes_status() {
        let dir = tempfile::tempdir().unwrap();
        let routes_file = dir.path().join("routes.json");
        let status_file = dir.path().join("status.json");
        let shared = Arc::new(Shared::new());
        let mut control = Control::new(&routes_file, &status_file, 8080);
        control.tick(&shared);
        assert_eq!(read_status(&status_file).unwrap().generation, 0);
        assert!(wait_applied(&status_file, 1, Duration::from_millis(20)).is_err());

        // Same length, written back to back: must still be seen as a change.
        write_routes(&routes_file, &Routes { generation: 1, backends: vec![10] }).unwrap();
        control.tick(&shared);
        write_routes(&routes_file, &Routes { generation: 2, backends: vec![11] }).unwrap();
        control.tick(&shared);
        let status = read_status(&status_file).unwrap();
        assert_eq!((status.generation, status.port), (2, 8080));
        assert_eq!(status.in_flight, BTreeMap::from([(11, 0)]));
        assert!(wait_applied(&status_file, 2, Duration::from_millis(20)).is_ok());
        assert!(wait_drained(&status_file, &[10, 11], Duration::from_millis(20)).is_ok());

        std::fs::write(&routes_file, "{not json").unwrap();
        control.tick(&shared);
        assert_eq!(read_status(&status_file).unwrap().generation, 2, "bad routes keep the current ones");

        let busy = lease(&shared, &[]);
        control.tick(&shared);
        match wait_drained(&status_file, &[11], Duration::from_millis(20)) {
            Err(ProxyError::DrainTimeout { busy, .. }) => assert_eq!(busy, BTreeMap::from([(11, 1)])),
            other => panic!("{other:?}"),
        }
        drop(busy);
        control.tick(&shared);
        assert!(wait_drained(&status_file, &[11], Duration::from_millis(20)).is_ok());
    }
}

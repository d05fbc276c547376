//! The upstream hop's HTTP/1.1 client: one pool of keep-alive connections per upstream
//! host, driven by the request's own task.
//!
//! Why not hyper's pooled client: it runs every connection as a task of its own and
//! hands each request, response head and body frame to and from that task through
//! channels. On the 2-core machine the benchmarks run on, those hand-offs cost more
//! CPU than the rest of a proxied miss (BENCHMARKS.md, the fourth session's run). Here
//! the caller writes the request and reads the response head itself; the response
//! body reads the connection as it is polled and puts it back in the pool once it has
//! been read to its end.
//!
//! What it does not do: HTTP/2, upgrades (`101` ends the exchange and the connection),
//! pipelining. A pooled connection is checked before reuse (a closed one is dropped
//! without a syscall in the common case), and a request whose first write fails on a
//! reused connection is sent again on a new one — the upstream cannot have read a
//! whole request there. Any later failure is the caller's to report: a request is
//! never sent twice once it may have reached the upstream.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use idemgate::policy::header_name;
use idemgate::{BoxError, RequestBody};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// A request body up to this size is written with its head in one `write(2)`.
const INLINE_BODY: u64 = 64 * 1024;
/// The most a response head (or a chunk-size line, or trailers) may take.
const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line (with its extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The most header fields a response head may have (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// What a read asks the kernel for at least.
const READ_SIZE: usize = 8 * 1024;
/// The most a single read asks for when more of a body is known to be coming.
const READ_SIZE_MAX: usize = 256 * 1024;
/// At most this many interim (1xx) responses before the final one.
const MAX_INTERIM: usize = 16;

/// How the pool connects and how long it keeps idle connections.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) tls: TlsConnector,
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_idle: usize,
}

/// The keep-alive connections to one upstream (`scheme://host:port`).
pub(crate) struct HostPool {
    https: bool,
    /// The host as DNS and SNI want it (no brackets around an IPv6 address).
    host: Box<str>,
    port: u16,
    /// The `Host` header: the authority as the upstream URL spells it.
    host_header: HeaderValue,
    settings: Settings,
    idle: Mutex<VecDeque<Idle>>,
    /// Whether a reaper task is alive. It lives on the runtime of a thread that
    /// returned a connection while none was alive, which may end (a connection thread
    /// of `serve_on_threads`) while the pool lives on: the next return starts another.
    reaper: AtomicBool,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("https", &self.https)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("idle", &self.idle.lock().len())
            .finish_non_exhaustive()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Why no response came back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("cannot resolve {0}")]
    Resolve(String, #[source] io::Error),
    #[error("cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("the TLS handshake with {0} failed")]
    Tls(String, #[source] io::Error),
    #[error("the connection to the upstream failed")]
    Io(#[source] io::Error),
    #[error("the upstream closed the connection before its response head")]
    Closed,
    #[error("the upstream's response is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
    #[error("the request body could not be read")]
    RequestBody(#[source] BoxError),
    #[error("the request body's length differs from the one it declared")]
    BodyLength,
    #[error("the upstream answered before the request was sent whole")]
    Answered,
}

/// A TLS client that trusts `roots` and offers HTTP/1.1 only.
pub(crate) fn tls_connector(roots: rustls::RootCertStore) -> Result<TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

impl HostPool {
    /// A pool for `authority` over http or https.
    pub(crate) fn new(https: bool, authority: &http::uri::Authority, settings: Settings) -> Arc<Self> {
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let default_port = if https { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        // The host and a port other than the scheme's, never the URL's user info.
        let host_header =
            if port == default_port { authority.host().to_owned() } else { format!("{}:{port}", authority.host()) };
        let host_header = HeaderValue::from_str(&host_header).unwrap_or_else(|_| HeaderValue::from_static(""));
        Arc::new(Self {
            https,
            host: host.into(),
            port,
            host_header,
            settings,
            idle: Mutex::new(VecDeque::new()),
            reaper: AtomicBool::new(false),
        })
    }

    /// Sends one request and reads the response head; the body reads the rest.
    ///
    /// `target` is the request-target (path and query). `headers` must hold no
    /// hop-by-hop fields; `Host`, `Content-Length` and `Transfer-Encoding` are the
    /// client's to set and are skipped.
    pub(crate) async fn send(
        self: &Arc<Self>,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        mut body: RequestBody,
    ) -> Result<Response<ResponseBody>, SendError> {
        let length = body.size_hint().exact();
        let mut out = Vec::with_capacity(256 + headers.len() * 48 + length.unwrap_or(0).min(INLINE_BODY) as usize);
        self.encode_head(&mut out, method, target, headers, length);
        // A small body of known length goes out with the head, which also makes the
        // whole request safe to send again if a reused connection turns out closed.
        let inline = length.is_some_and(|n| n <= INLINE_BODY);
        if inline {
            let head = out.len();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map_err(SendError::RequestBody)?.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            // The declared length frames the next request on this connection too.
            if Some((out.len() - head) as u64) != length {
                return Err(SendError::BodyLength);
            }
        }
        let (mut conn, mut reused) = self.checkout().await?;
        let written = loop {
            match conn.write_all(&out).await {
                Err(_) if reused => {
                    conn = self.connect().await?;
                    reused = false;
                }
                other => break other,
            }
        };
        let written = match written {
            Ok(()) if !inline => conn.write_body(body, length).await,
            other => other,
        };
        match written {
            Ok(()) => {}
            // An upstream may answer (413, say) and close before reading a whole
            // upload: its answer is still the one to pass on.
            Err(e @ (SendError::Io(_) | SendError::Answered)) => {
                return match conn.read_head().await {
                    Ok(head) => self.response(conn, head, method, false),
                    Err(_) => Err(e),
                };
            }
            // The upstream holds half a request and waits for the rest: the
            // connection is dropped, which tells it there is none.
            Err(e) => return Err(e),
        }
        let head = conn.read_head().await?;
        self.response(conn, head, method, true)
    }

    fn encode_head(&self, out: &mut Vec<u8>, method: &Method, target: &str, headers: &HeaderMap, length: Option<u64>) {
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.host_header.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            if name == HOST || name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        match length {
            // A GET without a body says nothing; a POST without one says so.
            Some(0) if !matches!(*method, Method::POST | Method::PUT | Method::PATCH) => {}
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        out.extend_from_slice(b"\r\n");
    }

    fn response(
        self: &Arc<Self>,
        conn: Conn,
        head: Head,
        method: &Method,
        keep_alive: bool,
    ) -> Result<Response<ResponseBody>, SendError> {
        let Head { status, version, mut headers } = head;
        let (framing, reusable) = framing(method, status, version, &headers).map_err(SendError::Invalid)?;
        if matches!(framing, Framing::Chunked | Framing::Close) {
            // With a Transfer-Encoding, a Content-Length is to be ignored (RFC 9112
            // §6.3), and must not reach the client, whose hop frames the body anew.
            headers.remove(CONTENT_LENGTH);
        }
        let body = ResponseBody::new(conn, framing, keep_alive && reusable, Arc::downgrade(self));
        let mut res = Response::new(body);
        *res.status_mut() = status;
        *res.version_mut() = version;
        *res.headers_mut() = headers;
        Ok(res)
    }

    /// The most recently used live idle connection, one made on this thread first, or a
    /// new one. A connection is served by the reactor of the runtime it was made on:
    /// used from another thread's runtime, every read would wait for that thread to
    /// pass its readiness on. (On a multi-threaded runtime, whose threads share one
    /// reactor, the preference buys nothing and costs nothing: every connection is
    /// checked before use. Asking the runtime its flavour here cost 2-4 % of a bypass.)
    async fn checkout(self: &Arc<Self>) -> Result<(Conn, bool), SendError> {
        while let Some(idle) = self.take_idle() {
            let mut conn = idle.conn;
            if idle.since.elapsed() >= self.settings.idle_timeout {
                continue;
            }
            // Out of tokio's cooperative budget, a read would say "pending" without
            // looking at the socket: the check runs outside the budget.
            if tokio::task::unconstrained(poll_fn(|_| Poll::Ready(conn.is_open()))).await {
                return Ok((conn, true));
            }
        }
        Ok((self.connect().await?, false))
    }

    /// The idle connection to try next: this thread's most recent, else the most recent.
    fn take_idle(&self) -> Option<Idle> {
        let here = this_thread();
        let mut idle = self.idle.lock();
        let at = idle.iter().rposition(|i| i.conn.home == here).or_else(|| idle.len().checked_sub(1))?;
        idle.remove(at)
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let host = &*self.host;
        let name = || format!("{host}:{}", self.port);
        // One deadline for the lookup, the TCP connect and the TLS handshake.
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        let addrs: Vec<_> = tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, self.port)))
            .await
            .map_err(|_| SendError::ConnectTimeout(name()))?
            .map_err(|e| SendError::Resolve(name(), e))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for (i, addr) in addrs.iter().enumerate() {
            // Each address gets an equal share of the time left, so one that drops
            // packets (IPv6 on a dual-stack name, say) does not starve the others.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last = Some(SendError::Connect(name(), e)),
                Err(_) => last = Some(SendError::ConnectTimeout(name())),
            }
        }
        let Some(tcp) = tcp else {
            let none = io::Error::new(io::ErrorKind::NotFound, "the name has no addresses");
            return Err(last.unwrap_or_else(|| SendError::Resolve(name(), none)));
        };
        // Requests are written whole; Nagle would only hold the last segment back.
        tcp.set_nodelay(true).map_err(|e| SendError::Connect(name(), e))?;
        let io = if self.https {
            let server = ServerName::try_from(host.to_owned())
                .map_err(|e| SendError::Tls(name(), io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let tls = tokio::time::timeout_at(deadline, self.settings.tls.connect(server, tcp))
                .await
                .map_err(|_| SendError::ConnectTimeout(name()))?
                .map_err(|e| SendError::Tls(name(), e))?;
            Either::Right(Box::new(tls))
        } else {
            Either::Left(tcp)
        };
        Ok(Conn { io, buf: BytesMut::new(), grown: false, home: this_thread() })
    }

    fn put(self: &Arc<Self>, mut conn: Conn) {
        if conn.grown {
            // `capacity()` shows only what is left after the frames cut off the
            // front; the allocation behind it may be a large body's.
            conn.buf = BytesMut::new();
            conn.grown = false;
        }
        let oldest = {
            let mut idle = self.idle.lock();
            let oldest = if idle.len() >= self.settings.max_idle { idle.pop_front() } else { None };
            idle.push_back(Idle { conn, since: Instant::now() });
            oldest
        };
        drop(oldest);
        // A load first: the swap's exclusive access to the line on every return would
        // be shared by every thread returning connections.
        if !self.reaper.load(Ordering::Relaxed) && !self.reaper.swap(true, Ordering::AcqRel) {
            self.spawn_reaper();
        }
    }

    /// Closes connections that sat idle past the timeout, so none lingers once
    /// traffic stops.
    fn spawn_reaper(self: &Arc<Self>) {
        /// Clears the pool's flag when the task ends, however it ends: its runtime
        /// shutting down drops it without another poll.
        struct Alive(Weak<HostPool>);
        impl Drop for Alive {
            fn drop(&mut self) {
                if let Some(pool) = self.0.upgrade() {
                    pool.reaper.store(false, Ordering::Release);
                }
            }
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reaper.store(false, Ordering::Release);
            return;
        };
        let pool: Weak<Self> = Arc::downgrade(self);
        let alive = Alive(Weak::clone(&pool));
        let timeout = self.settings.idle_timeout;
        runtime.spawn(async move {
            let _alive = alive;
            let mut tick = tokio::time::interval((timeout / 2).max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let expired: Vec<Idle> = {
                    let mut idle = pool.idle.lock();
                    let keep = idle.iter().position(|i| i.since.elapsed() < timeout).unwrap_or(idle.len());
                    idle.drain(..keep).collect()
                };
                drop(expired);
            }
        });
    }
}

/// A response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Read to the end of the connection.
    Close,
}

/// The body's framing, and whether the connection can carry another request after it.
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
) -> Result<(Framing, bool), &'static str> {
    let close = version != Version::HTTP_11
        || headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")));
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((Framing::Empty, false));
    }
    if *method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, !close));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let last = headers.get_all(TRANSFER_ENCODING).iter().next_back().map(HeaderValue::as_bytes).unwrap_or_default();
        let last = last.rsplit(|b| *b == b',').next().unwrap_or_default().trim_ascii();
        // Both framings at once is how a response smuggles bytes past a proxy: this
        // one is read by its chunks, and its connection is not used again.
        let reusable = !close && !headers.contains_key(CONTENT_LENGTH);
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            (Framing::Chunked, reusable)
        } else {
            (Framing::Close, false)
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let n = parse_decimal(part.trim_ascii()).ok_or("a Content-Length that is not a number")?;
            if length.is_some_and(|l| l != n) {
                return Err("Content-Length values that disagree");
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Empty, !close),
        Some(n) => (Framing::Length(n), !close),
        None => (Framing::Close, false),
    })
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0')))
}

/// The transport under a connection.
type Io = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// One connection and the bytes read from it that nobody has taken yet.
struct Conn {
    io: Io,
    buf: BytesMut,
    /// The buffer was grown past [`READ_SIZE`] for a large body.
    grown: bool,
    /// The thread it was made on, whose runtime's reactor serves it.
    home: ThreadId,
}

/// The calling thread's id, without the reference count `thread::current()` takes.
fn this_thread() -> ThreadId {
    thread_local! { static HERE: ThreadId = std::thread::current().id(); }
    HERE.with(|id| *id)
}

impl Conn {
    /// Whether an idle connection can carry a request: the upstream has not closed
    /// it and has sent nothing unasked. A read that would block says so; when the
    /// reactor has seen no readiness since the last read, that costs no syscall.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.buf.reserve(1);
        matches!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.buf), Poll::Pending)
    }

    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        self.io.write_all(bytes).await.map_err(SendError::Io)?;
        self.io.flush().await.map_err(SendError::Io)
    }

    /// Streams a body of unknown or large size: chunk-encoded without a length,
    /// checked against it with one (the length frames the next request too).
    async fn write_body(&mut self, mut body: RequestBody, length: Option<u64>) -> Result<(), SendError> {
        let mut sent = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(SendError::RequestBody)?.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            match length {
                Some(n) if sent > n => return Err(SendError::BodyLength),
                Some(_) => self.write_watching(&data).await?,
                None => {
                    let mut chunk = Vec::with_capacity(data.len() + 20);
                    chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    chunk.extend_from_slice(&data);
                    chunk.extend_from_slice(b"\r\n");
                    self.write_watching(&chunk).await?;
                }
            }
        }
        match length {
            Some(n) if sent != n => Err(SendError::BodyLength),
            Some(_) => Ok(()),
            None => self.write_watching(b"0\r\n\r\n").await,
        }
    }

    /// Writes `bytes` and flushes them (a slow upload reaches the upstream as it
    /// comes), unless the upstream answers first: one may answer (413, say) before it
    /// has read a whole upload and stop reading, and writing on would wait out the
    /// response timeout.
    async fn write_watching(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        let mut left = bytes;
        poll_fn(|cx| {
            loop {
                match self.poll_fill(cx, READ_SIZE) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(SendError::Io(io::ErrorKind::UnexpectedEof.into()))),
                    Poll::Ready(Ok(_)) => return Poll::Ready(Err(SendError::Answered)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(SendError::Io(e))),
                    Poll::Pending => {}
                }
                if left.is_empty() {
                    return Pin::new(&mut self.io).poll_flush(cx).map_err(SendError::Io);
                }
                match Pin::new(&mut self.io).poll_write(cx, left) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(SendError::Io(io::ErrorKind::WriteZero.into()))),
                    Poll::Ready(Ok(n)) => left = &left[n..],
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(SendError::Io(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }

    /// Reads more bytes into the buffer; `Ok(0)` is the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let want = want.clamp(READ_SIZE, READ_SIZE_MAX);
        if self.buf.capacity() - self.buf.len() < READ_SIZE {
            self.buf.reserve(want);
            self.grown |= want > READ_SIZE;
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// The response head, skipping interim (1xx) responses other than `101`.
    async fn read_head(&mut self) -> Result<Head, SendError> {
        let mut interim = 0;
        loop {
            if let Some(head) = self.parse_head()? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(SendError::Invalid("more than 16 interim responses"));
                    }
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(SendError::Invalid("a response head larger than 64 KiB"));
            }
            match poll_fn(|cx| self.poll_fill(cx, READ_SIZE)).await {
                Ok(0) => return Err(SendError::Closed),
                Ok(_) => {}
                Err(e) => return Err(SendError::Io(e)),
            }
        }
    }

    /// Parses a head at the front of the buffer and consumes it, if it is all there.
    fn parse_head(&mut self) -> Result<Option<Head>, SendError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut fields);
        let len = match res.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(SendError::Invalid("more than 100 header fields")),
            Err(_) => return Err(SendError::Invalid("a malformed response head")),
        };
        let status =
            res.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(SendError::Invalid("a bad status code"))?;
        let version = if res.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
        // The values share one copy of the head, not one allocation each; a copy, not
        // a slice of the read buffer, which would stay pinned as long as a value lives.
        let start = self.buf.as_ptr() as usize;
        let copy = Bytes::copy_from_slice(&self.buf[..len]);
        let mut headers = HeaderMap::with_capacity(res.headers.len());
        for field in res.headers.iter() {
            let name = header_name(field.name.as_bytes()).ok_or(SendError::Invalid("a bad header name"))?;
            let at = field.value.as_ptr() as usize - start;
            let value = HeaderValue::from_maybe_shared(copy.slice(at..at + field.value.len()))
                .map_err(|_| SendError::Invalid("a bad header value"))?;
            headers.append(name, value);
        }
        self.buf.advance(len);
        Ok(Some(Head { status, version, headers }))
    }
}

/// A response body read off its connection as it is polled.
pub(crate) struct ResponseBody {
    conn: Option<Conn>,
    state: State,
    reusable: bool,
    pool: Weak<HostPool>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").field("state", &self.state).finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum State {
    Length(u64),
    Close,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
    Failed,
}

/// The upstream broke the response body off or framed it wrongly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the upstream closed the connection before the end of the body")]
    Truncated,
    #[error("the upstream's response is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
    #[error("reading the upstream's body failed")]
    Io(#[source] io::Error),
}

impl ResponseBody {
    fn new(conn: Conn, framing: Framing, reusable: bool, pool: Weak<HostPool>) -> Self {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        let mut body = Self { conn: Some(conn), state, reusable, pool };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The body has been read to its end: the connection goes back to the pool if it
    /// can carry another request and holds nothing more.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put(conn);
        }
    }

    /// Takes what the buffer holds of the body: a frame or the end to hand out, or
    /// how many more bytes are wanted.
    fn step(&mut self) -> Step {
        let Some(conn) = self.conn.as_mut() else { return Step::Ready(None) };
        let buf = &mut conn.buf;
        match self.state {
            State::Done | State::Failed => Step::Ready(None),
            State::Length(left) | State::ChunkData(left) if buf.is_empty() => Step::Need(left),
            State::Length(left) => {
                let data = take(buf, left);
                let left = left - data.len() as u64;
                self.state = State::Length(left);
                if left == 0 {
                    self.finish();
                }
                Step::Ready(Some(Ok(Frame::data(data))))
            }
            State::ChunkData(left) => {
                let data = take(buf, left);
                let left = left - data.len() as u64;
                self.state = if left == 0 { State::ChunkEnd } else { State::ChunkData(left) };
                Step::Ready(Some(Ok(Frame::data(data))))
            }
            State::Close if buf.is_empty() => Step::Need(READ_SIZE as u64),
            State::Close => Step::Ready(Some(Ok(Frame::data(buf.split().freeze())))),
            State::ChunkSize => match find_line(buf) {
                Some(end) if end > MAX_CHUNK_LINE => {
                    Step::Ready(self.fail(BodyError::Invalid("a chunk-size line longer than 4 KiB")))
                }
                Some(end) => {
                    let digits = buf[..end].split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
                    let Some(size) = parse_hex(digits) else {
                        return Step::Ready(self.fail(BodyError::Invalid("a bad chunk size")));
                    };
                    buf.advance(end + 1);
                    self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                    Step::Again
                }
                None if buf.len() > MAX_CHUNK_LINE => {
                    Step::Ready(self.fail(BodyError::Invalid("a chunk-size line longer than 4 KiB")))
                }
                None => Step::Need(READ_SIZE as u64),
            },
            State::ChunkEnd => match find_line(buf) {
                Some(end) if buf[..end].trim_ascii().is_empty() => {
                    buf.advance(end + 1);
                    self.state = State::ChunkSize;
                    Step::Again
                }
                None if buf.len() < 2 => Step::Need(READ_SIZE as u64),
                _ => Step::Ready(self.fail(BodyError::Invalid("chunk data longer than its size"))),
            },
            State::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::new();
                        for field in fields {
                            let name = HeaderName::from_bytes(field.name.as_bytes());
                            let value = HeaderValue::from_bytes(field.value);
                            if let (Ok(name), Ok(value)) = (name, value) {
                                trailers.append(name, value);
                            }
                        }
                        buf.advance(len);
                        self.finish();
                        Step::Ready((!trailers.is_empty()).then(|| Ok(Frame::trailers(trailers))))
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                        Step::Ready(self.fail(BodyError::Invalid("trailers larger than 64 KiB")))
                    }
                    Ok(httparse::Status::Partial) => Step::Need(READ_SIZE as u64),
                    Err(_) => Step::Ready(self.fail(BodyError::Invalid("malformed trailers"))),
                }
            }
        }
    }

    /// Ends the body with `e`; the connection is closed, as its state is unknown.
    fn fail(&mut self, e: BodyError) -> PolledFrame {
        self.state = State::Failed;
        self.conn = None;
        Some(Err(e.into()))
    }
}

type PolledFrame = Option<Result<Frame<Bytes>, BoxError>>;

enum Step {
    Ready(PolledFrame),
    /// Parsed something that yields no frame; look at the buffer again.
    Again,
    /// The buffer holds too little; read (about) this many bytes more.
    Need(u64),
}

/// The first `at_most` bytes of `buf`, as a frame that shares its allocation.
fn take(buf: &mut BytesMut, at_most: u64) -> Bytes {
    let n = buf.len().min(usize::try_from(at_most).unwrap_or(usize::MAX));
    buf.split_to(n).freeze()
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PolledFrame> {
        let this = self.get_mut();
        loop {
            let want = match this.step() {
                Step::Ready(frame) => return Poll::Ready(frame),
                Step::Again => continue,
                Step::Need(want) => want,
            };
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            let want = usize::try_from(want).unwrap_or(usize::MAX);
            match conn.poll_fill(cx, want) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(this.state, State::Close) => {
                    // The end of the connection is the end of this body.
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(this.fail(BodyError::Truncated));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(this.fail(BodyError::Io(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

fn find_line(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|b| *b == b'\n')
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| Some(n * 16 + u64::from(char::from(*d).to_digit(16)?)))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{Empty, Full, StreamBody};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// What the scripted upstream does after writing a response.
    #[derive(Clone, Copy)]
    enum After {
        KeepOpen,
        Close,
    }

    /// A real TCP upstream on port 0 that answers each request with the next scripted
    /// response (written a byte at a time when `trickle`), and keeps every request's
    /// exact bytes and the number of connections it accepted.
    struct Scripted {
        addr: std::net::SocketAddr,
        requests: Arc<Mutex<Vec<Vec<u8>>>>,
        connections: Arc<AtomicUsize>,
    }

    impl Scripted {
        async fn start(script: Vec<(&'static [u8], After)>, trickle: bool) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let requests = Arc::new(Mutex::new(Vec::new()));
            let connections = Arc::new(AtomicUsize::new(0));
            let script = Arc::new(Mutex::new(VecDeque::from(script)));
            let (seen, count) = (Arc::clone(&requests), Arc::clone(&connections));
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let (seen, script) = (Arc::clone(&seen), Arc::clone(&script));
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        while let Some(request) = read_request(&mut socket, &mut buf).await {
                            seen.lock().push(request);
                            let Some((response, after)) = script.lock().pop_front() else { return };
                            if trickle {
                                for byte in response {
                                    if socket.write_all(&[*byte]).await.is_err() {
                                        return;
                                    }
                                    tokio::task::yield_now().await;
                                }
                            } else if socket.write_all(response).await.is_err() {
                                return;
                            }
                            if let After::Close = after {
                                return;
                            }
                        }
                    });
                }
            });
            Self { addr, requests, connections }
        }

        fn pool(&self) -> Arc<HostPool> {
            let authority = self.addr.to_string().parse().expect("authority");
            HostPool::new(false, &authority, settings(webpki()))
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect()
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    /// One whole request (head, then a body by its length or its chunks), or `None`
    /// at the end of the connection.
    async fn read_request(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut fields);
            if let Ok(httparse::Status::Complete(head)) = req.parse(buf) {
                let length = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"));
                let length =
                    length.map(|h| std::str::from_utf8(h.value).expect("utf-8").parse::<usize>().expect("a number"));
                let end = match length {
                    Some(n) => (buf.len() >= head + n).then_some(head + n),
                    None if req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding")) => {
                        buf.windows(5).position(|w| w == b"0\r\n\r\n").map(|at| at + 5)
                    }
                    None => Some(head),
                };
                if let Some(end) = end {
                    return Some(buf.drain(..end).collect());
                }
            }
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn webpki() -> TlsConnector {
        tls_connector(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }).expect("tls")
    }

    fn settings(tls: TlsConnector) -> Settings {
        Settings { tls, connect_timeout: Duration::from_secs(2), idle_timeout: Duration::from_secs(60), max_idle: 4 }
    }

    fn json(body: &'static str) -> RequestBody {
        RequestBody::full(Bytes::from_static(body.as_bytes()))
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v))).collect()
    }

    /// The body's data and trailers, or the error that ended it.
    async fn read(res: Response<ResponseBody>) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let mut body = res.into_body();
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok((data, trailers))
    }

    const OK_JSON: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"id\":\"a\"}\n";

    #[tokio::test]
    async fn one_connection_carries_request_after_request_with_the_exact_bytes() {
        let up = Scripted::start(vec![(OK_JSON, After::KeepOpen), (OK_JSON, After::KeepOpen)], false).await;
        let pool = up.pool();
        let h = headers(&[("authorization", "Bearer sk-1"), ("content-type", "application/json")]);
        for _ in 0..2 {
            let res = pool.send(&Method::POST, "/v1/chat?x=1", &h, json("{\"a\":1}")).await.expect("response");
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()["content-length"], "11");
            assert_eq!(read(res).await.expect("body"), (b"{\"id\":\"a\"}\n".to_vec(), None));
        }
        let host = up.addr.to_string();
        let expected = format!(
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer sk-1\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{{\"a\":1}}"
        );
        assert_eq!(up.requests(), [expected.clone(), expected]);
        assert_eq!(up.connections(), 1, "the second request reused the first connection");
    }

    #[tokio::test]
    async fn header_names_known_or_not_and_in_any_case_arrive_lowercase_with_their_values() {
        const NAMED: &[u8] = b"HTTP/1.1 200 OK\r\nX-Request-ID: req_1\r\nx-ratelimit-remaining-tokens: 9\r\nX-Custom: a\r\nx-custom: b\r\ncontent-length: 0\r\n\r\n";
        let up = Scripted::start(vec![(NAMED, After::KeepOpen)], false).await;
        let res = up.pool().send(&Method::GET, "/", &HeaderMap::new(), RequestBody::new(Empty::<Bytes>::new())).await;
        let res = res.expect("response");
        let names: Vec<&str> = res.headers().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-request-id", "x-ratelimit-remaining-tokens", "x-custom", "x-custom", "content-length"]);
        assert_eq!(res.headers()["x-request-id"], "req_1");
        let custom: Vec<_> = res.headers().get_all("x-custom").iter().collect();
        assert_eq!(custom, ["a", "b"]);
    }

    #[tokio::test]
    async fn chunked_bodies_decode_at_any_split_and_keep_their_trailers() {
        const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-usage: 12\r\n\r\n";
        let up = Scripted::start(vec![(CHUNKED, After::KeepOpen), (OK_JSON, After::KeepOpen)], true).await;
        let pool = up.pool();
        let res = pool.send(&Method::GET, "/", &HeaderMap::new(), RequestBody::new(Empty::<Bytes>::new())).await;
        let (data, trailers) = read(res.expect("response")).await.expect("body");
        assert_eq!(data, b"hello, world");
        assert_eq!(trailers.expect("trailers")["x-usage"], "12");
        let res = pool.send(&Method::GET, "/", &HeaderMap::new(), RequestBody::new(Empty::<Bytes>::new())).await;
        assert_eq!(read(res.expect("response")).await.expect("body").0, b"{\"id\":\"a\"}\n");
        assert_eq!(up.connections(), 1, "a chunked body read to its end frees the connection");
        assert_eq!(up.requests()[0], format!("GET / HTTP/1.1\r\nhost: {}\r\n\r\n", up.addr));
    }

    #[tokio::test]
    async fn a_body_that_runs_to_the_close_ends_its_connection() {
        const TO_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it";
        let up = Scripted::start(vec![(TO_CLOSE, After::Close), (OK_JSON, After::KeepOpen)], false).await;
        let pool = up.pool();
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("response");
        assert_eq!(read(res).await.expect("body").0, b"all of it");
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("response");
        assert_eq!(read(res).await.expect("body").0, b"{\"id\":\"a\"}\n");
        assert_eq!((up.requests().len(), up.connections()), (2, 2));
    }

    #[tokio::test]
    async fn a_thread_takes_back_its_own_connection_before_another_threads() {
        let up = Scripted::start(Vec::new(), false).await;
        let pool = up.pool();
        let elsewhere = std::thread::spawn(|| std::thread::current().id()).join().expect("thread");
        let mine = pool.connect().await.expect("connect");
        let mut theirs = pool.connect().await.expect("connect");
        theirs.home = elsewhere;
        pool.put(mine);
        pool.put(theirs);
        let (conn, reused) = pool.checkout().await.expect("checkout");
        assert!(reused);
        assert_eq!(conn.home, this_thread(), "this thread's, though the other is the more recent");
        let (conn, reused) = pool.checkout().await.expect("checkout");
        assert!(reused);
        assert_eq!(conn.home, elsewhere, "with none of its own left, another thread's");
        assert_eq!(up.connections(), 2);
    }

    /// The reaper closes connections idle past the timeout, and a pool that outlives
    /// the runtime its reaper ran on gets another on the next runtime returning one.
    #[test]
    fn idle_connections_are_reaped_after_the_reapers_runtime_has_ended() {
        use std::io::Read;
        // The kernel completes connections into the backlog: no accept loop needed,
        // and none that would end with a runtime.
        let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let authority = upstream.local_addr().expect("addr").to_string().parse().expect("authority");
        let pool = HostPool::new(
            false,
            &authority,
            Settings { idle_timeout: Duration::from_millis(100), ..settings(webpki()) },
        );
        let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let connect_and_return = |runtime: &tokio::runtime::Runtime| {
            runtime.block_on(async {
                let conn = pool.connect().await.expect("connect");
                pool.put(conn);
            });
        };

        let first = runtime();
        connect_and_return(&first);
        assert!(pool.reaper.load(Ordering::Acquire));
        drop(first);
        assert!(!pool.reaper.load(Ordering::Acquire), "the reaper went with its runtime");
        assert_eq!(pool.idle.lock().len(), 1, "no reaper ran before the runtime ended");

        let second = runtime();
        connect_and_return(&second);
        assert!(pool.reaper.load(Ordering::Acquire), "a second reaper runs on the second runtime");
        second.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while !pool.idle.lock().is_empty() {
                assert!(tokio::time::Instant::now() < deadline, "idle connections outlived their timeout");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        for _ in 0..2 {
            let (mut socket, _) = upstream.accept().expect("accept");
            socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            assert_eq!(socket.read(&mut [0; 16]).expect("read"), 0, "the pool closed its end");
        }
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_used_again() {
        // The upstream drops the connection after answering, without saying so.
        let up = Scripted::start(vec![(OK_JSON, After::Close), (OK_JSON, After::KeepOpen)], false).await;
        let pool = up.pool();
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("response");
        read(res).await.expect("body");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("a new connection");
        read(res).await.expect("body");
        assert_eq!(up.requests().len(), 2, "each request reached the upstream once");
        assert_eq!(up.connections(), 2);
    }

    #[tokio::test]
    async fn a_body_cut_short_fails_and_its_connection_is_not_pooled() {
        const SHORT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this";
        let up = Scripted::start(vec![(SHORT, After::Close), (OK_JSON, After::KeepOpen)], false).await;
        let pool = up.pool();
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("a head");
        let err = read(res).await.expect_err("a truncated body");
        assert!(err.to_string().contains("before the end of the body"), "{err}");
        assert!(pool.idle.lock().is_empty());
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("response");
        read(res).await.expect("body");
        assert_eq!(up.connections(), 2);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_broken_heads_refused() {
        const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok";
        const GARBAGE: &[u8] = b"SMTP ready\r\n\r\n";
        const DISAGREE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc";
        let up = Scripted::start(
            vec![(CONTINUE, After::KeepOpen), (GARBAGE, After::Close), (DISAGREE, After::Close)],
            false,
        )
        .await;
        let pool = up.pool();
        let h = headers(&[("expect", "100-continue")]);
        let res = pool.send(&Method::POST, "/", &h, json("{}")).await.expect("response");
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(read(res).await.expect("body").0, b"ok");
        let err = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect_err("not HTTP");
        assert!(matches!(err, SendError::Invalid(_)), "{err}");
        let err =
            pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect_err("framing that disagrees");
        assert!(err.to_string().contains("disagree"), "{err}");
        assert_eq!(up.requests().len(), 3);
    }

    #[tokio::test]
    async fn a_transfer_encoding_overrides_a_content_length_which_is_dropped() {
        const BOTH: &[u8] =
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let up = Scripted::start(vec![(BOTH, After::KeepOpen), (OK_JSON, After::KeepOpen)], false).await;
        let pool = up.pool();
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("response");
        assert!(!res.headers().contains_key(CONTENT_LENGTH));
        assert_eq!(read(res).await.expect("body").0, b"ok");
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("response");
        read(res).await.expect("body");
        assert_eq!(up.connections(), 2, "a response framed both ways is not trusted with another request");
    }

    /// A body whose declared length is not what it yields.
    struct Lying {
        declared: u64,
        frames: VecDeque<Result<Bytes, BoxError>>,
    }

    impl Body for Lying {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.frames.pop_front().map(|f| f.map(Frame::data)))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.declared)
        }
    }

    fn lying(declared: u64, frames: Vec<Result<&'static str, &'static str>>) -> RequestBody {
        let frames = frames.into_iter().map(|f| f.map(|d| Bytes::from_static(d.as_bytes())).map_err(BoxError::from));
        RequestBody::new(Lying { declared, frames: frames.collect() })
    }

    #[tokio::test]
    async fn a_body_longer_or_shorter_than_it_declared_is_refused_and_smuggles_nothing() {
        let up = Scripted::start(vec![(OK_JSON, After::KeepOpen), (OK_JSON, After::KeepOpen)], false).await;
        let pool = up.pool();
        let smuggler = Ok("{}GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n");
        let err =
            pool.send(&Method::POST, "/", &HeaderMap::new(), lying(2, vec![smuggler])).await.expect_err("too long");
        assert!(matches!(err, SendError::BodyLength), "{err}");
        let err =
            pool.send(&Method::POST, "/", &HeaderMap::new(), lying(3, vec![Ok("{}")])).await.expect_err("too short");
        assert!(matches!(err, SendError::BodyLength), "{err}");
        assert_eq!(up.requests().len(), 0, "nothing reached the upstream");
        // Past the inline size the head goes first; the excess is refused before it is written.
        let big = "x".repeat(INLINE_BODY as usize + 1);
        let big: &'static str = Box::leak(big.into_boxed_str());
        let declared = big.len() as u64;
        let err = pool.send(&Method::POST, "/", &HeaderMap::new(), lying(declared, vec![Ok(big), smuggler])).await;
        assert!(matches!(err, Err(SendError::BodyLength)), "{err:?}");
        let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("response");
        read(res).await.expect("body");
        let seen = up.requests();
        assert!(seen.iter().all(|r| !r.contains("smuggled")), "{seen:?}");
        assert_eq!(up.connections(), 2, "the half-sent request's connection was dropped");
    }

    #[tokio::test]
    async fn a_request_body_that_fails_mid_upload_fails_the_call_at_once() {
        let up = Scripted::start(vec![(OK_JSON, After::KeepOpen)], false).await;
        let pool = up.pool();
        let parts: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"{\"a\":"))), Err("the client hung up".into())];
        let body = RequestBody::new(StreamBody::new(futures_util::stream::iter(parts)));
        let no_headers = HeaderMap::new();
        let sent = tokio::time::timeout(Duration::from_secs(5), pool.send(&Method::POST, "/", &no_headers, body));
        let err = sent.await.expect("not left waiting for a response").expect_err("the body failed");
        assert!(matches!(err, SendError::RequestBody(_)), "{err}");
    }

    #[tokio::test]
    async fn an_answer_before_the_upload_ends_is_passed_on_at_once() {
        // The upstream reads the head, answers 413 and reads no more, keeping the
        // connection open: 16 MiB is more than the sockets' buffers hold.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                socket.read_exact(&mut byte).await.expect("the head");
                head.push(byte[0]);
            }
            socket
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large")
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let pool = HostPool::new(false, &addr.to_string().parse().expect("authority"), settings(webpki()));
        let body = RequestBody::new(Full::new(Bytes::from(vec![b'x'; 16 << 20])));
        let no_headers = HeaderMap::new();
        let sent = tokio::time::timeout(Duration::from_secs(10), pool.send(&Method::POST, "/", &no_headers, body));
        let res = sent.await.expect("not left writing to an upstream that stopped reading").expect("its answer");
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(read(res).await.expect("body").0, b"too large");
        assert!(pool.idle.lock().is_empty(), "a connection with half an upload on it is not reused");
    }

    #[test]
    fn the_host_header_is_the_host_and_a_port_other_than_the_schemes() {
        let host = |https, authority: &str| {
            let pool = HostPool::new(https, &authority.parse().expect("authority"), settings(webpki()));
            pool.host_header.to_str().expect("ascii").to_owned()
        };
        assert_eq!(host(true, "user:secret@api.example.com"), "api.example.com");
        assert_eq!(host(true, "api.example.com:443"), "api.example.com");
        assert_eq!(host(false, "api.example.com:443"), "api.example.com:443");
        assert_eq!(host(false, "[::1]:8080"), "[::1]:8080");
    }

    #[tokio::test]
    async fn head_and_no_content_answers_have_no_body_whatever_their_length_says() {
        const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n";
        const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
        let up = Scripted::start(
            vec![(HEAD, After::KeepOpen), (NO_CONTENT, After::KeepOpen), (OK_JSON, After::KeepOpen)],
            false,
        )
        .await;
        let pool = up.pool();
        let empty = || RequestBody::new(Empty::<Bytes>::new());
        let res = pool.send(&Method::HEAD, "/", &HeaderMap::new(), empty()).await.expect("response");
        assert!(res.body().is_end_stream());
        assert_eq!(read(res).await.expect("body").0, b"");
        let res = pool.send(&Method::DELETE, "/x", &HeaderMap::new(), empty()).await.expect("response");
        assert_eq!(read(res).await.expect("body").0, b"");
        let res = pool.send(&Method::GET, "/", &HeaderMap::new(), empty()).await.expect("response");
        assert_eq!(read(res).await.expect("body").0, b"{\"id\":\"a\"}\n");
        assert_eq!(up.connections(), 1);
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_out_chunked() {
        let up = Scripted::start(vec![(OK_JSON, After::KeepOpen)], false).await;
        let pool = up.pool();
        let parts = ["{\"a\":", "", "1}"].map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p.as_bytes()))));
        let body = RequestBody::new(StreamBody::new(futures_util::stream::iter(parts)));
        assert_eq!(body.size_hint().exact(), None);
        let res = pool.send(&Method::POST, "/up", &HeaderMap::new(), body).await.expect("response");
        read(res).await.expect("body");
        let expected = format!(
            "POST /up HTTP/1.1\r\nhost: {}\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{{\"a\":\r\n2\r\n1}}\r\n0\r\n\r\n",
            up.addr
        );
        assert_eq!(up.requests(), [expected]);
        // And a large body of known length streams after its head, unchanged.
        let big = vec![b'x'; 3 * INLINE_BODY as usize];
        let up = Scripted::start(vec![(OK_JSON, After::KeepOpen)], false).await;
        let body = RequestBody::new(Full::new(Bytes::from(big.clone())));
        let res = up.pool().send(&Method::POST, "/", &HeaderMap::new(), body).await.expect("response");
        read(res).await.expect("body");
        assert!(up.requests()[0].ends_with(&format!("content-length: {}\r\n\r\n{}", big.len(), "x".repeat(big.len()))));
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let authority = listener.local_addr().expect("addr").to_string().parse().expect("authority");
        drop(listener);
        let pool = HostPool::new(false, &authority, settings(webpki()));
        let err = pool.send(&Method::GET, "/", &HeaderMap::new(), json("")).await.expect_err("nothing listens");
        assert!(matches!(err, SendError::Connect(..)), "{err}");
    }

    #[tokio::test]
    async fn https_upstreams_are_verified_and_their_connections_reused() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;

        let dir = tempfile::tempdir().expect("tempdir");
        let pki = idemgate_testkit::pki::make(dir.path());
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (handshakes, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (hs, rq) = (Arc::clone(&handshakes), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, hs, rq) = (acceptor.clone(), Arc::clone(&hs), Arc::clone(&rq));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else { return };
                    hs.fetch_add(1, Ordering::SeqCst);
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || !buf[..n].ends_with(b"{}") {
                            return;
                        }
                        rq.fetch_add(1, Ordering::SeqCst);
                        if tls.write_all(OK_JSON).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let authority: http::uri::Authority = addr.to_string().parse().expect("authority");

        // Trusted by the pool's roots: two requests, one handshake.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(&pki.ca).expect("ca")).expect("a root");
        let pool = HostPool::new(true, &authority, settings(tls_connector(roots).expect("tls")));
        for _ in 0..2 {
            let res = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect("a response over TLS");
            assert_eq!(read(res).await.expect("body").0, b"{\"id\":\"a\"}\n");
        }
        assert_eq!((handshakes.load(Ordering::SeqCst), requests.load(Ordering::SeqCst)), (1, 2));

        // Not chaining to the public roots: refused before a byte of the request is sent.
        let pool = HostPool::new(true, &authority, settings(webpki()));
        let err = pool.send(&Method::POST, "/", &HeaderMap::new(), json("{}")).await.expect_err("untrusted");
        assert!(matches!(err, SendError::Tls(..)), "{err}");
        let why = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
        assert!(why.contains("certificate"), "{why}");
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }
}

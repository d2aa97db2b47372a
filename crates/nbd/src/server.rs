//! The NBD server: serves [`BlockDev`]s as named exports over unix and TCP sockets.
//!
//! ```text
//!  accept loop --(one task per client)--> negotiate (fixed newstyle options)
//!                                           |
//!                                           v
//!      connection task: read header [+ payload] -> request future --BlockDev--> reply
//!          (all of a connection's requests are      ^ bounded by count and bytes  |
//!           polled by its one task)                 |       in flight             |
//!                 '-- budget freed -- writer task <---- replies ready together ---'
//! ```
//!
//! Replies leave in completion order, so one slow request does not hold up the others (devices
//! run on the connection's own thread only calls they measured to be fast). Bad
//! traffic from one client ends that client's connection (or gets the protocol's error reply)
//! and touches nothing else. [`Server::shutdown`] stops accepting and reading, lets in-flight
//! requests finish, and [`Server::finish`] then flushes every export.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use blockdev::{BlockDev, BlockError, ErrorKind, ExtentList, WriteFlags, ZeroFlags};
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use parking_lot::RwLock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::addr::SocketAddr;
use crate::proto::*;

/// One named export.
pub struct Export {
    pub name: String,
    pub description: String,
    pub dev: Arc<dyn BlockDev>,
    /// Refuse writes even if the device would take them.
    pub read_only: bool,
}

impl Export {
    pub fn new(name: impl Into<String>, dev: Arc<dyn BlockDev>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            dev,
            read_only: false,
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only || self.dev.info().read_only
    }

    /// Transmission flags advertised for this export.
    fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_DF
            | FLAG_SEND_CACHE
            // Every connection shares one BlockDev, so a flush on one covers writes completed
            // on all of them: what multi-conn requires.
            | FLAG_CAN_MULTI_CONN;
        if self.is_read_only() {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        flags
    }
}

/// The exports a server offers; shared, so exports can be added and removed while it runs.
#[derive(Clone, Default)]
pub struct ExportSet(Arc<RwLock<BTreeMap<String, Arc<Export>>>>);

impl ExportSet {
    pub fn new() -> Self {
        ExportSet::default()
    }

    /// Adds (or replaces) an export.
    pub fn add(&self, export: Export) {
        self.0.write().insert(export.name.clone(), Arc::new(export));
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.0.write().remove(name)
    }

    /// Looks an export up. The empty name means the only export when there is just one,
    /// as clients that do not name an export (qemu-nbd's default) expect.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let map = self.0.read();
        if let Some(e) = map.get(name) {
            return Some(e.clone());
        }
        if name.is_empty() && map.len() == 1 {
            return map.values().next().cloned();
        }
        None
    }

    pub fn list(&self) -> Vec<Arc<Export>> {
        self.0.read().values().cloned().collect()
    }
}

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client must finish negotiating within this time.
    pub handshake_timeout: Duration,
    /// Requests in flight per connection.
    pub max_requests: usize,
    /// Payload and read bytes in flight per connection (bounds memory under load).
    pub max_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(30),
            max_requests: 128,
            max_bytes: 64 << 20,
        }
    }
}

/// A listening socket.
pub enum Listener {
    Unix(UnixListener, std::path::PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `addr`. A stale unix socket file left by a dead server is replaced.
    pub async fn bind(addr: &SocketAddr) -> io::Result<Listener> {
        match addr {
            SocketAddr::Unix(path) => {
                if is_stale_socket(path).await {
                    let _ = std::fs::remove_file(path);
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
            SocketAddr::Tcp { host, port } => Ok(Listener::Tcp(
                TcpListener::bind((host.as_str(), *port)).await?,
            )),
        }
    }

    /// Accepts one connection as a plain stream (for protocols other than NBD on our
    /// listeners: the control socket, the metrics endpoint).
    pub async fn accept_stream(&self) -> io::Result<crate::addr::Stream> {
        use tokio_util::either::Either;
        Ok(match accept(self).await? {
            Accepted::Unix(s) => Either::Left(s),
            Accepted::Tcp(s, _) => {
                let _ = s.set_nodelay(true);
                Either::Right(s)
            }
        })
    }

    /// The address actually bound (useful with TCP port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Unix(_, p) => Ok(SocketAddr::Unix(p.clone())),
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(SocketAddr::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A socket file nobody answers on.
async fn is_stale_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => tokio::net::UnixStream::connect(path).await.is_err(),
        _ => false,
    }
}

/// An NBD server over an [`ExportSet`].
pub struct Server {
    exports: ExportSet,
    config: ServerConfig,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Server {
    pub fn new(exports: ExportSet, config: ServerConfig) -> Arc<Self> {
        Arc::new(Server {
            exports,
            config,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    pub fn exports(&self) -> &ExportSet {
        &self.exports
    }

    /// Accepts clients on `listener` until [`Server::shutdown`].
    pub async fn serve(self: &Arc<Self>, listener: Listener) -> io::Result<()> {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                r = accept(&listener) => match r {
                    Ok(Accepted::Unix(s)) => {
                        let (r, w) = s.into_split();
                        self.spawn_connection(r, w, "unix".to_string());
                    }
                    Ok(Accepted::Tcp(s, peer)) => {
                        let _ = s.set_nodelay(true);
                        let (r, w) = s.into_split();
                        self.spawn_connection(r, w, peer.to_string());
                    }
                    // Running out of descriptors must not end the server: wait and go on.
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// Serves one already-connected client (any byte stream) to completion.
    pub async fn serve_stream<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        self.tasks
            .track_future(self.clone().connection(r, w, "stream".into()))
            .await
    }

    fn spawn_connection<R, W>(self: &Arc<Self>, r: R, w: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.tasks.spawn(self.clone().connection(r, w, peer));
    }

    async fn connection<R, W>(self: Arc<Self>, r: R, w: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut r = BufReader::with_capacity(64 * 1024, r);
        let mut w = BufWriter::with_capacity(64 * 1024, w);
        let negotiated = tokio::select! {
            _ = self.stop.cancelled() => return,
            r = tokio::time::timeout(self.config.handshake_timeout, negotiate(&mut r, &mut w, &self.exports)) => r,
        };
        let session = match negotiated {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(%peer, "negotiation ended: {e}");
                return;
            }
            Err(_) => {
                debug!(%peer, "negotiation timed out");
                return;
            }
        };
        info!(%peer, export = %session.export.name, structured = session.structured, "client connected");
        if let Err(e) = transmission(r, w.into_inner(), session, &self.config, &self.stop).await {
            debug!(%peer, "connection ended: {e}");
        }
    }

    /// Stops accepting and reading new requests; in-flight requests finish.
    pub fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
    }

    /// After [`Server::shutdown`]: waits for every connection to end, then flushes every export.
    pub async fn finish(&self) -> Result<(), BlockError> {
        self.tasks.close();
        self.tasks.wait().await;
        for e in self.exports.list() {
            if !e.is_read_only() {
                e.dev.flush().await?;
            }
        }
        Ok(())
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
}

async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Unix(l, _) => Ok(Accepted::Unix(l.accept().await?.0)),
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            Ok(Accepted::Tcp(s, a))
        }
    }
}

/// What negotiation settled for the transmission phase.
struct Session {
    export: Arc<Export>,
    structured: bool,
    base_allocation: bool,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Option negotiation state that options change.
#[derive(Default)]
struct Negotiation {
    no_zeroes: bool,
    structured: bool,
    /// Export the `base:allocation` context was selected for.
    meta_for: Option<String>,
}

/// Runs the fixed-newstyle handshake. `Ok(None)`: the client aborted politely.
async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &ExportSet,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    w.write_all(&hello).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let mut st = Negotiation {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        ..Default::default()
    };

    loop {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ConnError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(ConnError::Protocol(format!(
                "option {option} of {len} bytes is too large"
            )));
        }
        let mut data = BytesMut::zeroed(len as usize);
        r.read_exact(&mut data).await?;
        let data = data.freeze();
        let mut out = BytesMut::new();
        let outcome = handle_option(option, data, &mut st, exports, &mut out);
        w.write_all(&out).await?;
        w.flush().await?;
        match outcome {
            OptionOutcome::Continue => {}
            OptionOutcome::Abort => return Ok(None),
            OptionOutcome::Close(why) => return Err(ConnError::Protocol(why)),
            OptionOutcome::Transmit(export) => {
                let base_allocation = st.structured && st.meta_for.as_deref() == Some(&export.name);
                return Ok(Some(Session {
                    export,
                    structured: st.structured,
                    base_allocation,
                }));
            }
        }
    }
}

enum OptionOutcome {
    Continue,
    Abort,
    Close(String),
    Transmit(Arc<Export>),
}

fn error_reply(out: &mut BytesMut, option: u32, kind: u32, msg: &str) -> OptionOutcome {
    option_reply(out, option, kind, msg.as_bytes());
    OptionOutcome::Continue
}

/// Answers one option into `out`. Pure apart from the export lookup: the fuzz target drives it.
fn handle_option(
    option: u32,
    data: Bytes,
    st: &mut Negotiation,
    exports: &ExportSet,
    out: &mut BytesMut,
) -> OptionOutcome {
    match option {
        OPT_EXPORT_NAME => {
            let Ok(name) = std::str::from_utf8(&data) else {
                return OptionOutcome::Close("export name is not UTF-8".into());
            };
            // This option has no error reply: an unknown export ends the session.
            let Some(export) = exports.get(name) else {
                return OptionOutcome::Close(format!("unknown export '{name}'"));
            };
            out.put_u64(export.dev.len());
            out.put_u16(export.transmission_flags());
            if !st.no_zeroes {
                out.put_bytes(0, 124);
            }
            OptionOutcome::Transmit(export)
        }
        OPT_ABORT => {
            option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Abort
        }
        OPT_LIST => {
            if !data.is_empty() {
                return error_reply(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            }
            for e in exports.list() {
                let mut d = BytesMut::new();
                d.put_u32(e.name.len() as u32);
                d.put_slice(e.name.as_bytes());
                d.put_slice(e.description.as_bytes());
                option_reply(out, option, REP_SERVER, &d);
            }
            option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Continue
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return error_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                );
            }
            st.structured = true;
            option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Continue
        }
        OPT_INFO | OPT_GO => info_or_go(option, data, st, exports, out),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(option, data, st, exports, out)
        }
        OPT_STARTTLS => error_reply(
            out,
            option,
            REP_ERR_UNSUP,
            "TLS is not supported by this server",
        ),
        _ => error_reply(
            out,
            option,
            REP_ERR_UNSUP,
            &format!("option {option} is not supported"),
        ),
    }
}

/// Looks up the export an option names, answering NBD_REP_ERR_UNKNOWN when there is none.
fn known_export(
    exports: &ExportSet,
    name: &str,
    option: u32,
    out: &mut BytesMut,
) -> Result<Arc<Export>, OptionOutcome> {
    exports.get(name).ok_or_else(|| {
        error_reply(
            out,
            option,
            REP_ERR_UNKNOWN,
            &format!("unknown export '{name}'"),
        )
    })
}

fn info_or_go(
    option: u32,
    data: Bytes,
    st: &mut Negotiation,
    exports: &ExportSet,
    out: &mut BytesMut,
) -> OptionOutcome {
    let req = match InfoRequest::parse(data) {
        Ok(r) => r,
        Err(e) => return error_reply(out, option, REP_ERR_INVALID, &e.to_string()),
    };
    let export = match known_export(exports, &req.name, option, out) {
        Ok(e) => e,
        Err(outcome) => return outcome,
    };
    let mut info = |kind: u16, body: &dyn Fn(&mut BytesMut)| {
        let mut d = BytesMut::new();
        d.put_u16(kind);
        body(&mut d);
        option_reply(out, option, REP_INFO, &d);
    };
    info(INFO_EXPORT, &|d| {
        d.put_u64(export.dev.len());
        d.put_u16(export.transmission_flags());
    });
    if req.infos.contains(&INFO_NAME) {
        info(INFO_NAME, &|d| d.put_slice(export.name.as_bytes()));
    }
    if req.infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        info(INFO_DESCRIPTION, &|d| {
            d.put_slice(export.description.as_bytes())
        });
    }
    let sizes = export.dev.info();
    info(INFO_BLOCK_SIZE, &|d| {
        d.put_u32(sizes.min_block.max(1));
        d.put_u32(sizes.preferred_block.max(sizes.min_block).max(512));
        d.put_u32(sizes.max_request.min(MAX_PAYLOAD));
    });
    option_reply(out, option, REP_ACK, &[]);
    if option == OPT_GO {
        // A context selected for another export does not carry over.
        if st.meta_for.as_deref() != Some(&export.name) {
            st.meta_for = None;
        }
        OptionOutcome::Transmit(export)
    } else {
        OptionOutcome::Continue
    }
}

fn meta_context(
    option: u32,
    data: Bytes,
    st: &mut Negotiation,
    exports: &ExportSet,
    out: &mut BytesMut,
) -> OptionOutcome {
    let req = match MetaContextRequest::parse(data) {
        Ok(r) => r,
        Err(e) => return error_reply(out, option, REP_ERR_INVALID, &e.to_string()),
    };
    if option == OPT_SET_META_CONTEXT && !st.structured {
        return error_reply(
            out,
            option,
            REP_ERR_INVALID,
            "structured replies must be negotiated first",
        );
    }
    let export = match known_export(exports, &req.name, option, out) {
        Ok(e) => e,
        Err(outcome) => return outcome,
    };
    let list_all = option == OPT_LIST_META_CONTEXT && req.queries.is_empty();
    let selected = list_all || req.queries.iter().any(|q| query_matches_base_allocation(q));
    if selected {
        let mut d = BytesMut::new();
        d.put_u32(BASE_ALLOCATION_ID);
        d.put_slice(BASE_ALLOCATION.as_bytes());
        option_reply(out, option, REP_META_CONTEXT, &d);
    }
    if option == OPT_SET_META_CONTEXT {
        st.meta_for = selected.then(|| export.name.clone());
    }
    option_reply(out, option, REP_ACK, &[]);
    OptionOutcome::Continue
}

/// A reply ready for the writer.
struct Reply {
    header: Bytes,
    data: Option<Bytes>,
    /// Bytes this request counts against the connection's budget.
    cost: usize,
}

/// What one connection has in flight, from reading a request until its reply is sent. The
/// reader stops reading while it is over either bound, so a client that sends faster than the
/// export answers (or never reads its replies) holds at most the bounds plus one request.
struct Budget {
    requests: AtomicUsize,
    bytes: AtomicUsize,
    max_requests: usize,
    max_bytes: usize,
    freed: Notify,
}

impl Budget {
    fn has_room(&self) -> bool {
        self.requests.load(Ordering::Acquire) < self.max_requests
            && self.bytes.load(Ordering::Acquire) < self.max_bytes
    }

    fn take(&self, bytes: usize) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn release(&self, requests: usize, bytes: usize) {
        self.requests.fetch_sub(requests, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.freed.notify_one();
    }
}

/// What reading the next request gave.
enum Incoming {
    Request(Request, Bytes),
    /// NBD_CMD_DISC or the end of the stream.
    End,
}

/// Reads one request and its payload. Owns the reader so that the read can stay pending across
/// the connection loop's turns without ever being dropped half-way.
async fn read_request<R: AsyncRead + Unpin>(mut r: R) -> (R, Result<Incoming, ConnError>) {
    let result = async {
        let mut hdr = [0u8; REQUEST_LEN];
        if let Err(e) = r.read_exact(&mut hdr).await {
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(Incoming::End)
            } else {
                Err(e.into())
            };
        }
        let req = Request::parse(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if req.kind == CMD_DISC {
            return Ok(Incoming::End);
        }
        if req.has_payload() && req.length > MAX_PAYLOAD {
            // The payload cannot be buffered and skipping gigabytes is no better: the stream
            // cannot be trusted any more.
            return Err(ConnError::Protocol(format!(
                "write of {} bytes exceeds the limit",
                req.length
            )));
        }
        let payload = if req.has_payload() {
            // Read into spare capacity: zeroing the buffer first would only be overwritten.
            let len = req.length as usize;
            let mut buf = BytesMut::with_capacity(len);
            while buf.len() < len {
                // `take` bounds the read even if the allocator gave more capacity than asked.
                let want = (len - buf.len()) as u64;
                if (&mut r).take(want).read_buf(&mut buf).await? == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
            }
            buf.freeze()
        } else {
            Bytes::new()
        };
        Ok(Incoming::Request(req, payload))
    }
    .await;
    (r, result)
}

/// The transmission phase of one connection.
///
/// One task reads requests and polls them all as futures; replies that are ready together go
/// to the writer task as one batch and leave in one send. Nothing is spawned per request: on a
/// small machine the task switches were most of a 4 KiB write's cost.
async fn transmission<R, W>(
    r: R,
    w: W,
    session: Session,
    config: &ServerConfig,
    stop: &CancellationToken,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = Arc::new(session);
    let budget = Arc::new(Budget {
        requests: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        max_requests: config.max_requests.max(1),
        max_bytes: config.max_bytes.max(MAX_PAYLOAD as usize),
        freed: Notify::new(),
    });
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Reply>>();
    let dead = CancellationToken::new();
    let writer = tokio::spawn(write_replies(w, rx, dead.clone(), budget.clone()));
    let mut running: FuturesUnordered<Pin<Box<dyn Future<Output = Reply> + Send>>> =
        FuturesUnordered::new();
    let mut reading = Box::pin(read_request(r));

    let result = loop {
        let room = budget.has_room();
        tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            _ = dead.cancelled() => break Ok(()),
            Some(reply) = running.next(), if !running.is_empty() => {
                let mut batch = vec![reply];
                // Every other reply that is ready now leaves with it.
                while let Some(Some(reply)) = running.next().now_or_never() {
                    batch.push(reply);
                }
                let _ = tx.send(batch);
            }
            _ = budget.freed.notified(), if !room => {}
            (r, incoming) = &mut reading, if room => {
                let (req, payload) = match incoming {
                    Ok(Incoming::Request(req, payload)) => (req, payload),
                    Ok(Incoming::End) => break Ok(()),
                    Err(e) => break Err(e),
                };
                reading.set(read_request(r));
                let cost = if req.has_payload() || req.kind == CMD_READ {
                    req.length.min(MAX_PAYLOAD) as usize
                } else {
                    0
                };
                budget.take(cost);
                let session = session.clone();
                running.push(Box::pin(async move {
                    // A panic ends this request with an error, not the connection's other
                    // requests half-way.
                    let executed = AssertUnwindSafe(execute(&session, req, payload))
                        .catch_unwind()
                        .await;
                    let (header, data) = executed.unwrap_or_else(|_| {
                        frame(
                            &session,
                            &req,
                            Outcome::Error(EIO, "internal error: the request panicked".into()),
                        )
                    });
                    Reply { header, data, cost }
                }));
            }
        }
    };
    // Requests already read run to the end even if nobody will read their replies: a write
    // stopped half-way (on a replicating node, applied but not forwarded) would be worse.
    while let Some(reply) = running.next().await {
        let _ = tx.send(vec![reply]);
    }
    drop(tx);
    let _ = writer.await;
    result
}

async fn write_replies<W>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<Reply>>,
    dead: CancellationToken,
    budget: Arc<Budget>,
) where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let r: io::Result<()> = async {
        while let Some(batch) = rx.recv().await {
            let (mut requests, mut bytes) = (0, 0);
            let mut next = Some(batch);
            while let Some(batch) = next {
                for reply in &batch {
                    write_reply(&mut w, reply).await?;
                    requests += 1;
                    bytes += reply.cost;
                }
                next = rx.try_recv().ok();
            }
            w.flush().await?;
            budget.release(requests, bytes);
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        debug!("writing replies failed: {e}");
        dead.cancel();
        rx.close();
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> io::Result<()> {
    w.write_all(&reply.header).await?;
    if let Some(d) = &reply.data {
        w.write_all(d).await?;
    }
    Ok(())
}

/// Command flags valid for each command.
fn allowed_flags(kind: u16) -> u16 {
    match kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// Outcome of a command before it is framed.
enum Outcome {
    Done,
    Data(Bytes),
    Extents(ExtentList),
    Error(u32, String),
}

fn block_error(e: BlockError) -> Outcome {
    let errno = match e.kind {
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfRange => EINVAL,
        k => wire_errno(k.errno()),
    };
    Outcome::Error(errno, e.to_string())
}

/// Runs one request against the export and frames its reply.
async fn execute(s: &Session, req: Request, payload: Bytes) -> (Bytes, Option<Bytes>) {
    let outcome = run_command(s, &req, payload).await;
    frame(s, &req, outcome)
}

async fn run_command(s: &Session, req: &Request, payload: Bytes) -> Outcome {
    let dev = &s.export.dev;
    let size = dev.len();
    let len = req.length as u64;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    if req.flags & !allowed_flags(req.kind) != 0 {
        return Outcome::Error(
            EINVAL,
            format!("flags {:#x} not valid for command {}", req.flags, req.kind),
        );
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.export.is_read_only() {
        return Outcome::Error(EPERM, "export is read-only".into());
    }
    let known = matches!(
        req.kind,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if !known {
        return Outcome::Error(EINVAL, format!("unknown command {}", req.kind));
    }
    if req.kind != CMD_FLUSH && req.offset.checked_add(len).is_none_or(|end| end > size) {
        let errno = if writes { ENOSPC } else { EINVAL };
        return Outcome::Error(
            errno,
            format!(
                "request {}+{} beyond the export size {size}",
                req.offset, len
            ),
        );
    }
    let result = match req.kind {
        CMD_READ => {
            if req.length > MAX_PAYLOAD {
                return Outcome::Error(
                    EINVAL,
                    format!("read of {} bytes exceeds the limit", req.length),
                );
            }
            return dev
                .read(req.offset, req.length as usize)
                .await
                .map_or_else(block_error, Outcome::Data);
        }
        CMD_WRITE => dev.write(req.offset, payload, WriteFlags { fua }).await,
        CMD_FLUSH => dev.flush().await,
        CMD_TRIM => match dev.discard(req.offset, len).await {
            Ok(()) if fua => dev.flush().await,
            r => r,
        },
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                fua,
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            dev.write_zeroes(req.offset, len, flags).await
        }
        // Nothing to prefetch into: our devices cache in the kernel or in memory already.
        CMD_CACHE => Ok(()),
        CMD_BLOCK_STATUS => {
            if !s.base_allocation {
                return Outcome::Error(EINVAL, "no metadata context was negotiated".into());
            }
            if len == 0 {
                return Outcome::Error(EINVAL, "block status of zero bytes".into());
            }
            return match dev.block_status(req.offset, len).await {
                Ok(mut list) => {
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        list.0.truncate(1);
                    }
                    Outcome::Extents(list)
                }
                Err(e) => block_error(e),
            };
        }
        _ => unreachable!("checked above"),
    };
    result.map_or_else(block_error, |()| Outcome::Done)
}

fn frame(s: &Session, req: &Request, outcome: Outcome) -> (Bytes, Option<Bytes>) {
    let mut h = BytesMut::with_capacity(64);
    if !s.structured {
        match outcome {
            Outcome::Data(d) => {
                simple_reply(&mut h, 0, req.cookie);
                return (h.freeze(), Some(d));
            }
            Outcome::Error(e, _) => simple_reply(&mut h, e, req.cookie),
            Outcome::Done | Outcome::Extents(_) => simple_reply(&mut h, 0, req.cookie),
        }
        return (h.freeze(), None);
    }
    match outcome {
        Outcome::Done => chunk_header(&mut h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0),
        Outcome::Data(d) => {
            chunk_header(
                &mut h,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + d.len() as u32,
            );
            h.put_u64(req.offset);
            return (h.freeze(), Some(d));
        }
        Outcome::Extents(list) => {
            chunk_header(
                &mut h,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                4 + 8 * list.0.len() as u32,
            );
            h.put_u32(BASE_ALLOCATION_ID);
            for e in list.iter() {
                h.put_u32(e.len.min(u32::MAX as u64) as u32);
                h.put_u32(
                    if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 },
                );
            }
        }
        Outcome::Error(errno, msg) => {
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            chunk_header(
                &mut h,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                6 + msg.len() as u32,
            );
            h.put_u32(errno);
            h.put_u16(msg.len() as u16);
            h.put_slice(msg);
        }
    }
    (h.freeze(), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemoryDev;

    fn exports() -> ExportSet {
        let set = ExportSet::new();
        set.add(Export::new("disk", Arc::new(MemoryDev::new(1 << 20))));
        set
    }

    #[test]
    fn empty_name_means_the_only_export() {
        let set = exports();
        assert_eq!(set.get("").unwrap().name, "disk");
        set.add(Export::new("other", Arc::new(MemoryDev::new(512))));
        assert!(set.get("").is_none());
    }

    #[test]
    fn go_for_unknown_export_replies_err_unknown_and_goes_on() {
        let mut st = Negotiation::default();
        let mut data = BytesMut::new();
        InfoRequest {
            name: "nope".into(),
            infos: vec![],
        }
        .encode(&mut data);
        let mut out = BytesMut::new();
        let o = handle_option(OPT_GO, data.freeze(), &mut st, &exports(), &mut out);
        assert!(matches!(o, OptionOutcome::Continue));
        assert_eq!(&out[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ERR_UNKNOWN.to_be_bytes());
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let mut st = Negotiation::default();
        let mut data = BytesMut::new();
        MetaContextRequest {
            name: "disk".into(),
            queries: vec![BASE_ALLOCATION.into()],
        }
        .encode(&mut data);
        let mut out = BytesMut::new();
        handle_option(
            OPT_SET_META_CONTEXT,
            data.clone().freeze(),
            &mut st,
            &exports(),
            &mut out,
        );
        assert_eq!(&out[12..16], &REP_ERR_INVALID.to_be_bytes());
        st.structured = true;
        out.clear();
        handle_option(
            OPT_SET_META_CONTEXT,
            data.freeze(),
            &mut st,
            &exports(),
            &mut out,
        );
        assert_eq!(&out[12..16], &REP_META_CONTEXT.to_be_bytes());
        assert_eq!(st.meta_for.as_deref(), Some("disk"));
    }
}

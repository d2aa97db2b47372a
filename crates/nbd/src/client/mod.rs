//! The pipelined NBD client: how the replication primary reaches the secondary's disk.
//!
//! ```text
//!   callers (any task) --submit--> cookie -> Pending{waiter, slot} in the pending map
//!        |  (write_batch: a run of         ^                     |
//!        |   frames, one waiter)           | take / put back     | reply or failure
//!        v                                 |                     v
//!   writer task: everything queued      reader task: parses simple replies and structured
//!   goes out in one vectored send       chunks, fills the read buffer in place, completes
//!        |                                 ^   the waiter on the DONE chunk (a oneshot, or
//!        '------------> socket ------------'   its batch's count, woken at the last reply)
//! ```
//!
//! Many requests share one connection (bounded by [`ClientConfig::max_in_flight`]); replies are
//! matched by cookie and may come in any order. A caller only ever hands whole frames to the
//! writer task, so dropping a request future can never leave half a request on the wire; its
//! reply, when it comes, is simply discarded.
//!
//! The connection is all-or-nothing. Any protocol violation by the server (bad magic, unknown
//! cookie, a chunk outside its request, ...), a broken socket, or a request that gets no reply
//! within [`ClientConfig::request_timeout`] kills it: every pending request fails with
//! [`ErrorKind::Shutdown`] (the timed-out one with [`ErrorKind::TimedOut`]) and later requests
//! fail at once. Nothing hangs and nothing is retried here: after a lost reply the server's
//! state is unknown, and the replication layer above decides what that means.
//!
//! The client honours what the server advertises: requests above its maximum block size (or
//! 32 MiB) are split, write-zeroes becomes writes of zero buffers where the server lacks it,
//! trim is dropped where the server lacks it (its content is unspecified anyway), FUA becomes a
//! flush after the write, and block status reports everything allocated when the server offers
//! no `base:allocation` context. Requests are not aligned for the server: callers keep to
//! [`ExportInfo::block_size`] (the block layer's [`DevInfo::min_block`](blockdev::DevInfo::min_block)).

mod export;
mod handshake;
mod inflight;
mod reader;
#[cfg(test)]
mod scripted;
mod split;
mod submit;
mod writer;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockError, ErrorKind, Op, Result};
use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use export::{BlockSize, ExportInfo};

use crate::addr::SocketAddr;
use crate::proto::*;
use crate::uri::NbdUri;
use handshake::{HandshakeError, bounded, negotiate, options, starttls};
use inflight::{Outgoing, Shared, State};
use reader::{ReplyReader, Session};
use writer::write_frames;

/// Default for [`ClientConfig::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Upper bound on [`ClientConfig::max_in_flight`] (cookies and permits stay cheap).
pub const MAX_IN_FLIGHT: usize = 4096;
/// Default for [`ClientConfig::request_timeout`] and [`ClientConfig::handshake_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The reader's buffer: a burst of replies is parsed from one receive.
const READ_BUFFER: usize = 256 * 1024;
/// How long [`NbdClient::disconnect`] waits for the disconnect request to leave.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Requests in flight on the connection (clamped to `1..=MAX_IN_FLIGHT`).
    pub max_in_flight: usize,
    /// A request with no reply after this long fails with [`ErrorKind::TimedOut`] and closes the
    /// connection. `None` waits forever (only sensible when something else watches the peer).
    pub request_timeout: Option<Duration>,
    /// Connecting and negotiating must finish within this time.
    pub handshake_timeout: Option<Duration>,
    /// Ask for structured replies (sparse reads, error messages, block status).
    pub structured_replies: bool,
    /// Ask for the `base:allocation` metadata context (needs structured replies).
    pub block_status: bool,
    /// Connect over TLS with these credentials: NBD_OPT_STARTTLS first, the server's
    /// certificate checked (its name too over TCP), no fallback to the clear.
    /// [`NbdClient::connect_uri`] uses them only for the `nbds` schemes.
    pub tls: Option<Arc<net::TlsClient>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            request_timeout: Some(DEFAULT_TIMEOUT),
            handshake_timeout: Some(DEFAULT_TIMEOUT),
            structured_replies: true,
            block_status: true,
            tls: None,
        }
    }
}

impl ClientConfig {
    fn in_flight(&self) -> usize {
        self.max_in_flight.clamp(1, MAX_IN_FLIGHT)
    }
}

/// An NBD connection to one export; also a [`BlockDev`](blockdev::BlockDev).
///
/// Share it as `Arc<NbdClient>` (or `Arc<dyn BlockDev>`): every method takes `&self`, and
/// concurrent calls are pipelined on the one connection. Dropping it closes the connection
/// abruptly; [`NbdClient::disconnect`] closes it politely.
pub struct NbdClient {
    shared: Arc<Shared>,
    info: ExportInfo,
    config: ClientConfig,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("label", &self.shared.label)
            .field("info", &self.info)
            .field("dead", &self.shared.dead_reason())
            .finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.shared.close("the client was dropped", false);
    }
}

/// The OS error says why (it is the error's own text), the context only where.
fn connect_error(e: io::Error, label: &str) -> BlockError {
    let detail = format!("{label}: cannot connect");
    match e.kind() {
        io::ErrorKind::TimedOut => BlockError::new(ErrorKind::TimedOut, Op::Open, 0),
        _ => BlockError::from_io(e, Op::Open, 0),
    }
    .context(detail)
}

/// Opens the socket, split so that the reader and writer tasks each own a half.
async fn open_socket(addr: &SocketAddr) -> io::Result<(BoxRead, BoxWrite)> {
    match addr {
        SocketAddr::Unix(path) => {
            let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        SocketAddr::Tcp { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            // Request headers are small; waiting to coalesce them only adds latency.
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

impl NbdClient {
    /// Connects to `addr` and opens `export` (the empty name is the server's default export).
    pub async fn connect(
        addr: &SocketAddr,
        export: &str,
        config: ClientConfig,
    ) -> Result<NbdClient> {
        let label = format!("NBD export '{export}' at {addr}");
        if let Some(tls) = config.tls.clone() {
            return Self::connect_tls(addr, export, config, &tls, label).await;
        }
        let opened = match config.handshake_timeout {
            None => open_socket(addr).await,
            Some(d) => tokio::time::timeout(d, open_socket(addr))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        };
        let (r, w) = opened.map_err(|e| connect_error(e, &label))?;
        Self::start(r, w, export, config, label).await
    }

    /// Over TLS: the greeting and STARTTLS in the clear, the TLS handshake, then the options.
    /// All of it within the handshake timeout.
    async fn connect_tls(
        addr: &SocketAddr,
        export: &str,
        config: ClientConfig,
        tls: &net::TlsClient,
        label: String,
    ) -> Result<NbdClient> {
        let host = match addr {
            SocketAddr::Tcp { host, .. } => Some(host.as_str()),
            SocketAddr::Unix(_) => None,
        };
        let opened = match config.handshake_timeout {
            None => addr.connect().await,
            Some(d) => tokio::time::timeout(d, addr.connect())
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        };
        let mut s = opened.map_err(|e| connect_error(e, &label))?;
        let (r, w, info) = bounded(config.handshake_timeout, async {
            let greeting = starttls(&mut s).await?;
            let (s, dn) = tls.connect(host, s).await.map_err(HandshakeError::Tls)?;
            debug!("{label}: TLS with '{dn}'");
            let (r, mut w) = tokio::io::split(s);
            let mut r = BufReader::with_capacity(READ_BUFFER, r);
            let info = options(&mut r, &mut w, export, &config, greeting).await?;
            Ok((r, w, info))
        })
        .await
        .map_err(|e| e.into_block_error(&label))?;
        Ok(Self::spawn(r, w, info, config, label))
    }

    /// Connects to an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`,
    /// and over TLS `nbds://...`, `nbds+unix://...` with the credentials in
    /// [`ClientConfig::tls`]).
    pub async fn connect_uri(uri: &str, mut config: ClientConfig) -> Result<NbdClient> {
        let uri: NbdUri = uri.parse().map_err(|e: crate::uri::UriError| {
            BlockError::new(ErrorKind::InvalidArgument, Op::Open, 0).context(e.to_string())
        })?;
        if !uri.tls {
            config.tls = None;
        } else if config.tls.is_none() {
            return Err(
                BlockError::new(ErrorKind::InvalidArgument, Op::Open, 0).context(format!(
                    "{uri}: the nbds schemes need TLS credentials (--tls-creds DIR)"
                )),
            );
        }
        Self::connect(&uri.addr, &uri.export, config).await
    }

    /// Negotiates over an already connected byte stream (tunnels, tests).
    pub async fn from_stream<S>(stream: S, export: &str, config: ClientConfig) -> Result<NbdClient>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::start(r, w, export, config, format!("NBD export '{export}'")).await
    }

    async fn start<R, W>(
        r: R,
        mut w: W,
        export: &str,
        config: ClientConfig,
        label: String,
    ) -> Result<NbdClient>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // The reader keeps this BufReader: bytes it buffered during the handshake are replies.
        let mut r = BufReader::with_capacity(READ_BUFFER, r);
        let info = bounded(
            config.handshake_timeout,
            negotiate(&mut r, &mut w, export, &config),
        )
        .await
        .map_err(|e| e.into_block_error(&label))?;
        Ok(Self::spawn(r, w, info, config, label))
    }

    /// Starts the reader and writer tasks on a negotiated connection.
    fn spawn<R, W>(
        r: BufReader<R>,
        w: W,
        info: ExportInfo,
        config: ClientConfig,
        label: String,
    ) -> NbdClient
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        debug!(
            "{label}: connected, {} bytes, flags {:#x}, structured {}, base:allocation {:?}",
            info.size, info.flags, info.structured_replies, info.base_allocation
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            label,
            state: Mutex::new(State::default()),
            slots: Arc::new(Semaphore::new(config.in_flight())),
            outgoing: tx,
            stop: CancellationToken::new(),
        });
        let session = Session {
            structured: info.structured_replies,
            meta_id: info.base_allocation,
        };
        let reader = ReplyReader {
            r,
            shared: shared.clone(),
            session,
            current: None,
        };
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = reader.run() => {}
            }
        });
        let (stop, sh) = (shared.stop.clone(), shared.clone());
        let writer = tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                r = write_frames(w, &mut rx) => if let Err(e) = r {
                    sh.kill(format!("sending to the server failed: {e}"));
                },
            }
        });
        NbdClient {
            shared,
            info,
            config,
            writer: Mutex::new(Some(writer)),
        }
    }

    /// What negotiation settled (size, flags, block sizes, contexts).
    pub fn export_info(&self) -> &ExportInfo {
        &self.info
    }

    /// The connection can still take requests.
    pub fn is_alive(&self) -> bool {
        let st = self.shared.state.lock();
        st.dead.is_none() && !st.closing
    }

    /// Why the connection is closed, once it is.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.dead_reason()
    }

    /// Closes the connection politely: new requests are refused, requests in flight finish
    /// (each within the request timeout), NBD_CMD_DISC is sent and the socket shut down.
    pub async fn disconnect(&self) {
        {
            let mut st = self.shared.state.lock();
            if st.dead.is_some() || st.closing {
                return;
            }
            st.closing = true;
        }
        let all = self.config.in_flight() as u32;
        if let Ok(_all) = self.shared.slots.acquire_many(all).await {
            self.send_disconnect().await;
        }
        self.shared.close("the client disconnected", false);
    }

    async fn send_disconnect(&self) {
        let cookie = {
            let mut st = self.shared.state.lock();
            st.disc_sent = true;
            st.next_cookie += 1;
            st.next_cookie
        };
        let mut frame = BytesMut::with_capacity(REQUEST_LEN);
        Request {
            flags: 0,
            kind: CMD_DISC,
            cookie,
            offset: 0,
            length: 0,
        }
        .encode(&mut frame);
        let _ = self.shared.outgoing.send(Outgoing::Request {
            frame: frame.freeze(),
            payload: None,
        });
        let _ = self.shared.outgoing.send(Outgoing::Close);
        let writer = self.writer.lock().take();
        if let Some(w) = writer {
            let _ = tokio::time::timeout(DISCONNECT_GRACE, w).await;
        }
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

#[cfg(test)]
mod tests {
    use super::scripted::*;
    use super::*;
    use blockdev::BlockDev;
    use std::io;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn disconnect_sends_disc_and_refuses_later_requests() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        c.disconnect().await;
        let (r, _) = read_request(&mut s).await;
        assert_eq!(r.kind, CMD_DISC);
        assert_eq!(
            s.read_u8().await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let err = c.flush().await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Shutdown);
        assert!(err.to_string().contains("client disconnected"), "{err}");
    }

    #[tokio::test]
    async fn connect_error_says_the_os_error_once() {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::Unix(dir.path().join("absent.sock"));
        let err = NbdClient::connect(&addr, "disk", ClientConfig::default())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
        assert!(text.contains("cannot connect"), "{text}");
    }
}

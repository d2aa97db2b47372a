//! The NBD server: serves [`blockdev::BlockDev`]s as named exports over unix and TCP sockets.
//!
//! ```text
//!  net::Acceptor --(one task per client, at most max_connections)--> handshake (options)
//!                                           |                        within handshake_timeout
//!                                           v
//!      connection task: read header [+ payload] -> request future --BlockDev--> reply
//!          (all of a connection's requests are      ^ bounded per connection and by |
//!           polled by its one task)                 | the server's payload budget   |
//!                 '-- budget freed -- writer task <---- replies ready together -----'
//! ```
//!
//! One file per phase: [`export`] (what is offered), `handshake` (option negotiation), `tls`
//! (STARTTLS: the clear part, the TLS handshake, the options again),
//! `transmission` (the request loop and the writer), `command` (running one request and
//! framing its reply), [`budget`] (memory for payloads).
//!
//! Replies leave in completion order, so one slow request does not hold up the others (devices
//! run on the connection's own thread only calls they measured to be fast). Bad
//! traffic from one client ends that client's connection (or gets the protocol's error reply)
//! and touches nothing else; memory for payloads is one budget for all clients, and a client
//! that sits on its share while others wait for it is closed. [`Server::shutdown`] stops
//! accepting and reading, lets in-flight requests finish, and [`Server::finish`] then flushes
//! every export.

pub mod budget;
mod claim;
mod command;
pub mod export;
mod handshake;
mod tls;
mod transmission;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use blockdev::BlockError;
use net::{Acceptor, Connection};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use budget::PayloadBudget;
pub use export::{Export, ExportSet};
/// Listening sockets live in the `net` crate; this path stays for existing users.
pub use net::Listener;

pub use tls::TlsPolicy;

use tls::{Transport, handshake};
use transmission::transmission;

/// Server limits.
///
/// Clones share the payload budget: give two servers of one daemon clones of one config and
/// they share one budget.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client must finish negotiating within this time (qemu-nbd's default, 10 s), so that
    /// clients that connect and say nothing do not keep connection slots.
    pub handshake_timeout: Duration,
    /// Connections open at once on each listener; more wait in the listen queue until one
    /// closes.
    pub max_connections: usize,
    /// Requests in flight per connection.
    pub max_requests: usize,
    /// Payload and read bytes in flight per connection (at least one maximal request): one
    /// client alone cannot take the whole payload budget.
    pub max_bytes: usize,
    /// Memory for write payloads and read replies, shared by every connection.
    pub payload_budget: PayloadBudget,
    /// While requests wait for payload budget, a connection that holds some and has moved no
    /// byte of a reply or of a write payload for this long is closed; at shutdown, a client
    /// that takes no reply for this long is not waited for.
    pub stall_timeout: Duration,
}

impl ServerConfig {
    /// Default for [`ServerConfig::max_connections`]: enough for every VM, tool and peer that
    /// reasonably share an export, and with the control socket's and the metrics endpoint's
    /// bounds still under the usual 1024 open files when the limit cannot be raised.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_requests: 128,
            max_bytes: 32 << 20,
            payload_budget: PayloadBudget::default(),
            stall_timeout: Duration::from_secs(1),
        }
    }
}

/// An NBD server over an [`ExportSet`].
pub struct Server {
    exports: ExportSet,
    config: ServerConfig,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Clients in the transmission phase, per export name.
    clients: parking_lot::Mutex<std::collections::HashMap<String, usize>>,
    /// Who holds each single-writer export.
    claims: Arc<claim::Claims>,
}

impl Server {
    /// A server for `exports`; it serves once given a listener ([`Server::serve`]) or a stream
    /// ([`Server::serve_stream`]).
    pub fn new(exports: ExportSet, config: ServerConfig) -> Arc<Self> {
        Arc::new(Server {
            exports,
            config,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            clients: Default::default(),
            claims: Default::default(),
        })
    }

    /// Clients connected to export `name` now (past the handshake).
    pub fn clients(&self, name: &str) -> usize {
        self.clients.lock().get(name).copied().unwrap_or(0)
    }

    /// The exports served; changes show to clients that connect afterwards.
    pub fn exports(&self) -> &ExportSet {
        &self.exports
    }

    /// The payload budget, to watch what the server holds.
    pub fn payload_budget(&self) -> &PayloadBudget {
        &self.config.payload_budget
    }

    /// Accepts clients on `listener` until [`Server::shutdown`], without TLS.
    pub async fn serve(self: &Arc<Self>, listener: Listener) -> io::Result<()> {
        self.serve_with(listener, TlsPolicy::Off).await
    }

    /// Accepts clients on `listener` until [`Server::shutdown`], with TLS as `tls` says.
    pub async fn serve_with(
        self: &Arc<Self>,
        listener: Listener,
        tls: TlsPolicy,
    ) -> io::Result<()> {
        let acceptor = Acceptor::new("nbd", self.config.max_connections)
            .with_stop(self.stop.clone())
            .with_tasks(self.tasks.clone());
        acceptor
            .run(&listener, |c: Connection| {
                let peer = c.peer.to_string();
                self.clone()
                    .connection(c.stream, tls.clone(), peer, net::addr::split)
            })
            .await;
        Ok(())
    }

    /// Serves one already-connected client (any byte stream) to completion, without TLS.
    pub async fn serve_stream<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        self.serve_stream_with(stream, TlsPolicy::Off).await
    }

    /// Serves one already-connected client (any byte stream) to completion, with TLS as `tls`
    /// says.
    pub async fn serve_stream_with<S>(self: &Arc<Self>, stream: S, tls: TlsPolicy)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let conn =
            self.clone()
                .connection(Box::pin(stream), tls, "stream".into(), tokio::io::split);
        self.tasks.track_future(conn).await
    }

    async fn connection<S, R, W>(
        self: Arc<Self>,
        stream: S,
        tls: TlsPolicy,
        peer: String,
        split: fn(S) -> (R, W),
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let limit = self.config.handshake_timeout;
        let negotiated = tokio::select! {
            _ = self.stop.cancelled() => return,
            r = tokio::time::timeout(limit, handshake(stream, &self.exports, &tls, (&self.claims, &peer))) => r,
        };
        let n = match negotiated {
            Ok(Ok(Some(n))) => n,
            Ok(Ok(None)) => return,
            // A refused certificate is worth an operator's attention; garbage is not.
            Ok(Err(ConnError::Tls(e))) => {
                warn!(%peer, "TLS refused: {e}");
                return;
            }
            Ok(Err(e)) => {
                debug!(%peer, "negotiation ended: {e}");
                return;
            }
            Err(_) => {
                info!(%peer, timeout = ?limit, "closing a client that did not finish negotiating in time");
                return;
            }
        };
        let peer = match &n.identity {
            Some(dn) => format!("{peer} ({dn})"),
            None => peer,
        };
        match n.transport {
            Transport::Plain(s) => {
                let (r, w) = split(s);
                self.transmit(r, w, n.leftover, n.session, peer).await
            }
            Transport::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                self.transmit(r, w, n.leftover, n.session, peer).await
            }
        }
    }

    async fn transmit<R, W>(&self, r: R, w: W, leftover: Vec<u8>, session: Session, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let r = BufReader::with_capacity(64 * 1024, std::io::Cursor::new(leftover).chain(r));
        let export = session.export.name.clone();
        if let Some(old) = session.claim.as_ref().and_then(|c| c.previous.clone()) {
            info!(%peer, %export, "the same client connected again: closing its old connection");
            // The old connection's requests land before the new one's (they were sent first).
            if tokio::time::timeout(OLD_WRITER_GRACE, old.cancelled())
                .await
                .is_err()
            {
                warn!(%peer, %export, "the old connection did not end within {OLD_WRITER_GRACE:?}");
                return;
            }
        }
        info!(%peer, %export, structured = session.structured, "client connected");
        *self.clients.lock().entry(export.clone()).or_default() += 1;
        let ended = transmission(r, w, session, self, &peer).await;
        if let Some(n) = self.clients.lock().get_mut(&export) {
            *n -= 1;
        }
        match ended {
            Ok(()) => info!(%peer, %export, "client disconnected"),
            Err(e) => info!(%peer, %export, "client disconnected: {e}"),
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

/// What negotiation settled for the transmission phase.
struct Session {
    export: Arc<Export>,
    structured: bool,
    base_allocation: bool,
    /// The hold on a single-writer export, released when the connection's last request ends.
    claim: Option<claim::Claim>,
}

/// How long a connection replacing its own old one waits for the old one's requests to end.
const OLD_WRITER_GRACE: Duration = Duration::from_secs(30);

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] net::TlsError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("the client moved nothing for {0:?} while others waited for memory")]
    Stalled(Duration),
}

//! The control socket's listener: accepts connections (TLS first on TCP with credentials, as
//! QEMU's chardev `tls-creds`) and hands each to the QMP server with the client's identity:
//! its certificate's name, its uid on a unix socket, its address otherwise.

use std::sync::Arc;
use std::time::Duration;

use nbd::addr::SocketAddr;
use net::{Acceptor, Connection};
use qmp::QmpServer;
use tokio_util::either::Either;
use tracing::{info, warn};

use super::security::{Security, current};

/// A control client must finish its TLS handshake within this time (the QMP server's own
/// negotiation timeout starts after it).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Control connections open at once. An orchestrator needs one or two and `coloblk ctl` one at
/// a time; 64 leaves room for scripts and monitoring while idle clients cannot take the
/// descriptors the VM's export needs (the QMP server closes silent and idle sessions).
pub const MAX_CONTROL_CONNECTIONS: usize = 64;

/// Serves the control socket until the task is dropped.
pub async fn serve(
    addr: &SocketAddr,
    server: Arc<QmpServer>,
    sec: &Security,
) -> anyhow::Result<()> {
    let tls = sec.control_tls(addr)?;
    accepting(addr, "control", MAX_CONTROL_CONNECTIONS, move |c| {
        let (server, tls) = (server.clone(), tls.clone());
        async move {
            let peer = identify(&c);
            let Some(tls) = tls else {
                return server.serve_stream_from(c.stream, &peer).await;
            };
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(c.stream)).await {
                Ok(Ok((s, dn))) => server.serve_stream_from(s, &format!("{dn} ({peer})")).await,
                Ok(Err(e)) if e.kind == net::TlsErrorKind::NotAuthorised => {
                    warn!(%peer, "control: refused: {e}")
                }
                // Port probes and wrong certificates alike: the client is told by TLS.
                Ok(Err(e)) => info!(%peer, "control: TLS refused: {e}"),
                Err(_) => info!(%peer, "control: closing a client that did not finish TLS in time"),
            }
        }
    })
    .await
}

/// Who connected, for the log of the commands they give.
fn identify(c: &Connection) -> String {
    match &c.stream {
        Either::Left(unix) => match unix.peer_cred() {
            Ok(cred) => match cred.pid() {
                Some(pid) => format!("uid {} pid {pid}", cred.uid()),
                None => format!("uid {}", cred.uid()),
            },
            Err(_) => "unix".into(),
        },
        Either::Right(_) => c.peer.to_string(),
    }
}

/// Binds `addr` and serves each connection with `serve`, at most `bound` at once, in a task
/// that lives until the process ends (the control socket, the metrics endpoint).
pub async fn accepting<F, Fut>(
    addr: &SocketAddr,
    what: &'static str,
    bound: usize,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnMut(net::Connection) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = current()
        .bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))?;
    info!(%addr, "{what} listening");
    let acceptor = Acceptor::new(what, bound);
    tokio::spawn(async move { acceptor.run(&listener, serve).await });
    Ok(())
}

//! The control socket's listener: accepts connections and hands each to the QMP server.

use std::sync::Arc;

use nbd::addr::SocketAddr;
use net::{Acceptor, Listener};
use qmp::QmpServer;
use tracing::info;

/// Control connections open at once. An orchestrator needs one or two and `coloblk ctl` one at
/// a time; 64 leaves room for scripts and monitoring while idle clients cannot take the
/// descriptors the VM's export needs (the QMP server closes silent and idle sessions).
pub const MAX_CONTROL_CONNECTIONS: usize = 64;

/// Serves the control socket until the task is dropped.
pub async fn serve(addr: &SocketAddr, server: Arc<QmpServer>) -> anyhow::Result<()> {
    accepting(addr, "control", MAX_CONTROL_CONNECTIONS, move |c| {
        let server = server.clone();
        async move { server.serve_stream(c.stream).await }
    })
    .await
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
    let listener = Listener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))?;
    info!(%addr, "{what} listening");
    let acceptor = Acceptor::new(what, bound);
    tokio::spawn(async move { acceptor.run(&listener, serve).await });
    Ok(())
}

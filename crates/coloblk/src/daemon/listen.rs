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
    let listener = Listener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for control: {e}"))?;
    info!(%addr, "control socket listening");
    let acceptor = Acceptor::new("control", MAX_CONTROL_CONNECTIONS);
    tokio::spawn(async move {
        acceptor
            .run(&listener, |c| {
                let server = server.clone();
                async move { server.serve_stream(c.stream).await }
            })
            .await
    });
    Ok(())
}

//! The control socket's listener: accepts connections and hands each to the QMP server.

use std::sync::Arc;

use nbd::addr::SocketAddr;
use nbd::server::Listener;
use qmp::QmpServer;
use tracing::{info, warn};

/// Serves the control socket until the task is dropped.
pub async fn serve(addr: &SocketAddr, server: Arc<QmpServer>) -> anyhow::Result<()> {
    let listener = Listener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for control: {e}"))?;
    info!(%addr, "control socket listening");
    tokio::spawn(async move {
        loop {
            match listener.accept_stream().await {
                Ok(s) => {
                    let server = server.clone();
                    tokio::spawn(async move { server.serve_stream(s).await });
                }
                // Out of descriptors, say: wait rather than spin, and go on.
                Err(e) => {
                    warn!("control accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(())
}

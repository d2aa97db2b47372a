//! The Prometheus endpoint (`--metrics tcp:HOST:PORT`): a minimal HTTP responder that renders
//! the `metrics` registry. Gauges that mirror engine state are refreshed at scrape time from
//! the nodes' status, so the engine crates carry no metrics dependency.

use std::sync::Arc;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use nbd::addr::SocketAddr;
use nbd::server::Listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

/// Called before each scrape to bring gauges up to date.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// Installs the global recorder. Call once, before any metric is recorded.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(&[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| anyhow::anyhow!("metrics recorder: {e}"))?;
    Ok(handle)
}

/// Serves `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(
    addr: &SocketAddr,
    handle: PrometheusHandle,
    refresh: Refresh,
) -> anyhow::Result<()> {
    let listener = Listener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics: {e}"))?;
    info!(%addr, "metrics endpoint listening");
    tokio::spawn(async move {
        loop {
            let mut s = match listener.accept_stream().await {
                Ok(s) => s,
                Err(e) => {
                    warn!("metrics accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handle = handle.clone();
            let refresh = refresh.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if path == "/metrics" || path == "/" {
                    refresh();
                    ("200 OK", handle.render())
                } else {
                    ("404 Not Found", "try /metrics\n".to_string())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}

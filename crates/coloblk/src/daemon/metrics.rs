//! The Prometheus endpoint (`--metrics tcp:HOST:PORT`): a minimal HTTP responder that renders
//! the `metrics` registry. Gauges that mirror engine state are refreshed at scrape time from
//! the nodes' status, so the engine crates carry no metrics dependency.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use nbd::addr::{SocketAddr, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Scrapes served at once: Prometheus scrapes one at a time, a few more leave room for a person
/// with curl.
const MAX_METRICS_CONNECTIONS: usize = 16;

/// How long one scrape may take, request and reply: a scraper that stalls gives its slot back.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(
    addr: &SocketAddr,
    handle: PrometheusHandle,
    refresh: Refresh,
) -> anyhow::Result<()> {
    super::listen::accepting(addr, "metrics", MAX_METRICS_CONNECTIONS, move |c| {
        let (handle, refresh) = (handle.clone(), refresh.clone());
        async move {
            let _ =
                tokio::time::timeout(EXCHANGE_TIMEOUT, answer(c.stream, &handle, &refresh)).await;
        }
    })
    .await
}

/// Answers one HTTP request.
async fn answer(mut s: Stream, handle: &PrometheusHandle, refresh: &Refresh) {
    let Some(req) = read_head(&mut s).await else {
        return;
    };
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
}

/// Reads up to the end of the request head (8 KiB at most); `None` if the client goes away.
async fn read_head(s: &mut Stream) -> Option<Vec<u8>> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    Some(req)
}

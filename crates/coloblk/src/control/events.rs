//! One event path for both roles: each node's [`ReplicationEvent`]s become QMP events (and
//! counters), named as the control socket's clients know them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qmp::QmpServer;
use replication::ReplicationEvent;
use serde_json::json;
use tokio::sync::broadcast;

/// Failover progress is raised at most this often (the merge reports every batch).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Raises disk `name`'s events on `qmp` until the node goes away.
pub fn forward_events(
    name: String,
    mut rx: broadcast::Receiver<ReplicationEvent>,
    qmp: Arc<QmpServer>,
) {
    tokio::spawn(async move {
        let mut last_progress: Option<Instant> = None;
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                // Events dropped while we were slow: the status still tells the state.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let (event, data) = match ev {
                ReplicationEvent::ForwardFailed { offset, len, error } => {
                    metrics::counter!("coloblk_forward_errors_total", "disk" => name.clone())
                        .increment(1);
                    let data =
                        json!({"disk": name, "offset": offset, "length": len, "error": error});
                    ("REPLICATION_ERROR", data)
                }
                ReplicationEvent::LinkLost { reason } => (
                    "REPLICATION_LINK_LOST",
                    json!({"disk": name, "reason": reason}),
                ),
                ReplicationEvent::ResyncStarted { bytes } => (
                    "RESYNC_STARTED",
                    json!({"disk": name, "dirty-bytes": bytes}),
                ),
                ReplicationEvent::ResyncDone { bytes, sent } => (
                    "RESYNC_DONE",
                    json!({"disk": name, "done-bytes": bytes, "sent-bytes": sent}),
                ),
                ReplicationEvent::ResyncFailed { error } => {
                    ("RESYNC_FAILED", json!({"disk": name, "error": error}))
                }
                ReplicationEvent::Error { error } => {
                    metrics::counter!("coloblk_replication_errors_total", "disk" => name.clone())
                        .increment(1);
                    ("REPLICATION_ERROR", json!({"disk": name, "error": error}))
                }
                ReplicationEvent::FailoverProgress { done, total } => {
                    let now = Instant::now();
                    if last_progress.is_some_and(|t| now - t < PROGRESS_EVERY) && done < total {
                        continue;
                    }
                    last_progress = Some(now);
                    (
                        "FAILOVER_PROGRESS",
                        json!({"disk": name, "done-bytes": done, "total-bytes": total}),
                    )
                }
                ReplicationEvent::FailoverDone { merged } => (
                    "FAILOVER_DONE",
                    json!({"disk": name, "merged-bytes": merged}),
                ),
                ReplicationEvent::FailoverFailed { error } => {
                    ("FAILOVER_FAILED", json!({"disk": name, "error": error}))
                }
            };
            qmp.emit(event, data);
        }
    });
}

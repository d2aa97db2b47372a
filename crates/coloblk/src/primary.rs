//! `coloblk primary`: serves the VM's disks from the local images and forwards every change to
//! the secondary's replica exports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use blockdev::IoPool;
use clap::Args;
use nbd::addr::SocketAddr;
use nbd::client::{ClientConfig, NbdClient};
use nbd::server::{Export, ExportSet, Listener, Server, ServerConfig};
use parking_lot::Mutex;
use qmp::QmpServer;
use replication::primary::{ForwardMode, PrimaryConfig, PrimaryEvent, PrimaryNode, QueueLimits};
use replication::{Mode, Stage};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::control::{self, Control, Group};
use crate::disk_spec::DiskSpec;

/// How much later than the NBD client's request timeout the primary node's own link timer
/// fires.
const LINK_TIMER_GRACE: Duration = Duration::from_secs(1);

#[derive(Args, Debug, Clone)]
#[command(after_help = "Example (the secondary must be running first):\n  \
    coloblk primary --disk vm0=/var/lib/vm/vm0.raw,replica=nbd://secondary:10809/vm0 \\\n    \
    --export-listen unix:/run/coloblk/primary.nbd --control unix:/run/coloblk/primary.qmp \\\n    \
    --peer-control tcp:secondary:4445 --start\n\n\
    The VM attaches to nbd+unix:///vm0?socket=/run/coloblk/primary.nbd. Until replication starts,\n\
    writes are served locally and recorded as dirty. SIGTERM drains, flushes and exits 0.")]
pub struct PrimaryArgs {
    /// A disk: NAME=PATH[,format=raw|qcow2][,direct],replica=NBD-URI. The URI names the
    /// secondary's replica export (nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH).
    /// Repeat for several disks; they form one replication group.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<DiskSpec>,

    /// Where the VM reaches its disks over NBD: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub export_listen: Option<SocketAddr>,

    /// async: a write completes when the local write is done and the forward follows
    /// (checkpoints drain); sync: it also waits for the secondary, as QEMU does.
    #[arg(long, value_name = "MODE", default_value = "async")]
    pub mode: ForwardMode,

    /// The secondary's control socket: replication-checkpoint then drains here and checkpoints
    /// the secondary (a coordinated checkpoint).
    #[arg(long, value_name = "ADDR")]
    pub peer_control: Option<SocketAddr>,

    /// Forwarding queue bound in MiB (backpressure beyond it).
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub queue_mib: usize,

    /// Seconds without an answer after which the secondary counts as lost.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub link_timeout: f64,

    #[command(flatten)]
    pub daemon: crate::control::DaemonArgs,
}

/// One disk of the primary.
struct Disk {
    name: String,
    node: PrimaryNode,
}

/// Timing of the last checkpoint.
#[derive(Debug, Clone, Default)]
struct LastCheckpoint {
    at_unix_ms: u128,
    drain_ms: f64,
    secondary_ms: Option<f64>,
}

/// The primary's disks as one replication group.
pub struct PrimaryGroup {
    disks: Vec<Disk>,
    mode: ForwardMode,
    peer_control: Option<SocketAddr>,
    last: Mutex<Option<LastCheckpoint>>,
    events: control::Events,
}

impl PrimaryGroup {
    async fn drain_all(&self, force: bool) -> Result<(), String> {
        for d in &self.disks {
            d.node
                .drain(true, force)
                .await
                .map_err(|e| format!("disk '{}': {e}", d.name))?;
        }
        Ok(())
    }

    /// Drains and flushes everything, best effort, for shutdown.
    async fn drain_for_shutdown(&self) {
        for d in &self.disks {
            if let Err(e) = d.node.drain(true, false).await {
                warn!(disk = %d.name, "at shutdown the secondary may be missing writes: {e}");
            }
        }
    }
}

#[async_trait]
impl Group for PrimaryGroup {
    fn role(&self) -> &'static str {
        "primary"
    }

    async fn start(&self, mode: Mode) -> Result<(), String> {
        // All or nothing: start every disk, and on a failure put the started ones back.
        let mut started = Vec::new();
        for d in &self.disks {
            let before = d.node.stage();
            match d.node.start(mode) {
                Ok(()) => {
                    if before == Stage::None {
                        started.push(d);
                    }
                }
                Err(e) => {
                    for s in started {
                        s.node.reset_to_none();
                    }
                    return Err(e.to_string());
                }
            }
        }
        info!("replication started on {} disk(s)", self.disks.len());
        Ok(())
    }

    async fn checkpoint(&self, force: bool) -> Result<Value, String> {
        let t = Instant::now();
        self.drain_all(force).await?;
        let drain_ms = t.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!("coloblk_checkpoint_drain_seconds").record(drain_ms / 1000.0);
        let mut secondary_ms = None;
        if let Some(peer) = &self.peer_control {
            let t = Instant::now();
            checkpoint_peer(peer)
                .await
                .map_err(|e| format!("primary drained; secondary checkpoint failed: {e}"))?;
            secondary_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
        }
        let last = LastCheckpoint {
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
            drain_ms,
            secondary_ms,
        };
        *self.last.lock() = Some(last);
        let reply = json!({"drain-ms": drain_ms, "secondary-ms": secondary_ms});
        self.events.emit("REPLICATION_CHECKPOINT", reply.clone());
        Ok(reply)
    }

    fn get_error(&self) -> Result<(), String> {
        for d in &self.disks {
            d.node.get_error().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn stop(&self, failover: bool) -> Result<(), String> {
        for d in &self.disks {
            d.node.stop(failover).await.map_err(|e| e.to_string())?;
        }
        self.events
            .emit("REPLICATION_STOPPED", json!({"failover": failover}));
        Ok(())
    }

    fn status(&self) -> Value {
        let last = self.last.lock().clone();
        let disks: Vec<Value> = self
            .disks
            .iter()
            .map(|d| {
                let s = d.node.status();
                json!({
                    "name": d.name,
                    "stage": s.stage.as_str(),
                    "error": s.error,
                    "link-up": s.link_up,
                    "queue-requests": s.queued_requests,
                    "queue-bytes": s.queued_bytes,
                    "forwarded-writes": s.forwarded_writes,
                    "forwarded-bytes": s.forwarded_bytes,
                    "forward-errors": s.forward_errors,
                    "dirty-clusters": s.dirty_clusters,
                    "dirty-bytes": s.dirty_bytes,
                })
            })
            .collect();
        json!({
            "role": "primary",
            "mode": match self.mode { ForwardMode::Async => "async", ForwardMode::Sync => "sync" },
            "disks": disks,
            "last-checkpoint": last.map(|l| json!({
                "time-unix-ms": l.at_unix_ms as u64,
                "drain-ms": l.drain_ms,
                "secondary-ms": l.secondary_ms,
            })),
        })
    }
}

/// Asks the secondary to checkpoint (after our drain).
async fn checkpoint_peer(peer: &SocketAddr) -> anyhow::Result<()> {
    let stream = peer
        .connect()
        .await
        .with_context(|| format!("cannot reach {peer}"))?;
    let mut c = qmp::QmpClient::handshake(stream).await?;
    c.execute_timeout("replication-checkpoint", json!({}), Duration::from_secs(60))
        .await?;
    Ok(())
}

/// Parses the `replica=` of each disk spec.
fn replica_uri(spec: &DiskSpec) -> anyhow::Result<String> {
    let mut uri = None;
    for (k, v) in &spec.extra {
        match k.as_str() {
            "replica" => uri = Some(v.clone()),
            other => anyhow::bail!("disk '{}': unknown option '{other}'", spec.name),
        }
    }
    uri.ok_or_else(|| {
        anyhow::anyhow!(
            "disk '{}': missing replica=NBD-URI (the secondary's replica export)",
            spec.name
        )
    })
}

pub async fn run(args: PrimaryArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.disks.is_empty() {
        anyhow::bail!("no --disk given: a primary needs at least one disk");
    }
    let export_listen = args
        .export_listen
        .clone()
        .context("--export-listen is required")?;
    let control_addr = args
        .daemon
        .control
        .clone()
        .context("--control is required")?;
    if !(args.link_timeout > 0.0 && args.link_timeout.is_finite()) {
        anyhow::bail!("--link-timeout must be a positive number of seconds");
    }
    let link_timeout = Duration::from_secs_f64(args.link_timeout);
    let metrics_handle = args
        .daemon
        .metrics
        .as_ref()
        .map(|_| crate::metrics::install())
        .transpose()?;
    let pool = IoPool::default();
    let config = PrimaryConfig {
        mode: args.mode,
        queue: QueueLimits {
            max_bytes: args.queue_mib.max(1) << 20,
            ..Default::default()
        },
        // The NBD client's own timer (below) is the one that fires: it fails the requests and
        // closes the connection, so nothing stays pending on a link given up on. The node's
        // timer, a little later, only backs it up.
        link_timeout: Some(link_timeout + LINK_TIMER_GRACE),
        ..Default::default()
    };
    let mut disks = Vec::new();
    for spec in &args.disks {
        if disks.iter().any(|d: &Disk| d.name == spec.name) {
            anyhow::bail!("disk '{}' is given twice", spec.name);
        }
        let uri = replica_uri(spec)?;
        let local = spec.open(&pool)?;
        let client_cfg = ClientConfig {
            request_timeout: Some(link_timeout),
            ..Default::default()
        };
        let link = NbdClient::connect_uri(&uri, client_cfg)
            .await
            .with_context(|| {
                format!("disk '{}': cannot reach the secondary at {uri}", spec.name)
            })?;
        let node = PrimaryNode::new(local, config.clone());
        node.set_link(Arc::new(link))
            .map_err(|e| anyhow::anyhow!("disk '{}': {e}", spec.name))?;
        info!(disk = %spec.name, replica = %uri, "disk ready");
        disks.push(Disk {
            name: spec.name.clone(),
            node,
        });
    }
    let group = Arc::new(PrimaryGroup {
        disks,
        mode: args.mode,
        peer_control: args.peer_control.clone(),
        last: Mutex::new(None),
        events: control::Events::default(),
    });
    let qmp_server = QmpServer::new(
        Arc::new(Control {
            group: group.clone(),
        }),
        "coloblk primary",
    );
    group.events.attach(qmp_server.clone());
    forward_events(&group, &qmp_server);
    crate::listen::serve(&control_addr, qmp_server).await?;
    if let (Some(addr), Some(handle)) = (&args.daemon.metrics, metrics_handle) {
        let g = group.clone();
        crate::metrics::serve(addr, handle, Arc::new(move || refresh_metrics(&g))).await?;
    }

    let exports = ExportSet::new();
    for d in &group.disks {
        exports.add(Export::new(d.name.clone(), Arc::new(d.node.clone())));
    }
    let server = Server::new(exports, ServerConfig::default());
    let listener = Listener::bind(&export_listen)
        .await
        .with_context(|| format!("cannot listen on {export_listen}"))?;
    info!(addr = %export_listen, "VM export listening");
    if args.daemon.start {
        group
            .start(Mode::Primary)
            .await
            .map_err(|e| anyhow::anyhow!("cannot start replication: {e}"))?;
    }
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener).await })
    };
    crate::serve::wait_for_signal().await?;
    info!("shutting down: finishing VM requests, draining to the secondary");
    server.shutdown();
    serving.await.context("listener task failed")??;
    server.finish().await.context("final flush failed")?;
    group.drain_for_shutdown().await;
    info!("stopped cleanly");
    Ok(std::process::ExitCode::SUCCESS)
}

/// Turns engine events into QMP events and log lines.
fn forward_events(group: &Arc<PrimaryGroup>, qmp: &Arc<QmpServer>) {
    for d in &group.disks {
        let mut rx = d.node.events();
        let qmp = qmp.clone();
        let name = d.name.clone();
        tokio::spawn(async move {
            while let Ok(ev) = rx.recv().await {
                match ev {
                    PrimaryEvent::ForwardFailed { offset, len, error } => {
                        metrics::counter!("coloblk_forward_errors_total", "disk" => name.clone())
                            .increment(1);
                        qmp.emit(
                            "REPLICATION_ERROR",
                            json!({"disk": name, "offset": offset, "length": len, "error": error}),
                        );
                    }
                    PrimaryEvent::LinkLost { reason } => {
                        qmp.emit(
                            "REPLICATION_LINK_LOST",
                            json!({"disk": name, "reason": reason}),
                        );
                    }
                }
            }
        });
    }
}

fn refresh_metrics(group: &PrimaryGroup) {
    for d in &group.disks {
        let s = d.node.status();
        let n = d.name.clone();
        metrics::counter!("coloblk_forwarded_writes_total", "disk" => n.clone())
            .absolute(s.forwarded_writes);
        metrics::counter!("coloblk_forwarded_bytes_total", "disk" => n.clone())
            .absolute(s.forwarded_bytes);
        metrics::gauge!("coloblk_forward_queue_requests", "disk" => n.clone())
            .set(s.queued_requests as f64);
        metrics::gauge!("coloblk_forward_queue_bytes", "disk" => n.clone())
            .set(s.queued_bytes as f64);
        metrics::gauge!("coloblk_dirty_bytes", "disk" => n.clone()).set(s.dirty_bytes as f64);
        metrics::gauge!("coloblk_replication_error", "disk" => n).set(if s.error.is_some() {
            1.0
        } else {
            0.0
        });
    }
}

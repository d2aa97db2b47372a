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
/// The secondary's checkpoint (emptying its overlays) and its status query.
const PEER_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What the primary assumes of a secondary disk when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncMode {
    /// Nothing is known: the resync copies the whole disk (holes as write-zeroes) before the
    /// first checkpoint is accepted.
    Full,
    /// The operator vouches that the two disks are identical.
    None,
}

impl SyncMode {
    fn as_str(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::None => "none",
        }
    }
}

#[derive(Args, Debug, Clone)]
#[command(after_help = "Example (the secondary must be running first):\n  \
    coloblk primary --disk vm0=/var/lib/vm/vm0.raw,replica=nbd://secondary:10809/vm0 \\\n    \
    --export-listen unix:/run/coloblk/primary.nbd --control unix:/run/coloblk/primary.qmp \\\n    \
    --peer-control tcp:secondary:4445 --start\n\n\
    The VM attaches to nbd+unix:///vm0?socket=/run/coloblk/primary.nbd. Until replication starts,\n\
    writes are served locally and recorded as dirty; once it runs, a resync copies them (and, with\n\
    sync=full, the default, the whole disk first: nothing tells a starting primary what the\n\
    secondary holds). Checkpoints are refused until the secondary holds every write.\n\
    SIGTERM drains, flushes and exits 0.")]
pub struct PrimaryArgs {
    /// A disk: NAME=PATH[,format=raw|qcow2][,direct],replica=NBD-URI[,sync=full|none]. The URI
    /// names the secondary's replica export (nbd://HOST:PORT/NAME or
    /// nbd+unix:///NAME?socket=PATH). sync=full (the default) copies the whole disk to the
    /// secondary after start (holes as write-zeroes); sync=none trusts that both disks are
    /// identical copies. Repeat for several disks; they form one replication group.
    #[arg(long = "disk", value_name = "SPEC", required = true,
          value_parser = crate::disk_spec::primary_disk)]
    pub disks: Vec<DiskSpec>,

    /// Where the VM reaches its disks over NBD: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "ADDR", required = true)]
    pub export_listen: Option<SocketAddr>,

    /// async: a write completes when the local write is done and the forward follows
    /// (checkpoints drain); sync: it also waits for the secondary, as QEMU does.
    #[arg(long, value_name = "MODE", default_value = "async")]
    pub mode: ForwardMode,

    /// The secondary's control socket: replication-checkpoint then drains here and checkpoints
    /// the secondary (a coordinated checkpoint).
    #[arg(long, value_name = "ADDR")]
    pub peer_control: Option<SocketAddr>,

    /// Seconds the secondary's control socket (--peer-control) may take to connect, greet and
    /// negotiate, together; a checkpoint fails after that.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0,
          value_parser = crate::disk_spec::positive_seconds)]
    pub peer_timeout: f64,

    /// Forwarding queue bound in MiB (backpressure beyond it).
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub queue_mib: usize,

    /// Seconds without an answer after which the secondary counts as lost.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0,
          value_parser = crate::disk_spec::positive_seconds)]
    pub link_timeout: f64,

    #[command(flatten)]
    pub daemon: crate::control::DaemonArgs,
}

/// One disk of the primary.
struct Disk {
    name: String,
    node: PrimaryNode,
    sync: SyncMode,
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
    peer_timeout: Duration,
    last: Mutex<Option<LastCheckpoint>>,
    events: control::Events,
    /// Control operations run one at a time (a stop must not land inside a checkpoint).
    ops: tokio::sync::Mutex<()>,
}

impl PrimaryGroup {
    /// Checks that every disk is protected, without changing anything.
    fn check_protected(&self) -> Result<(), String> {
        for d in &self.disks {
            d.node
                .protected()
                .map_err(|e| format!("disk '{}': {e}", d.name))?;
        }
        Ok(())
    }

    /// Drains every disk and checks it is still protected afterwards.
    async fn drain_all(&self, force: bool) -> Result<(), String> {
        for d in &self.disks {
            d.node
                .checkpoint(force)
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
        let _ops = self.ops.lock().await;
        // All or nothing: start every disk, and on a failure put the started ones back.
        let mut started = Vec::new();
        for d in &self.disks {
            let before = d.node.stage();
            match d.node.start(mode) {
                Ok(()) => {
                    if before != Stage::Running {
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

    async fn checkpoint(&self, req: control::CheckpointRequest) -> Result<Value, String> {
        let _ops = self.ops.lock().await;
        let force = req.force;
        // Refuse early, before asking the secondary anything, when the disks cannot be equal.
        self.check_protected()?;
        // The secondary's epoch is read before the drain: a failover or a restart of the
        // secondary after this point makes its checkpoint below fail instead of answering
        // for a buffer that is not the one drained into.
        let mut peer = match &self.peer_control {
            Some(addr) => Some(
                PeerCheckpoint::open(addr, self.disks.len(), self.peer_timeout)
                    .await
                    .map_err(|e| format!("checkpoint refused: {e}"))?,
            ),
            None => None,
        };
        let t = Instant::now();
        self.drain_all(force).await?;
        let drain_ms = t.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!("coloblk_checkpoint_drain_seconds").record(drain_ms / 1000.0);
        let mut secondary_ms = None;
        let mut epoch = None;
        if let Some(peer) = peer.as_mut() {
            let t = Instant::now();
            epoch = Some(
                peer.checkpoint()
                    .await
                    .map_err(|e| format!("primary drained; secondary checkpoint failed: {e}"))?,
            );
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
        let mut reply = json!({"drain-ms": drain_ms, "secondary-ms": secondary_ms});
        if let Some(e) = epoch {
            reply["secondary-epoch"] = json!(e);
        }
        if force {
            reply["forced"] = json!(true);
        }
        self.events.emit("REPLICATION_CHECKPOINT", reply.clone());
        Ok(reply)
    }

    fn get_error(&self) -> Result<(), String> {
        for d in &self.disks {
            d.node.get_error().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn stop(&self, req: control::StopRequest) -> Result<Value, String> {
        let _ops = self.ops.lock().await;
        let already = self.disks.iter().all(|d| d.node.stage() == Stage::Done);
        for d in &self.disks {
            d.node.stop(req.failover).await.map_err(|e| e.to_string())?;
        }
        if already && !req.qemu {
            return Ok(json!({"note": "replication was already stopped: nothing to do"}));
        }
        self.events
            .emit("REPLICATION_STOPPED", json!({"failover": req.failover}));
        Ok(json!({}))
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
                    "protected": d.node.protected().is_ok(),
                    "sync": d.sync.as_str(),
                    "resync": {
                        "active": s.resync.active,
                        "total-bytes": s.resync.total_bytes,
                        "done-bytes": s.resync.done_bytes,
                        "sent-bytes": s.resync.sent_bytes,
                    },
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

/// The secondary's half of a coordinated checkpoint: a control session opened, and the
/// secondary's epoch read, before the primary drains.
struct PeerCheckpoint {
    client: qmp::QmpClient<nbd::addr::Stream>,
    epoch: u64,
}

impl PeerCheckpoint {
    /// Connects and reads the secondary's epoch; refuses a secondary whose disks are not all
    /// running (failed over, stopped, not started).
    async fn open(addr: &SocketAddr, disks: usize, timeout: Duration) -> anyhow::Result<Self> {
        let mut client = qmp::QmpClient::connect(
            format!("the secondary's control socket {addr}"),
            addr.connect(),
            timeout,
        )
        .await?;
        let status = client
            .execute_timeout("query-replication", json!({}), PEER_COMMAND_TIMEOUT)
            .await
            .context("the secondary's status")?;
        let epoch = status["epoch"].as_u64().with_context(|| {
            format!("the peer at {addr} reports no checkpoint epoch (not a coloblk secondary?)")
        })?;
        let peer_disks = status["disks"].as_array().map_or(&[][..], |d| &d[..]);
        if peer_disks.len() < disks {
            anyhow::bail!(
                "the secondary at {addr} has {} disk(s), this primary {disks}",
                peer_disks.len()
            );
        }
        for d in peer_disks {
            let stage = d["stage"].as_str().unwrap_or("?");
            if stage != "running" {
                anyhow::bail!(
                    "the secondary's disk '{}' is not running (stage {stage})",
                    d["name"].as_str().unwrap_or("?")
                );
            }
        }
        Ok(PeerCheckpoint { client, epoch })
    }

    /// Checkpoints the secondary in the epoch read at open; returns its new epoch.
    async fn checkpoint(&mut self) -> anyhow::Result<u64> {
        let reply = self
            .client
            .execute_timeout(
                "replication-checkpoint",
                json!({"epoch": self.epoch}),
                PEER_COMMAND_TIMEOUT,
            )
            .await?;
        reply["epoch"]
            .as_u64()
            .filter(|e| *e != self.epoch)
            .context("the secondary did not confirm that it emptied its buffer")
    }
}

/// The `replica=` and `sync=` of a disk spec (checked when the command line was parsed).
fn replica_options(spec: &DiskSpec) -> (String, SyncMode) {
    let uri = spec.option("replica").unwrap_or_default().to_string();
    let sync = match spec.option("sync") {
        Some("none") => SyncMode::None,
        _ => SyncMode::Full,
    };
    (uri, sync)
}

pub async fn run(args: PrimaryArgs) -> anyhow::Result<std::process::ExitCode> {
    let export_listen = args
        .export_listen
        .clone()
        .context("--export-listen is required")?;
    let control_addr = args
        .daemon
        .control
        .clone()
        .context("--control is required")?;
    let link_timeout = Duration::from_secs_f64(args.link_timeout);
    let metrics_handle = args
        .daemon
        .metrics
        .as_ref()
        .map(|_| crate::metrics::install())
        .transpose()?;
    crate::disk_spec::unique_names(&args.disks)?;
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
        let (uri, sync) = replica_options(spec);
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
        if sync == SyncMode::Full {
            node.mark_all_dirty();
        }
        info!(disk = %spec.name, replica = %uri, sync = sync.as_str(), "disk ready");
        disks.push(Disk {
            name: spec.name.clone(),
            node,
            sync,
        });
    }
    let group = Arc::new(PrimaryGroup {
        disks,
        mode: args.mode,
        peer_control: args.peer_control.clone(),
        peer_timeout: Duration::from_secs_f64(args.peer_timeout),
        last: Mutex::new(None),
        events: control::Events::default(),
        ops: tokio::sync::Mutex::new(()),
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
                    PrimaryEvent::ResyncStarted { bytes } => {
                        qmp.emit(
                            "RESYNC_STARTED",
                            json!({"disk": name, "dirty-bytes": bytes}),
                        );
                    }
                    PrimaryEvent::ResyncDone { bytes, sent } => {
                        qmp.emit(
                            "RESYNC_DONE",
                            json!({"disk": name, "done-bytes": bytes, "sent-bytes": sent}),
                        );
                    }
                    PrimaryEvent::ResyncFailed { error } => {
                        qmp.emit("RESYNC_FAILED", json!({"disk": name, "error": error}));
                    }
                    _ => {}
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

//! `coloblk primary`: serves the VM's disks from the local images and forwards every change to
//! the secondary's replica exports; a checkpoint drains and, with `--peer-control`,
//! checkpoints the secondary in the epoch it drained into.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use blockdev::IoPool;
use clap::Args;
use coloblk::export_addr::ExportAddr;
use nbd::addr::SocketAddr;
use nbd::server::{Export, ExportSet, Server, ServerConfig};
use parking_lot::Mutex;
use qmp::QmpServer;
use replication::primary::{ForwardMode, PrimaryConfig, PrimaryNode, QueueLimits};
use replication::{Mode, ReplicationEvent, ReplicationGroup, Stage};
use serde_json::json;
use tokio::sync::broadcast;
use tracing::{info, warn};

use super::link::{
    DiskLink, LinkConfig, PEER_COMMAND_TIMEOUT, SyncMode, Target, peer_commands, peer_session,
};
use super::{DaemonArgs, Plan};
use crate::control::status::{
    CheckpointReply, Compared, PrimaryCheckpoint, PrimaryDisk, PrimaryStatus, Resync, Status,
    StopReply,
};
use crate::control::{
    CheckpointRequest, ControlError, Events, Group, ReplicaRequest, Role, StopRequest,
};
use crate::disk_spec::DiskSpec;

/// How much later than the NBD client's request timeout the primary node's own link timer
/// fires.
const LINK_TIMER_GRACE: Duration = Duration::from_secs(1);

#[derive(Args, Debug, Clone)]
#[command(after_help = "Example:\n  \
    coloblk primary --disk vm0=/var/lib/vm/vm0.raw,replica=nbd://secondary:10809/vm0 \\\n    \
    --export-listen unix:/run/coloblk/primary.nbd --control unix:/run/coloblk/primary.qmp \\\n    \
    --peer-control tcp:secondary:4445 --start\n\n\
    The VM attaches to nbd+unix:///vm0?socket=/run/coloblk/primary.nbd. The primary serves the VM\n\
    whether or not the secondary is reachable, and connects (and reconnects) by itself. Writes the\n\
    secondary may lack are recorded as dirty and copied by a resync; a new secondary is first\n\
    compared (sync=checksum, the default with --peer-control) or copied (sync=full). Checkpoints\n\
    are refused until the secondary holds every write. SIGTERM drains, flushes and exits 0.")]
pub struct PrimaryArgs {
    /// A disk: NAME=PATH[,format=raw|qcow2][,direct],replica=NBD-URI[,sync=checksum|full|none].
    /// The URI names the secondary's replica export (nbd://HOST:PORT/NAME or
    /// nbd+unix:///NAME?socket=PATH). The first sync with a secondary: checksum compares
    /// digests of both disks and copies what differs (the default with --peer-control, which
    /// it needs); full copies everything (holes as write-zeroes; the default without);
    /// none trusts that both disks are identical copies. Repeat for several disks; they form
    /// one replication group.
    #[arg(long = "disk", value_name = "SPEC", required = true,
          value_parser = crate::disk_spec::primary_disk)]
    pub disks: Vec<DiskSpec>,

    /// Where each disk's persistent state lives (DIR/NAME): its generations and the write
    /// log that names what the secondary may lack after a crash. Default: IMAGE.coloblk
    /// beside each image.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where the VM reaches its disks: unix:PATH or tcp:HOST:PORT (NBD, every disk), or
    /// vhost-user:PATH[,export=NAME] (vhost-user-blk for QEMU, one disk: name it when there
    /// are several). Repeat to listen on several.
    #[arg(long, value_name = "ADDR", required = true)]
    pub export_listen: Vec<ExportAddr>,

    /// async: a write completes when the local write is done and the forward follows
    /// (checkpoints drain); sync: it also waits for the secondary, as QEMU does.
    #[arg(long, value_name = "MODE", default_value = "async",
          value_parser = crate::disk_spec::forward_mode)]
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

    /// When the secondary answers that it has failed over (it serves the VM now): fence
    /// refuses further VM writes here (two VMs must not both write), continue only reports it.
    #[arg(long, value_name = "POLICY", default_value = "fence", value_parser = ["fence", "continue"])]
    pub on_peer_promoted: String,

    /// Most MiB per second a resync sends (the VM's writes go first either way); unbounded if
    /// not given.
    #[arg(long, value_name = "MIB")]
    pub resync_rate: Option<u64>,

    /// Seconds without an answer after which the secondary counts as lost.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0,
          value_parser = crate::disk_spec::positive_seconds)]
    pub link_timeout: f64,

    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The primary's disks as one replication group.
pub struct PrimaryGroup {
    disks: Vec<Arc<DiskLink>>,
    /// The same nodes, operated all-or-nothing.
    group: ReplicationGroup,
    mode: ForwardMode,
    peer_control: Option<SocketAddr>,
    peer_timeout: Duration,
    last: Mutex<Option<PrimaryCheckpoint>>,
    events: Arc<Events>,
    /// Control operations run one at a time (a stop must not land inside a checkpoint).
    ops: tokio::sync::Mutex<()>,
    /// Every disk was protected when last looked at (REPLICATION_PROTECTED on the change).
    protected: std::sync::atomic::AtomicBool,
    /// The links' shared settings (verify talks to the peers with them).
    link_config: std::sync::OnceLock<Arc<LinkConfig>>,
}

impl PrimaryGroup {
    /// Raises REPLICATION_PROTECTED when every disk has just become protected.
    fn note_protection(&self) {
        use std::sync::atomic::Ordering;
        let all = self.disks.iter().all(|d| d.node.protected().is_ok());
        if all && !self.protected.swap(true, Ordering::SeqCst) {
            info!("protected: every disk running, synced, link up");
            self.events.emit("REPLICATION_PROTECTED", json!({}));
        } else if !all {
            self.protected.store(false, Ordering::SeqCst);
        }
    }

    fn disk(&self, name: &str) -> Result<&Arc<DiskLink>, ControlError> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| ControlError::Refused(format!("no disk '{name}' on this primary")))
    }
}

/// A group error, with the disk it came from named.
fn disk_error(e: replication::GroupError) -> ControlError {
    ControlError::Disk {
        disk: e.member,
        error: e.error,
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[async_trait]
impl Group for PrimaryGroup {
    fn generations(&self, disk: &str) -> Result<replication::state::GenView, ControlError> {
        match &self.disk(disk)?.disk_state {
            Some(st) => Ok(super::state::view(st)),
            None => Err(ControlError::Refused(format!(
                "no persistent state for disk '{disk}' here"
            ))),
        }
    }

    fn role(&self) -> Role {
        Role::Primary
    }

    async fn start(&self, mode: Mode) -> Result<(), ControlError> {
        let _ops = self.ops.lock().await;
        self.group.start(mode).await?;
        info!("replication started on {} disk(s)", self.disks.len());
        self.note_protection();
        Ok(())
    }

    async fn checkpoint(&self, req: CheckpointRequest) -> Result<CheckpointReply, ControlError> {
        let _ops = self.ops.lock().await;
        let force = req.force;
        // Refuse early, before asking the secondary anything, when the disks cannot be equal.
        self.group.validate_checkpoint(force).map_err(disk_error)?;
        // The secondary's epoch is read before the drain: a failover or a restart of the
        // secondary after this point makes its checkpoint below fail instead of answering
        // for a buffer that is not the one drained into.
        // Each disk's current secondary (set-replica may have moved some), with the disks it
        // holds for this primary.
        let mut by_peer: Vec<(SocketAddr, Vec<String>)> = Vec::new();
        for d in &self.disks {
            if let Some(addr) = d.peer() {
                match by_peer.iter_mut().find(|(a, _)| *a == addr) {
                    Some((_, names)) => names.push(d.name.clone()),
                    None => by_peer.push((addr, vec![d.name.clone()])),
                }
            }
        }
        let mut peers = Vec::new();
        for (addr, names) in by_peer {
            let p = PeerCheckpoint::open(&addr, names, self.peer_timeout)
                .await
                .map_err(|e| {
                    ControlError::Refused(format!(
                        "checkpoint refused: {}",
                        coloblk::error_chain(e.as_ref())
                    ))
                })?;
            peers.push(p);
        }
        // Each disk's generation goes with the checkpoint; its write log starts a new epoch
        // before the drain, so that what it clears afterwards is what the drain covered.
        let mut marks = Vec::new();
        for d in &self.disks {
            let Some(st) = &d.disk_state else { continue };
            if let Some(g) = st.lock().state().view.current {
                // QEMU's secondary keeps no generations: only ours record them.
                for p in peers.iter_mut().filter(|p| {
                    p.disks.contains(&d.name) && matches!(p.kind, PeerKind::Coloblk { .. })
                }) {
                    p.generations.insert(d.name.clone(), json!(g.to_string()));
                }
            }
            if let Some(log) = d.node.write_log() {
                marks.push((d, log.clone(), log.checkpoint_begin()));
            }
        }
        let t = Instant::now();
        // Each disk drains and is checked again afterwards (a forward may fail meanwhile).
        self.group.checkpoint(force).await.map_err(disk_error)?;
        let drain_ms = t.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!("coloblk_checkpoint_drain_seconds").record(drain_ms / 1000.0);
        let (mut secondary_ms, mut secondary_epoch) = (None, None);
        let mut unverified = Vec::new();
        let t = Instant::now();
        for peer in peers.iter_mut() {
            let epoch = peer
                .checkpoint()
                .await
                .map_err(|e| ControlError::Peer(coloblk::error_chain(e.as_ref())))?;
            match epoch {
                Some(e) => {
                    secondary_epoch.get_or_insert(e);
                }
                None => unverified.push(peer.addr.to_string()),
            }
        }
        if !peers.is_empty() {
            secondary_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
        }
        // Both sides are equal as of the drain: the secondary's disk is in our generation
        // (base), and the log forgets what the drain covered. Failing to save this only
        // leaves more to resync after a crash, never less.
        for (d, log, mark) in marks {
            let peer_has_it = peers.iter().any(|p| p.generations.contains_key(&d.name));
            if let Some(st) = d.disk_state.as_ref().filter(|_| peer_has_it)
                && let Err(e) = st.lock().update(|s| s.view.base = s.view.current)
            {
                warn!(disk = %d.name, "checkpoint done, but its generation cannot be saved: {e}");
            }
            if peer_has_it && let Err(e) = log.checkpoint_done(mark).await {
                warn!(disk = %d.name, "checkpoint done, but the write log cannot be trimmed: {e}");
            }
        }
        *self.last.lock() = Some(PrimaryCheckpoint {
            time_unix_ms: now_unix_ms(),
            drain_ms,
            secondary_ms,
        });
        let reply = CheckpointReply {
            drain_ms: Some(drain_ms),
            secondary_ms: Some(secondary_ms),
            secondary_epoch,
            unverified_secondaries: unverified,
            forced: force,
            ..Default::default()
        };
        let data = serde_json::to_value(&reply).expect("replies always serialise");
        self.events.emit("REPLICATION_CHECKPOINT", data);
        Ok(reply)
    }

    fn get_error(&self) -> Result<(), ControlError> {
        Ok(self.group.get_error()?)
    }

    async fn stop(&self, req: StopRequest) -> Result<StopReply, ControlError> {
        let _ops = self.ops.lock().await;
        let already = self.disks.iter().all(|d| d.node.stage() == Stage::Done);
        self.group.stop(req.failover).await?;
        if already && !req.qemu {
            return Ok(StopReply {
                note: Some("replication was already stopped: nothing to do".into()),
            });
        }
        self.events
            .emit("REPLICATION_STOPPED", json!({"failover": req.failover}));
        Ok(StopReply::default())
    }

    fn status(&self) -> Status {
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let s = d.node.status();
                let link = d.status();
                PrimaryDisk {
                    name: d.name.clone(),
                    stage: s.stage.as_str().into(),
                    error: s.error,
                    protected: d.node.protected().is_ok(),
                    sync: d.sync().as_str().into(),
                    link: link.link,
                    link_error: link.error,
                    peer_verified: link.verified,
                    compared: link.compared.map(|r| Compared {
                        compared_bytes: r.compared_bytes,
                        differing_bytes: r.differing_bytes,
                    }),
                    resync: Resync {
                        active: s.resync.active,
                        total_bytes: s.resync.total_bytes,
                        done_bytes: s.resync.done_bytes,
                        sent_bytes: s.resync.sent_bytes,
                    },
                    link_up: s.link_up,
                    queue_requests: s.queued_requests,
                    queue_bytes: s.queued_bytes,
                    forwarded_writes: s.forwarded_writes,
                    forwarded_bytes: s.forwarded_bytes,
                    forward_errors: s.forward_errors,
                    dirty_clusters: s.dirty_clusters,
                    dirty_bytes: s.dirty_bytes,
                }
            })
            .collect();
        Status::Primary(PrimaryStatus {
            mode: self.mode.name().into(),
            disks,
            last_checkpoint: *self.last.lock(),
        })
    }

    fn events(&self) -> Vec<(String, broadcast::Receiver<ReplicationEvent>)> {
        self.disks
            .iter()
            .map(|d| (d.name.clone(), d.node.events()))
            .collect()
    }

    fn attach(&self, server: Arc<QmpServer>) {
        self.events.attach(server);
    }

    async fn verify(&self) -> Result<serde_json::Value, ControlError> {
        let config = self
            .link_config
            .get()
            .ok_or_else(|| ControlError::Refused("the links are not set up yet".into()))?;
        let mut disks = Vec::new();
        for d in &self.disks {
            let r = d.verify(config).await.map_err(|e| {
                ControlError::Refused(format!("disk '{}': verify failed: {e:#}", d.name))
            })?;
            info!(disk = %d.name, compared = r.compared_bytes, differing = r.differing_bytes, "verified");
            disks.push(json!({
                "name": d.name,
                "compared-bytes": r.compared_bytes,
                "differing-bytes": r.differing_bytes,
            }));
        }
        Ok(json!({ "disks": disks }))
    }

    async fn set_replica(&self, req: ReplicaRequest) -> Result<(), ControlError> {
        let (disk, uri) = (req.disk.as_str(), req.uri.as_str());
        let (peer_control, sync) = (req.peer_control.as_deref(), req.sync.as_deref());
        let d = self.disk(disk)?;
        if d.node.fenced() {
            return Err(ControlError::Refused(format!(
                "disk '{disk}' is fenced: its secondary took over, this primary may not write \
                 (promote that secondary, or start this disk anew as its secondary)"
            )));
        }
        uri.parse::<nbd::uri::NbdUri>()
            .map_err(|e| ControlError::Refused(format!("invalid replica URI: {e}")))?;
        let peer = match peer_control {
            Some(p) => Some(
                p.parse::<SocketAddr>()
                    .map_err(|e| ControlError::Refused(e.to_string()))?,
            ),
            None => self.peer_control.clone(),
        };
        // Another secondary is another disk: nothing is assumed of it unless said so.
        let sync = match sync {
            Some("none") => SyncMode::None,
            Some("full") => SyncMode::Full,
            Some("checksum") if peer.is_some() => SyncMode::Checksum,
            None if peer.is_some() => SyncMode::Checksum,
            None => SyncMode::Full,
            Some(other) => {
                return Err(ControlError::Refused(format!(
                    "sync={other} is not checksum, full or none (checksum needs peer-control)"
                )));
            }
        };
        info!(
            disk,
            replica = uri,
            sync = sync.as_str(),
            "pointing the disk at another secondary"
        );
        d.retarget(
            Target {
                uri: uri.to_string(),
                peer,
            },
            sync,
        );
        self.protected
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn refresh_metrics(&self) {
        for d in &self.disks {
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
            metrics::gauge!("coloblk_resync_done_bytes", "disk" => n.clone())
                .set(s.resync.done_bytes as f64);
            metrics::gauge!("coloblk_protected", "disk" => n.clone())
                .set(if d.node.protected().is_ok() { 1.0 } else { 0.0 });
            metrics::gauge!("coloblk_replication_error", "disk" => n).set(if s.error.is_some() {
                1.0
            } else {
                0.0
            });
        }
    }

    /// Drains and flushes everything, best effort: a clean stop loses nothing in flight.
    async fn shutdown(&self) {
        for d in &self.disks {
            if let Err(e) = d.node.drain(true, false).await {
                warn!(disk = %d.name, "at shutdown the secondary may be missing writes: {e}");
            }
        }
    }
}

/// The secondary's half of a coordinated checkpoint: a control session opened, and the
/// secondary's epoch read, before the primary drains.
struct PeerCheckpoint {
    client: qmp::QmpClient<net::tls::ClientStream>,
    addr: SocketAddr,
    kind: PeerKind,
    /// The disks of this primary the secondary holds: they become usable copies there.
    disks: Vec<String>,
    /// Their generations, which the secondary records as the ones it is equal in.
    generations: serde_json::Map<String, serde_json::Value>,
}

/// Which checkpoint command a secondary takes.
enum PeerKind {
    /// A coloblk secondary: `replication-checkpoint` in the epoch read before the drain, so a
    /// secondary that failed over or restarted meanwhile refuses.
    Coloblk { epoch: u64 },
    /// QEMU's COLO secondary (no `replication-checkpoint`): `xen-colo-do-checkpoint`. It knows
    /// no epoch and checkpoints every replication node of that QEMU; the operator vouches that
    /// its buffer is the one drained into, as with QEMU's own primary.
    Qemu,
}

impl PeerCheckpoint {
    /// Connects and reads the secondary's epoch; refuses a secondary whose disks are not all
    /// running (failed over, stopped, not started).
    async fn open(
        addr: &SocketAddr,
        disks: Vec<String>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut client = peer_session(addr, timeout).await?;
        let commands = peer_commands(&mut client).await?;
        let has = |name: &str| commands.iter().any(|c| c == name);
        if !has("replication-checkpoint") {
            anyhow::ensure!(
                has("xen-colo-do-checkpoint"),
                "the peer at {addr} takes no checkpoint (neither replication-checkpoint nor \
                 xen-colo-do-checkpoint)"
            );
            // QEMU's only status: an error unless replication runs there without one.
            let st = client
                .execute_timeout(
                    "query-xen-replication-status",
                    json!({}),
                    PEER_COMMAND_TIMEOUT,
                )
                .await
                .context("the secondary's status")?;
            if st["error"] != false {
                anyhow::bail!(
                    "the secondary at {addr} (QEMU) reports: {}",
                    st["desc"].as_str().unwrap_or("an error")
                );
            }
            return Ok(PeerCheckpoint {
                client,
                addr: addr.clone(),
                kind: PeerKind::Qemu,
                disks,
                generations: serde_json::Map::new(),
            });
        }
        let status = client
            .execute_timeout("query-replication", json!({}), PEER_COMMAND_TIMEOUT)
            .await
            .context("the secondary's status")?;
        let status: Status = serde_json::from_value(status)
            .with_context(|| format!("the peer at {addr} is not a coloblk secondary"))?;
        let Status::Secondary(status) = status else {
            anyhow::bail!("the peer at {addr} is a primary, not a secondary");
        };
        if let Some(missing) = disks
            .iter()
            .find(|n| !status.disks.iter().any(|d| &d.name == *n))
        {
            anyhow::bail!("the secondary at {addr} has no disk '{missing}'");
        }
        for d in &status.disks {
            if d.stage != "running" {
                anyhow::bail!(
                    "the secondary's disk '{}' is not running (stage {})",
                    d.name,
                    d.stage
                );
            }
        }
        Ok(PeerCheckpoint {
            client,
            addr: addr.clone(),
            kind: PeerKind::Coloblk {
                epoch: status.epoch,
            },
            disks,
            generations: serde_json::Map::new(),
        })
    }

    /// Checkpoints the secondary; returns its new epoch (none from QEMU).
    async fn checkpoint(&mut self) -> anyhow::Result<Option<u64>> {
        let PeerKind::Coloblk { epoch } = self.kind else {
            self.client
                .execute_timeout("xen-colo-do-checkpoint", json!({}), PEER_COMMAND_TIMEOUT)
                .await?;
            return Ok(None);
        };
        let reply = self
            .client
            .execute_timeout(
                "replication-checkpoint",
                if self.generations.is_empty() {
                    json!({"epoch": epoch, "disks": self.disks})
                } else {
                    json!({"epoch": epoch, "disks": self.disks,
                           "generations": self.generations})
                },
                PEER_COMMAND_TIMEOUT,
            )
            .await?;
        let reply: CheckpointReply = serde_json::from_value(reply).unwrap_or_default();
        reply
            .epoch
            .filter(|e| *e != epoch)
            .context("the secondary did not confirm that it emptied its buffer")
            .map(Some)
    }
}

/// The `replica=` and `sync=` of a disk spec (checked when the command line was parsed);
/// without `sync=`, checksum where the peer can give digests, full where it cannot.
fn replica_options(spec: &DiskSpec, peer: bool) -> (String, SyncMode) {
    let uri = spec.option("replica").unwrap_or_default().to_string();
    let sync = match spec.option("sync") {
        Some("none") => SyncMode::None,
        Some("full") => SyncMode::Full,
        Some("checksum") => SyncMode::Checksum,
        _ if peer => SyncMode::Checksum,
        _ => SyncMode::Full,
    };
    (uri, sync)
}

/// Runs `coloblk primary` until SIGTERM.
pub async fn run(args: PrimaryArgs) -> anyhow::Result<std::process::ExitCode> {
    crate::disk_spec::unique_names(&args.disks)?;
    super::run(
        args.daemon.metrics.as_ref(),
        &args.daemon.security,
        async |pool: &IoPool| open(&args, pool).await,
    )
    .await
}

/// What a primary group is built with: the command line's options, or a promotion's.
pub(super) struct Settings {
    pub mode: ForwardMode,
    pub peer_control: Option<SocketAddr>,
    pub peer_timeout: Duration,
    pub link_timeout: Duration,
    pub queue_mib: usize,
    pub resync_rate: Option<u64>,
    pub fence_on_promoted: bool,
}

/// One disk to replicate: its name, the device the VM's writes go to, where its secondary is
/// and how the first sync compares.
pub(super) struct NewDisk {
    pub name: String,
    pub local: Arc<dyn blockdev::BlockDev>,
    pub uri: String,
    pub sync: SyncMode,
    /// Its persistent state (none for a disk kept only in memory).
    pub state: Option<super::state::DiskState>,
}

/// Builds a primary group over `disks`; [`PrimaryGroup::start_links`] then starts their link
/// keepers (the VM is served whether the secondary is there or not).
pub(super) fn new_group(disks: Vec<NewDisk>, s: &Settings) -> anyhow::Result<Arc<PrimaryGroup>> {
    let config = PrimaryConfig {
        mode: s.mode,
        queue: QueueLimits {
            max_bytes: s.queue_mib.max(1) << 20,
            ..Default::default()
        },
        // The NBD client's own timer (the link keeper's) is the one that fires: it fails the
        // requests and closes the connection, so nothing stays pending on a link given up on.
        // The node's timer, a little later, only backs it up.
        link_timeout: Some(s.link_timeout + LINK_TIMER_GRACE),
        resync_rate: s.resync_rate.map(|m| m.max(1) << 20),
        ..Default::default()
    };
    let mut links = Vec::new();
    let mut group = ReplicationGroup::new();
    for d in disks {
        let node = PrimaryNode::new(d.local, config.clone());
        if let Some(st) = &d.state {
            super::state::attach_primary(&node, st, &d.name)?;
        }
        info!(disk = %d.name, replica = %d.uri, sync = d.sync.as_str(), "disk ready");
        group.add(d.name.clone(), Arc::new(node.clone()));
        let target = Target {
            uri: d.uri,
            peer: s.peer_control.clone(),
        };
        links.push(DiskLink::new(d.name, node, d.sync, target, d.state));
    }
    let events = Arc::new(Events::default());
    let group = Arc::new(PrimaryGroup {
        disks: links,
        group,
        mode: s.mode,
        peer_control: s.peer_control.clone(),
        peer_timeout: s.peer_timeout,
        last: Mutex::new(None),
        events: events.clone(),
        ops: tokio::sync::Mutex::new(()),
        protected: false.into(),
        link_config: std::sync::OnceLock::new(),
    });
    let weak = Arc::downgrade(&group);
    let link_config = Arc::new(LinkConfig {
        link_timeout: s.link_timeout,
        peer_timeout: s.peer_timeout,
        fence_on_promoted: s.fence_on_promoted,
        events,
        on_change: Box::new(move || {
            if let Some(g) = weak.upgrade() {
                g.note_protection();
            }
        }),
    });
    let _ = group.link_config.set(link_config);
    Ok(group)
}

impl PrimaryGroup {
    /// Starts every disk's link keeper.
    pub(super) fn start_links(self: &Arc<Self>) {
        let config = self.link_config.get().expect("set by new_group").clone();
        for d in &self.disks {
            d.spawn(config.clone());
            watch_resync(self, d);
        }
    }

    /// The VM's exports: one per disk.
    pub(super) fn exports(&self) -> ExportSet {
        let exports = ExportSet::new();
        for d in &self.disks {
            exports.add(Export::new(d.name.clone(), Arc::new(d.node.clone())));
        }
        exports
    }

    /// Every disk's node, by name (a promoted secondary serves them).
    pub(super) fn nodes(&self) -> Vec<(String, PrimaryNode)> {
        self.disks
            .iter()
            .map(|d| (d.name.clone(), d.node.clone()))
            .collect()
    }
}

/// Opens the disks and builds the VM's export; the links come up on their own.
async fn open(args: &PrimaryArgs, pool: &IoPool) -> anyhow::Result<Plan> {
    let mut disks = Vec::new();
    for spec in &args.disks {
        let (uri, sync) = replica_options(spec, args.peer_control.is_some());
        if uri.to_ascii_lowercase().starts_with("nbds")
            && super::security::current().client().is_none()
        {
            return Err(coloblk::UsageError(format!(
                "disk '{}': {uri} asks for TLS: give --tls-creds DIR (with client-cert.pem and \
                 client-key.pem)",
                spec.name
            ))
            .into());
        }
        if sync == SyncMode::Checksum && args.peer_control.is_none() {
            return Err(coloblk::UsageError(format!(
                "disk '{}': sync=checksum needs --peer-control (the secondary's digests)",
                spec.name
            ))
            .into());
        }
        let local = spec.open(pool)?;
        let state = super::state::open(spec, args.state_dir.as_deref(), local.len())?;
        disks.push(NewDisk {
            name: spec.name.clone(),
            local,
            uri,
            sync,
            state: Some(state),
        });
    }
    let settings = Settings {
        mode: args.mode,
        peer_control: args.peer_control.clone(),
        peer_timeout: Duration::from_secs_f64(args.peer_timeout),
        link_timeout: Duration::from_secs_f64(args.link_timeout),
        queue_mib: args.queue_mib,
        resync_rate: args.resync_rate,
        fence_on_promoted: args.on_peer_promoted == "fence",
    };
    let group = new_group(disks, &settings)?;
    group.start_links();
    let exports = group.exports();
    let server = Server::new(exports.clone(), ServerConfig::default());
    let (endpoints, vhost) =
        super::export_endpoints("the VM", &args.export_listen, &exports, server)?;
    Ok(Plan {
        name: "coloblk primary",
        endpoints,
        vhost,
        group: Some((group, args.daemon.clone())),
    })
}

/// Looks at the group's protection when a disk's resync ends or its link is lost.
fn watch_resync(group: &Arc<PrimaryGroup>, disk: &Arc<DiskLink>) {
    let mut rx = disk.node.events();
    let weak = Arc::downgrade(group);
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ReplicationEvent::ResyncDone { .. } | ReplicationEvent::LinkLost { .. })
                | Err(broadcast::error::RecvError::Lagged(_)) => {
                    let Some(g) = weak.upgrade() else { return };
                    g.note_protection();
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

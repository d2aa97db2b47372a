//! `coloblk secondary`: keeps the primary's disks current (the replica exports) while a
//! speculative VM runs on overlay views of them (the top exports).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use blockdev::{ImageFormat, IoPool, OpenOptions, Qcow2Backing};
use clap::Args;
use coloblk::export_addr::ExportAddr;
use nbd::addr::SocketAddr;
use nbd::server::{Export, ExportSet, Server, ServerConfig};
use parking_lot::Mutex;
use qmp::QmpServer;
use replication::secondary::{DevOverlay, OverlayStore};
use replication::{
    Mode, ReplicationEvent, ReplicationGroup, SecondaryConfig, SecondaryNode, Stage,
};
use serde_json::json;
use tokio::sync::broadcast;
use tracing::info;

use super::promote::{Promotable, Switch};
use super::{DaemonArgs, Endpoint, Plan};
use crate::control::status::{
    CheckpointReply, Failover, SecondaryCheckpoint, SecondaryDisk, SecondaryStatus, Status,
    StopReply,
};
use crate::control::{
    CheckpointRequest, ControlError, DigestRequest, Events, Group, Role, StopRequest,
};
use crate::disk_spec::DiskSpec;

#[derive(Args, Debug, Clone)]
#[command(after_help = "Example:\n  \
    coloblk secondary --disk vm0=/var/lib/vm/vm0.raw --replica-listen tcp:0.0.0.0:10809 \\\n    \
    --export-listen unix:/run/coloblk/svm.nbd --control tcp:0.0.0.0:4445 --buffer-dir /dev/shm --start\n\n\
    The primary forwards to nbd://THIS-HOST:10809/vm0; the speculative VM attaches to\n\
    nbd+unix:///vm0?socket=/run/coloblk/svm.nbd. Before start the speculative view refuses I/O\n\
    (as QEMU's does) and the primary's writes go straight to the disk. SIGTERM flushes and exits 0.")]
pub struct SecondaryArgs {
    /// A disk: NAME=PATH[,format=raw|qcow2][,direct][,active=PATH,hidden=PATH]. It must start
    /// equal to the primary's disk of the same NAME. With active= and hidden= (qcow2 images of
    /// the same size, QEMU-style), those hold the overlays instead of the buffer directory.
    /// Repeat for several disks; they form one replication group.
    #[arg(long = "disk", value_name = "SPEC", required = true,
          value_parser = crate::disk_spec::secondary_disk)]
    pub disks: Vec<DiskSpec>,

    /// Where the primary forwards its writes (one NBD export per disk NAME).
    #[arg(long, value_name = "ADDR", required = true)]
    pub replica_listen: Option<SocketAddr>,

    /// Where the speculative VM reaches its view of each disk: unix:PATH or tcp:HOST:PORT
    /// (NBD export NAME), or vhost-user:PATH[,export=NAME] (vhost-user-blk for QEMU, one disk:
    /// name it when there are several). Repeat to listen on several.
    #[arg(long, value_name = "ADDR", required = true)]
    pub export_listen: Vec<ExportAddr>,

    /// Directory for the overlay buffers (sparse, unlinked files; tmpfs is best, as QEMU
    /// recommends a ramdisk). `memory` keeps them in the process instead.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub buffer_dir: String,

    /// Copy-before-write granularity in bytes (a power of two, 512 B to 16 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    pub cluster_size: u64,

    /// Where each disk's persistent state lives (DIR/NAME): the generation in which it was
    /// last equal to its primary's, and whether it failed over. Default: IMAGE.coloblk beside
    /// each image.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    #[command(flatten)]
    pub daemon: DaemonArgs,
}

struct Disk {
    name: String,
    node: SecondaryNode,
    /// Copy-before-write copies of the epochs before the current one (the node counts only
    /// the current epoch's, as clusters in the hidden overlay).
    past_copies: std::sync::atomic::AtomicU64,
    /// After a stop no copy happens any more and the hidden overlay only shrinks.
    stopped: std::sync::atomic::AtomicBool,
    /// A usable copy: false when the daemon starts (a restarted daemon lost its buffer) and
    /// from a primary's sync-begin, until a checkpoint that says the disk is equal.
    consistent: AtomicBool,
    /// The disk's persistent state: the generation it was last equal to its primary in.
    state: super::state::DiskState,
}

impl Disk {
    /// Changes the disk's persistent state and saves it before returning.
    fn save(
        &self,
        change: impl FnOnce(&mut replication::state::DiskState),
    ) -> Result<(), ControlError> {
        self.state.lock().update(change).map_err(|e| {
            ControlError::Refused(format!("disk '{}': saving its state: {e}", self.name))
        })
    }

    /// Clusters preserved by copy-before-write since the daemon started.
    fn cbw_copies(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let current = if self.stopped.load(Relaxed) {
            0
        } else {
            self.node.status().hidden_clusters as u64
        };
        self.past_copies.load(Relaxed) + current
    }

    /// Moves the current epoch's copies into the past, just before the hidden overlay empties.
    fn close_epoch(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.stopped.load(Relaxed) {
            self.past_copies
                .fetch_add(self.node.status().hidden_clusters as u64, Relaxed);
        }
    }
}

/// Records the disk whole once its merge is done (its stage says so, and not before), then
/// removes the merge record, which a restart reads only while the disk is marked merging.
fn record_when_merged(d: &Disk) {
    let (node, state, name) = (d.node.clone(), d.state.clone(), d.name.clone());
    tokio::spawn(async move {
        loop {
            match node.stage() {
                Stage::Done => break,
                Stage::Failover => {}
                // Failed: still half-merged (a retry may finish it).
                _ => return,
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut st = state.lock();
        if let Err(e) = st.update(|s| s.merging = false) {
            tracing::error!(disk = %name, "the merge is done but cannot be recorded: {e}");
            return;
        }
        if let Err(e) = SecondaryNode::discard_merge_record(st.path()) {
            tracing::warn!(disk = %name, "the merge is done; its record stays: {e}");
        }
    });
}

/// The secondary's disks as one replication group.
pub struct SecondaryGroup {
    disks: Vec<Disk>,
    group: ReplicationGroup,
    last: Mutex<Option<SecondaryCheckpoint>>,
    events: Events,
    /// Names the buffer the primary's writes go into: changes at every start and checkpoint,
    /// and starts at a random value, so that a coordinated checkpoint can tell that the
    /// buffer it drained into is the one emptied (not one of a restarted daemon).
    epoch: AtomicU64,
    /// A failover was asked for: checkpoints are refused from now on.
    failed_over: Arc<AtomicBool>,
    /// Random per process (see the status).
    instance: u64,
    /// A coloblk primary has spoken to this daemon (a sync-begin or an epoch checkpoint): from
    /// then on only its coordinated checkpoints make a disk a usable copy. Before, as with a
    /// QEMU primary that says nothing of syncs, any checkpoint does (the operator vouches).
    coloblk_primary: AtomicBool,
    /// The replica exports' server: whether the primary is connected.
    replica: Arc<Server>,
    /// Control operations run one at a time (a failover must not land inside a checkpoint).
    ops: tokio::sync::Mutex<()>,
}

/// A random number below 2^53 (so that every JSON client reads it exactly).
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    random & ((1 << 53) - 1)
}

impl SecondaryGroup {
    /// Every disk's stage.
    pub(super) fn stages(&self) -> Vec<(String, Stage)> {
        self.disks
            .iter()
            .map(|d| (d.name.clone(), d.node.stage()))
            .collect()
    }

    /// A failover was asked for.
    pub(super) fn failed_over(&self) -> bool {
        self.failed_over.load(Ordering::SeqCst)
    }

    fn disk(&self, name: &str) -> Result<&Disk, ControlError> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| ControlError::Refused(format!("no disk '{name}' on this secondary")))
    }

    /// The persistent state of disk `name` (a promotion hands it to the primary it builds).
    pub(super) fn disk_state(&self, name: &str) -> Option<super::state::DiskState> {
        self.disk(name).ok().map(|d| d.state.clone())
    }
}

/// A random first epoch, leaving room below 2^53 for a million checkpoints.
fn first_epoch() -> u64 {
    (random_id() & ((1 << 31) - 1)) << 20
}

/// Lower-case hex of a digest.
fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait]
impl Group for SecondaryGroup {
    fn role(&self) -> Role {
        Role::Secondary
    }

    async fn start(&self, mode: Mode) -> Result<(), ControlError> {
        let _ops = self.ops.lock().await;
        self.group.start(mode).await?;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        info!("replication started on {} disk(s)", self.disks.len());
        Ok(())
    }

    async fn checkpoint(&self, req: CheckpointRequest) -> Result<CheckpointReply, ControlError> {
        let _ops = self.ops.lock().await;
        let finished = self
            .disks
            .iter()
            .any(|d| matches!(d.node.stage(), Stage::Failover | Stage::Done));
        // QEMU answers a checkpoint after failover with success; our own command says so.
        if finished && !req.qemu {
            return Err(ControlError::Refused(
                if self.failed_over.load(Ordering::SeqCst) {
                    "checkpoint refused: already failed over, there is no buffer to empty"
                } else {
                    "checkpoint refused: replication is stopped, there is no buffer to empty"
                }
                .into(),
            ));
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        if let Some(drained) = req.epoch
            && drained != epoch
        {
            return Err(ControlError::Refused(format!(
                "checkpoint refused: the primary drained into epoch {drained}, but this \
                 secondary is in epoch {epoch} (it restarted or checkpointed meanwhile)"
            )));
        }
        // Copies counted now could be missed if the checkpoint then fails; an undercount of a
        // counter is better than a double count, and a failed checkpoint is an error anyway.
        self.group.validate_checkpoint(req.force)?;
        self.disks.iter().for_each(Disk::close_epoch);
        let t = Instant::now();
        self.group.checkpoint(req.force).await?;
        // The overlays are empty. A coordinated checkpoint (with the epoch) is the primary's
        // word that its disks here are equal to its own: those are usable copies now. Without
        // a coloblk primary, any checkpoint is the operator's word, as with QEMU.
        if req.epoch.is_some() {
            self.coloblk_primary.store(true, Ordering::SeqCst);
        }
        let vouched = |name: &str| match (&req.epoch, &req.disks) {
            (Some(_), Some(names)) => names.iter().any(|n| n == name),
            (Some(_), None) => true,
            (None, _) => !self.coloblk_primary.load(Ordering::SeqCst),
        };
        for d in self.disks.iter().filter(|d| vouched(&d.name)) {
            d.consistent.store(true, Ordering::SeqCst);
            // The primary's generation: the one this disk is equal in, from now on.
            if let Some((_, g)) = req.generations.iter().find(|(n, _)| *n == d.name) {
                let g = *g;
                d.save(|s| {
                    s.view.synced_at = Some(g);
                    s.view.host_restarted = false;
                    s.view.current = Some(g);
                    s.view.base = None;
                    s.view.was_primary = false;
                    s.view.discard = false;
                    s.view.promoted_from = None;
                })?;
            }
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!("coloblk_checkpoint_seconds").record(ms / 1000.0);
        *self.last.lock() = Some(SecondaryCheckpoint {
            time_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            duration_ms: ms,
        });
        let epoch = if finished {
            epoch
        } else {
            self.epoch.fetch_add(1, Ordering::SeqCst) + 1
        };
        let reply = CheckpointReply {
            duration_ms: Some(ms),
            epoch: Some(epoch),
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
        let failover = req.failover;
        // A failover that failed is retried; one that runs or ran has nothing left to do.
        let merging_or_merged = self
            .disks
            .iter()
            .all(|d| matches!(d.node.stage(), Stage::Failover | Stage::Done));
        if failover && merging_or_merged && self.failed_over.load(Ordering::SeqCst) && !req.qemu {
            return Ok(StopReply {
                note: Some("already failed over: nothing to do".into()),
            });
        }
        // Refused only where a merge would really run, and only once a coloblk primary has
        // spoken: a QEMU primary says nothing of syncs, and there the operator vouches (after a
        // restart this daemon cannot tell the two apart until its primary speaks; the
        // persistent state will).
        if failover
            && !req.force
            && self.coloblk_primary.load(Ordering::SeqCst)
            && let Some(d) = self.disks.iter().find(|d| {
                matches!(d.node.stage(), Stage::Running | Stage::FailoverFailed)
                    && !d.consistent.load(Ordering::SeqCst)
            })
        {
            return Err(ControlError::NotUsable(d.name.clone()));
        }
        for d in &self.disks {
            if d.node.stage() == Stage::Running {
                d.close_epoch();
                d.stopped.store(true, Ordering::Relaxed);
            }
        }
        let will_merge = failover
            && self
                .disks
                .iter()
                .all(|d| matches!(d.node.stage(), Stage::Running | Stage::FailoverFailed));
        if will_merge {
            // Raised before the merge starts, so it comes before the merge's own events.
            self.events.emit("FAILOVER_STARTED", json!({}));
        }
        if will_merge {
            // Before the merge touches the disk: from here it has left the pair (a generation
            // of its own, failed over from the one it was equal in), and until the merge ends
            // it is half-merged (a restart refuses to serve it).
            for d in &self.disks {
                d.save(|s| {
                    // A retry of a failed merge keeps where the first attempt left from.
                    if !s.merging {
                        s.view.promoted_from = s.view.synced_at.or(s.view.current);
                        s.view.current = Some(replication::state::Gen::new());
                        s.view.synced_at = None;
                    }
                    s.merging = true;
                })?;
            }
        }
        self.group.stop(failover).await?;
        if failover {
            self.failed_over.store(true, Ordering::SeqCst);
        }
        if will_merge {
            // The merge runs on after this reply.
            for d in &self.disks {
                record_when_merged(d);
            }
        }
        Ok(StopReply::default())
    }

    fn status(&self) -> Status {
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let s = d.node.status();
                SecondaryDisk {
                    name: d.name.clone(),
                    stage: s.stage.as_str().into(),
                    error: s.error,
                    cluster_size: s.cluster_size,
                    active_bytes: s.active_clusters as u64 * s.cluster_size,
                    hidden_bytes: s.hidden_clusters as u64 * s.cluster_size,
                    cbw_copies: d.cbw_copies(),
                    failover: Failover {
                        done_bytes: s.failover.done,
                        total_bytes: s.failover.total,
                        resumed: s.resumed,
                    },
                    consistent: d.consistent.load(Ordering::SeqCst),
                    primary_connected: self.replica.clients(&d.name) > 0,
                }
            })
            .collect();
        Status::Secondary(SecondaryStatus {
            epoch: self.epoch.load(Ordering::SeqCst),
            instance: self.instance,
            failed_over: self.failed_over.load(Ordering::SeqCst),
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

    async fn digest(&self, req: DigestRequest) -> Result<Vec<String>, ControlError> {
        let (disk, offset, len, block) = (req.disk.as_str(), req.offset, req.len, req.block);
        let d = self.disk(disk)?;
        let disk_len = d.node.disk().len();
        if !(4096..=(16 << 20)).contains(&block) || !block.is_power_of_two() {
            return Err(ControlError::Refused(format!(
                "block {block} must be a power of two from 4096 to 16 MiB"
            )));
        }
        if len > crate::control::MAX_DIGEST_RANGE {
            return Err(ControlError::Refused(format!(
                "length {len} is more than {} bytes at once",
                crate::control::MAX_DIGEST_RANGE
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > disk_len) {
            return Err(ControlError::Refused(format!(
                "{offset}+{len} is beyond the end of disk '{disk}' ({disk_len} bytes)"
            )));
        }
        let digests =
            replication::primary::digest_blocks(d.node.disk().as_ref(), offset, len, block)
                .await
                .map_err(|e| ControlError::Refused(format!("reading disk '{disk}': {e}")))?;
        Ok(digests.iter().map(|d| hex(d)).collect())
    }

    fn generations(&self, disk: &str) -> Result<replication::state::GenView, ControlError> {
        Ok(super::state::view(&self.disk(disk)?.state))
    }

    fn discard_changes(&self, disk: &str) -> Result<(), ControlError> {
        self.disk(disk)?.save(|s| s.view.discard = true)
    }

    async fn sync_begin(&self, disk: &str) -> Result<(), ControlError> {
        // Not inside a checkpoint: one that ends after this must not call the disk usable.
        let _ops = self.ops.lock().await;
        let d = self.disk(disk)?;
        self.coloblk_primary.store(true, Ordering::SeqCst);
        // On disk before the first copy lands: a restart mid-sync must not find the disk
        // called equal in the old generation.
        d.save(|s| s.view.synced_at = None)?;
        if d.consistent.swap(false, Ordering::SeqCst) {
            tracing::warn!(
                disk,
                "the primary starts a sync: this disk is no usable copy until the next checkpoint"
            );
        }
        Ok(())
    }

    fn refresh_metrics(&self) {
        for d in &self.disks {
            let s = d.node.status();
            let n = d.name.clone();
            metrics::gauge!("coloblk_consistent", "disk" => n.clone()).set(
                if d.consistent.load(Ordering::SeqCst) {
                    1.0
                } else {
                    0.0
                },
            );
            metrics::gauge!("coloblk_active_bytes", "disk" => n.clone())
                .set((s.active_clusters as u64 * s.cluster_size) as f64);
            metrics::gauge!("coloblk_hidden_bytes", "disk" => n.clone())
                .set((s.hidden_clusters as u64 * s.cluster_size) as f64);
            metrics::counter!("coloblk_cbw_copies_total", "disk" => n.clone())
                .absolute(d.cbw_copies());
            metrics::gauge!("coloblk_failover_done_bytes", "disk" => n.clone())
                .set(s.failover.done as f64);
            metrics::gauge!("coloblk_failover_total_bytes", "disk" => n.clone())
                .set(s.failover.total as f64);
            metrics::gauge!("coloblk_replication_error", "disk" => n).set(if s.error.is_some() {
                1.0
            } else {
                0.0
            });
        }
    }
}

/// Opens a user-named qcow2 overlay (QEMU-style setups), ignoring its backing file: the node
/// tracks what the overlay holds itself.
fn qcow2_overlay(
    spec: &DiskSpec,
    which: &str,
    path: &str,
    pool: &IoPool,
) -> anyhow::Result<DevOverlay> {
    let opts = OpenOptions::new(ImageFormat::Qcow2, pool.clone()).backing(Qcow2Backing::None);
    let dev = blockdev::open(path, opts).with_context(|| {
        format!(
            "disk '{}': cannot open the {which} overlay {path}",
            spec.name
        )
    })?;
    Ok(DevOverlay::new(dev))
}

fn build_node(
    spec: &DiskSpec,
    args: &SecondaryArgs,
    pool: &IoPool,
) -> anyhow::Result<SecondaryNode> {
    let (active, hidden) = (spec.option("active"), spec.option("hidden"));
    let disk = spec.open(pool)?;
    let fail = |e: replication::ReplicationError| anyhow::anyhow!("disk '{}': {e}", spec.name);
    match (active, hidden) {
        (Some(a), Some(h)) => {
            let a = qcow2_overlay(spec, "active", a, pool)?;
            let h = qcow2_overlay(spec, "hidden", h, pool)?;
            SecondaryNode::with_overlays(disk, args.cluster_size, Arc::new(a), Arc::new(h))
                .map_err(fail)
        }
        (None, None) => {
            let store = if args.buffer_dir == "memory" {
                OverlayStore::Memory
            } else {
                let dir = PathBuf::from(&args.buffer_dir);
                std::fs::create_dir_all(&dir).with_context(|| {
                    format!("cannot create the buffer directory {}", dir.display())
                })?;
                OverlayStore::BufferDir(dir)
            };
            let cfg = SecondaryConfig {
                cluster_size: args.cluster_size,
                store,
                pool: pool.clone(),
            };
            SecondaryNode::new(disk, cfg).map_err(fail)
        }
        _ => anyhow::bail!(
            "disk '{}': give both active= and hidden=, or neither",
            spec.name
        ),
    }
}

/// Runs `coloblk secondary` until SIGTERM.
pub async fn run(args: SecondaryArgs) -> anyhow::Result<std::process::ExitCode> {
    crate::disk_spec::unique_names(&args.disks)?;
    super::run(
        args.daemon.metrics.as_ref(),
        &args.daemon.security,
        async |pool: &IoPool| open(&args, pool).await,
    )
    .await
}

/// Opens the disks and builds the replica exports (for the primary) and the top exports (for
/// the speculative VM).
async fn open(args: &SecondaryArgs, pool: &IoPool) -> anyhow::Result<Plan> {
    let replica_listen = args
        .replica_listen
        .clone()
        .context("--replica-listen is required")?;
    let mut disks: Vec<Disk> = Vec::new();
    let mut group = ReplicationGroup::new();
    let mut managed = false;
    let mut any_resumed = false;
    for spec in &args.disks {
        let node = build_node(spec, args, pool)?;
        let state = super::state::open(spec, args.state_dir.as_deref(), node.disk().len())?;
        {
            // Saved with a boot id of another boot: the host restarted since, and its page
            // cache with it; the primary then resends its whole write log.
            let mut st = state.lock();
            let saved = st.state().boot.clone();
            if st.state().view.synced_at.is_some()
                && saved.is_some()
                && saved != replication::state::boot_id()
            {
                st.update(|s| s.view.host_restarted = true)
                    .with_context(|| format!("disk '{}': saving its state", spec.name))?;
            }
        }
        let dir = state.lock().path().to_path_buf();
        let mut resumed = false;
        let node = if state.lock().state().merging {
            // A merge cut short by the death of the process resumes from its record; without
            // one (overlays that cannot outlive the process, or a host restart), the disk is
            // half-merged and is not served.
            let boot = replication::state::boot_id();
            let half = |why: String| {
                anyhow::anyhow!(
                    "disk '{}': a failover merge into {} began and did not finish; {why}, so \
                     the disk is half-merged and is not served. Copy the disk from the \
                     primary, or remove {} to serve it as it is",
                    spec.name,
                    spec.path.display(),
                    dir.display()
                )
            };
            match SecondaryNode::resume(node.disk().clone(), pool.clone(), &dir, boot.as_deref()) {
                Ok(Some(n)) => {
                    resumed = true;
                    n
                }
                Ok(None) => return Err(half("its buffers were not kept".into())),
                Err(e) => return Err(half(e.to_string())),
            }
        } else {
            // A record left after the merge's end was saved: nothing needs it.
            if SecondaryNode::has_merge_record(&dir) {
                SecondaryNode::discard_merge_record(&dir).with_context(|| {
                    format!("disk '{}': removing a finished merge's record", spec.name)
                })?;
            }
            node
        };
        node.keep_merge_record_in(dir);
        if state.lock().state().view.synced_at.is_some() {
            // A coloblk primary made this disk a copy before the restart: until it syncs
            // again, the disk is no usable copy (the buffer of the epoch is gone).
            managed = true;
            tracing::warn!(disk = %spec.name, "restarted: not a usable copy until the primary resyncs and checkpoints");
        }
        group.add(spec.name.clone(), Arc::new(node.clone()));
        info!(disk = %spec.name, path = %spec.path.display(), len = node.disk().len(), "disk ready");
        any_resumed |= resumed;
        let disk = Disk {
            name: spec.name.clone(),
            node,
            past_copies: 0.into(),
            stopped: false.into(),
            consistent: false.into(),
            state,
        };
        if resumed {
            disk.stopped.store(true, Ordering::Relaxed);
            record_when_merged(&disk);
        }
        disks.push(disk);
    }
    let replica_exports = ExportSet::new();
    let top_exports = ExportSet::new();
    // The top exports go through a switch: a promotion puts a primary node in front of the
    // top path with the VM's connections open.
    let mut switches = Vec::new();
    for d in &disks {
        // One primary at a time: a second is refused, the same one may reconnect.
        let mut replica = Export::new(d.name.clone(), Arc::new(d.node.replica()));
        replica.single_writer = true;
        replica_exports.add(replica);
        let top: Arc<dyn blockdev::BlockDev> = Arc::new(d.node.top());
        let switch = Switch::new(top.clone());
        top_exports.add(Export::new(d.name.clone(), switch.clone()));
        switches.push((d.name.clone(), switch, top));
    }
    // A resumed merge is a failover under way: the old primary stays fenced.
    let failed_over = Arc::new(AtomicBool::new(any_resumed));
    // One payload budget for both servers: the daemon's memory is bounded as a whole.
    let config = ServerConfig::default();
    let replica_server = Server::new(replica_exports, config.clone());
    let group = Arc::new(SecondaryGroup {
        disks,
        group,
        last: Mutex::new(None),
        events: Events::default(),
        epoch: AtomicU64::new(first_epoch()),
        failed_over: failed_over.clone(),
        instance: random_id(),
        coloblk_primary: managed.into(),
        replica: replica_server.clone(),
        ops: tokio::sync::Mutex::new(()),
    });
    let mut replica = Endpoint::new("the primary", replica_listen, replica_server);
    replica.tls_always = true;
    // After a failover the replica export is fenced (the old primary may no longer write), so
    // its final flush failing is expected; the top export serves the VM then, and its flush
    // is the one that matters.
    replica.flush_matters = Box::new(move || !failed_over.load(Ordering::SeqCst));
    let top_server = Server::new(top_exports.clone(), config);
    let (top, vhost) = super::export_endpoints(
        "the speculative VM",
        &args.export_listen,
        &top_exports,
        top_server,
    )?;
    Ok(Plan {
        name: "coloblk secondary",
        endpoints: std::iter::once(replica).chain(top).collect(),
        vhost,
        group: Some((Promotable::new(group, switches), args.daemon.clone())),
    })
}

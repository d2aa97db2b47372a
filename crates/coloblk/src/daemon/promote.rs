//! Re-protection after failover (QEMU calls it continuous replication): a secondary that has
//! failed over becomes a primary for its disks, on the same sockets, with the VM's open NBD
//! connections kept.
//!
//! ```text
//!   before:  VM --top export--> Switch --> TopPath (stage DONE: the merged disk)
//!   after:   VM --top export--> Switch --> PrimaryNode --local--> TopPath
//!                                               '--forward--> the new secondary's replica export
//! ```
//!
//! The [`Switch`] under each top export is what lets connections stay: the export keeps its
//! device, and the device's target changes. Writes that were on their way through the old
//! target when it changed are covered by the first sync (checksum or full), which compares or
//! copies every byte after the switch.

use std::sync::Arc;

use async_trait::async_trait;
use blockdev::{BatchWrite, BlockDev, DevInfo, ExtentList, Result, WriteFlags, ZeroFlags};
use bytes::Bytes;
use parking_lot::RwLock;
use qmp::QmpServer;
use replication::{Mode, ReplicationEvent, Stage};
use serde_json::json;
use tokio::sync::broadcast;
use tracing::info;

use super::link::SyncMode;
use super::primary::{NewDisk, Settings, new_group};
use super::secondary::SecondaryGroup;
use crate::control::status::{CheckpointReply, Status, StopReply};
use crate::control::{
    CheckpointRequest, ControlError, DigestRequest, Group, PromoteRequest, ReplicaRequest, Role,
    StopRequest, forward_events,
};
use std::time::Duration;

/// A device whose target can change under open connections. Every request holds the switch
/// (shared) until it completes, so a change waits for the requests on their way through the
/// old target: none of them can land after the new target's first sync passed its range.
pub struct Switch {
    target: tokio::sync::RwLock<Arc<dyn BlockDev>>,
    /// Both targets serve the same disk: its facts do not change with them.
    info: DevInfo,
}

impl Switch {
    /// A switch to `target`.
    pub fn new(target: Arc<dyn BlockDev>) -> Arc<Self> {
        Arc::new(Switch {
            info: target.info(),
            target: tokio::sync::RwLock::new(target),
        })
    }

    /// Sends every request from now on to `target`, once those on their way have completed.
    pub async fn set(&self, target: Arc<dyn BlockDev>) {
        *self.target.write().await = target;
    }
}

#[async_trait]
impl BlockDev for Switch {
    fn info(&self) -> DevInfo {
        self.info
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.target.read().await.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.target.read().await.write(offset, data, flags).await
    }
    async fn write_batch(&self, writes: Vec<BatchWrite>) -> Vec<Result<()>> {
        self.target.read().await.write_batch(writes).await
    }
    async fn flush(&self) -> Result<()> {
        self.target.read().await.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.target
            .read()
            .await
            .write_zeroes(offset, len, flags)
            .await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.target.read().await.discard(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        self.target.read().await.block_status(offset, len).await
    }
}

/// A secondary's group that a promotion turns into a primary's.
pub struct Promotable {
    secondary: Arc<SecondaryGroup>,
    /// Each disk's top export device and what it serves now (the node's top path).
    switches: Vec<(String, Arc<Switch>, Arc<dyn BlockDev>)>,
    current: RwLock<Arc<dyn Group>>,
    qmp: parking_lot::Mutex<Option<Arc<QmpServer>>>,
    ops: tokio::sync::Mutex<()>,
}

impl Promotable {
    /// Wraps a secondary's group; `switches` are the top exports' devices, by disk.
    pub fn new(
        secondary: Arc<SecondaryGroup>,
        switches: Vec<(String, Arc<Switch>, Arc<dyn BlockDev>)>,
    ) -> Arc<Self> {
        Arc::new(Promotable {
            current: RwLock::new(secondary.clone()),
            secondary,
            switches,
            qmp: parking_lot::Mutex::new(None),
            ops: tokio::sync::Mutex::new(()),
        })
    }

    fn now(&self) -> Arc<dyn Group> {
        self.current.read().clone()
    }
}

#[async_trait]
impl Group for Promotable {
    fn role(&self) -> Role {
        self.now().role()
    }
    async fn start(&self, mode: Mode) -> std::result::Result<(), ControlError> {
        self.now().start(mode).await
    }
    async fn checkpoint(
        &self,
        req: CheckpointRequest,
    ) -> std::result::Result<CheckpointReply, ControlError> {
        self.now().checkpoint(req).await
    }
    fn get_error(&self) -> std::result::Result<(), ControlError> {
        self.now().get_error()
    }
    async fn stop(&self, req: StopRequest) -> std::result::Result<StopReply, ControlError> {
        self.now().stop(req).await
    }
    fn status(&self) -> Status {
        self.now().status()
    }
    fn events(&self) -> Vec<(String, broadcast::Receiver<ReplicationEvent>)> {
        self.now().events()
    }
    fn attach(&self, server: Arc<QmpServer>) {
        *self.qmp.lock() = Some(server.clone());
        self.now().attach(server);
    }
    fn refresh_metrics(&self) {
        self.now().refresh_metrics()
    }
    async fn shutdown(&self) {
        self.now().shutdown().await
    }
    async fn set_replica(&self, req: ReplicaRequest) -> std::result::Result<(), ControlError> {
        self.now().set_replica(req).await
    }
    async fn verify(&self) -> std::result::Result<serde_json::Value, ControlError> {
        self.now().verify().await
    }
    async fn digest(&self, req: DigestRequest) -> std::result::Result<Vec<String>, ControlError> {
        self.now().digest(req).await
    }
    async fn sync_begin(&self, disk: &str) -> std::result::Result<(), ControlError> {
        self.now().sync_begin(disk).await
    }
    fn generations(
        &self,
        disk: &str,
    ) -> std::result::Result<replication::state::GenView, ControlError> {
        self.now().generations(disk)
    }
    fn discard_changes(&self, disk: &str) -> std::result::Result<(), ControlError> {
        self.now().discard_changes(disk)
    }

    async fn promote(&self, req: PromoteRequest) -> std::result::Result<(), ControlError> {
        let _ops = self.ops.lock().await;
        if self.now().role() == Role::Primary {
            return Err(ControlError::Refused(
                "already promoted: this daemon is a primary".into(),
            ));
        }
        for (name, stage) in self.secondary.stages() {
            if stage != Stage::Done || !self.secondary.failed_over() {
                return Err(ControlError::Refused(format!(
                    "promote needs a finished failover: disk '{name}' is in stage {stage}"
                )));
            }
        }
        let mut disks = Vec::new();
        for (name, _, top) in &self.switches {
            let r = req
                .replicas
                .iter()
                .find(|r| &r.disk == name)
                .ok_or_else(|| {
                    ControlError::Refused(format!("no replica given for disk '{name}'"))
                })?;
            let sync = match r.sync.as_deref() {
                Some("full") => SyncMode::Full,
                Some("none") => SyncMode::None,
                Some("checksum") | None if req.peer_control.is_some() => SyncMode::Checksum,
                None => SyncMode::Full,
                Some(other) => {
                    return Err(ControlError::Refused(format!(
                        "disk '{name}': sync={other} is not checksum, full or none \
                         (checksum needs peer-control)"
                    )));
                }
            };
            r.uri
                .parse::<nbd::uri::NbdUri>()
                .map_err(|e| ControlError::Refused(format!("disk '{name}': {e}")))?;
            disks.push(NewDisk {
                name: name.clone(),
                local: top.clone(),
                uri: r.uri.clone(),
                sync,
                state: self.secondary.disk_state(name),
            });
        }
        if let Some(r) = req
            .replicas
            .iter()
            .find(|r| !self.switches.iter().any(|(n, _, _)| *n == r.disk))
        {
            return Err(ControlError::Refused(format!(
                "no disk '{}' on this daemon",
                r.disk
            )));
        }
        let settings = Settings {
            mode: req.mode,
            peer_control: req.peer_control.clone(),
            peer_timeout: Duration::from_secs(10),
            link_timeout: Duration::from_secs(10),
            queue_mib: 64,
            resync_rate: None,
            fence_on_promoted: true,
        };
        let primary = new_group(disks, &settings)
            .map_err(|e| ControlError::Refused(coloblk::error_chain(e.as_ref())))?;
        primary.start(Mode::Primary).await?;
        for (name, node) in primary.nodes() {
            if let Some((_, switch, _)) = self.switches.iter().find(|(n, _, _)| *n == name) {
                switch.set(Arc::new(node)).await;
            }
        }
        // The links come up once every request goes through the new primary nodes.
        primary.start_links();
        if let Some(qmp) = self.qmp.lock().clone() {
            primary.attach(qmp.clone());
            for (disk, rx) in primary.events() {
                forward_events(disk, rx, qmp.clone());
            }
            qmp.emit("REPLICATION_PROMOTED", json!({}));
        }
        info!(
            "promoted: this daemon is the primary of its disks and protects them with a new secondary"
        );
        *self.current.write() = primary;
        Ok(())
    }
}

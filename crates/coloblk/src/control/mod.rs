//! The control socket: QMP commands (ours and QEMU's COLO ones) mapped onto a daemon's
//! replication group, whichever role the daemon plays, with typed replies (module `status`)
//! and typed errors.
//!
//! | command | effect |
//! |---|---|
//! | `query-replication` | status of every disk |
//! | `replication-start` / `-checkpoint` / `-failover` / `-stop` | our clear names |
//! | `xen-set-replication {enable, primary, failover?}` | QEMU: start or stop all |
//! | `query-xen-replication-status` | QEMU: `{error, desc?}` |
//! | `xen-colo-do-checkpoint` | QEMU: checkpoint all |
//! | `x-colo-lost-heartbeat` | QEMU: fail over |
//! | `replication-set-replica {disk, uri, peer-control?, sync?}` | primary: point a disk at another secondary |
//! | `replication-promote {replicas: [{disk, uri, sync?}], peer-control?, mode?}` | a failed-over secondary becomes a primary, protecting its disks with a new secondary |
//! | `replication-verify` | primary: compare every disk with its secondary by digests; what differs is resynced |
//! | `replication-digest {disk, offset, length, block}` | secondary: digests of its disk (checksum sync) |
//! | `replication-sync-begin {disk}` | secondary: a primary's sync starts; the disk is no usable copy until the next checkpoint |
//!
//! A new command is a line in [`COMMANDS`] and an arm in [`Control::execute`], plus the
//! [`Group`] method it calls if it needs a new one.

mod events;
pub mod status;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use qmp::{Args, Handler, QmpError, QmpServer};
use replication::{GroupError, Mode, ReplicationError, ReplicationEvent};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub use events::forward_events;
use status::{CheckpointReply, Status, StopReply};

/// Which side a daemon plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves the VM and forwards its writes.
    Primary,
    /// Keeps the primary's disk and runs the speculative VM's view.
    Secondary,
}

impl Role {
    /// The replication mode of this role's nodes.
    pub fn mode(self) -> Mode {
        match self {
            Role::Primary => Mode::Primary,
            Role::Secondary => Mode::Secondary,
        }
    }
}

/// What a checkpoint command asked for.
#[derive(Debug, Clone, Default)]
pub struct CheckpointRequest {
    /// Override a sticky error (never a down link, dirty ranges or an epoch mismatch).
    pub force: bool,
    /// The secondary epoch a coordinated checkpoint drained for: refused if it is not the
    /// current one.
    pub epoch: Option<u64>,
    /// Asked through QEMU's command: answer as QEMU does where QEMU has an answer.
    pub qemu: bool,
    /// The disks a coordinating primary holds here: with `epoch`, they are usable copies
    /// after this checkpoint.
    pub disks: Option<Vec<String>>,
    /// Per disk, the primary's generation: the secondary records it as the one its disk is
    /// equal in (persistent state).
    pub generations: Vec<(String, replication::state::Gen)>,
}

/// What a stop command asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopRequest {
    /// Fail over (merge the overlays) instead of discarding them.
    pub failover: bool,
    /// Asked through QEMU's command: answer as QEMU does where QEMU has an answer.
    pub qemu: bool,
    /// Fail over even from a disk that is not a usable copy (a sync was running).
    pub force: bool,
}

/// One disk's new secondary in a promotion.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// The disk.
    pub disk: String,
    /// The new secondary's replica export.
    pub uri: String,
    /// How the first sync compares (`checksum`, `full` or `none`).
    pub sync: Option<String>,
}

/// What `replication-promote` asked for.
#[derive(Debug, Clone)]
pub struct PromoteRequest {
    /// Every disk's new secondary.
    pub replicas: Vec<ReplicaSpec>,
    /// The new secondary's control socket.
    pub peer_control: Option<nbd::addr::SocketAddr>,
    /// Forwarding mode from now on.
    pub mode: replication::primary::ForwardMode,
}

/// What `replication-set-replica` asked for.
#[derive(Debug, Clone)]
pub struct ReplicaRequest {
    /// The disk.
    pub disk: String,
    /// The new secondary's replica export.
    pub uri: String,
    /// The new secondary's control socket (default: the daemon's --peer-control).
    pub peer_control: Option<String>,
    /// How the first sync compares (`checksum`, `full` or `none`).
    pub sync: Option<String>,
}

/// What `replication-digest` asked for.
#[derive(Debug, Clone)]
pub struct DigestRequest {
    /// The disk.
    pub disk: String,
    /// Start of the range.
    pub offset: u64,
    /// Length of the range.
    pub len: u64,
    /// Bytes per digest.
    pub block: u64,
}

/// Largest range one `replication-digest` covers (bounds the daemon's work per command).
pub const MAX_DIGEST_RANGE: u64 = 64 << 20;

fn only_role(role: Role, command: &str) -> ControlError {
    let other = match role {
        Role::Primary => "secondary",
        Role::Secondary => "primary",
    };
    ControlError::Refused(format!("{command} is a command of a {other}"))
}

/// Why a control command failed. The text is what the client sees as `desc`: QEMU's own words
/// where a QEMU situation is met, plain words otherwise.
#[derive(Debug)]
pub enum ControlError {
    /// A member of the replication group refused (its error alone, as QEMU prints it).
    Group(GroupError),
    /// One disk refused, named.
    Disk {
        /// The disk.
        disk: String,
        /// Its error.
        error: ReplicationError,
    },
    /// The operation cannot be done now; the text says why.
    Refused(String),
    /// The primary drained, and the secondary's checkpoint then failed.
    Peer(String),
    /// A failover refused: this disk is not a usable copy (a primary's sync is incomplete).
    NotUsable(String),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Group(e) => write!(f, "{e}"),
            ControlError::Disk { disk, error } => write!(f, "disk '{disk}': {error}"),
            ControlError::Refused(why) => f.write_str(why),
            ControlError::Peer(why) => {
                write!(f, "primary drained; secondary checkpoint failed: {why}")
            }
            ControlError::NotUsable(disk) => write!(
                f,
                "disk {disk} is not a usable copy: resync incomplete (replication-failover \
                 with force: true fails over all the same)"
            ),
        }
    }
}

impl std::error::Error for ControlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ControlError::Group(e) => Some(e),
            ControlError::Disk { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<GroupError> for ControlError {
    fn from(e: GroupError) -> Self {
        ControlError::Group(e)
    }
}

/// Where a group raises QMP events: the control server, once it exists (the group is built
/// first, because the server dispatches to it).
#[derive(Default)]
pub struct Events(parking_lot::Mutex<Option<Arc<QmpServer>>>);

impl Events {
    /// Sends events to `server` from now on.
    pub fn attach(&self, server: Arc<QmpServer>) {
        *self.0.lock() = Some(server);
    }

    /// Raises an event (dropped before a server is attached).
    pub fn emit(&self, name: &str, data: Value) {
        if let Some(s) = self.0.lock().as_ref() {
            s.emit(name, data);
        }
    }
}

/// What a daemon's disks do together.
#[async_trait]
pub trait Group: Send + Sync + 'static {
    /// The daemon's role.
    fn role(&self) -> Role;
    /// All disks or none.
    async fn start(&self, mode: Mode) -> Result<(), ControlError>;
    /// All disks or none; the reply says what was done and how long it took.
    async fn checkpoint(&self, req: CheckpointRequest) -> Result<CheckpointReply, ControlError>;
    /// The first error of any disk (QEMU's texts).
    fn get_error(&self) -> Result<(), ControlError>;
    /// Stops (or fails over) every disk.
    async fn stop(&self, req: StopRequest) -> Result<StopReply, ControlError>;
    /// `query-replication`.
    fn status(&self) -> Status;
    /// Every disk's event stream, with the disk's name.
    fn events(&self) -> Vec<(String, broadcast::Receiver<ReplicationEvent>)>;
    /// Sends the group's own events (a checkpoint, a failover starting) to `server`.
    fn attach(&self, server: Arc<QmpServer>);
    /// Brings the gauges up to date before a metrics scrape.
    fn refresh_metrics(&self);
    /// Last words at shutdown, once the NBD servers have flushed.
    async fn shutdown(&self) {}
    /// Primary: compares every disk with its secondary; per disk, bytes compared and found
    /// different.
    async fn verify(&self) -> Result<Value, ControlError> {
        Err(only_role(Role::Primary, "replication-verify"))
    }
    /// Primary: points `disk` at another secondary.
    async fn set_replica(&self, _req: ReplicaRequest) -> Result<(), ControlError> {
        Err(only_role(Role::Primary, "replication-set-replica"))
    }
    /// Secondary: digests of `disk`, `block` bytes each, as hex.
    async fn digest(&self, _req: DigestRequest) -> Result<Vec<String>, ControlError> {
        Err(only_role(Role::Secondary, "replication-digest"))
    }
    /// Secondary after failover: becomes a primary (see `daemon::promote`).
    async fn promote(&self, _req: PromoteRequest) -> Result<(), ControlError> {
        Err(ControlError::Refused(
            "replication-promote is a command of a secondary that has failed over".into(),
        ))
    }
    /// Secondary: a primary starts a sync of `disk`.
    async fn sync_begin(&self, _disk: &str) -> Result<(), ControlError> {
        Err(only_role(Role::Secondary, "replication-sync-begin"))
    }
    /// Either role: what `disk`'s persistent state says of it (generations).
    fn generations(&self, disk: &str) -> Result<replication::state::GenView, ControlError> {
        Err(ControlError::Refused(format!(
            "no persistent state for disk '{disk}' here"
        )))
    }
    /// Secondary: the operator discards `disk`'s own changes (split-brain resolution): the
    /// next primary to connect overwrites them.
    fn discard_changes(&self, _disk: &str) -> Result<(), ControlError> {
        Err(only_role(Role::Secondary, "replication-discard-changes"))
    }
}

/// Dispatches QMP commands to a [`Group`].
pub struct Control<G: Group + ?Sized> {
    /// The daemon's disks.
    pub group: Arc<G>,
}

/// Every command the control socket answers (`query-commands` lists them).
pub const COMMANDS: &[&str] = &[
    "query-replication",
    "replication-start",
    "replication-checkpoint",
    "replication-failover",
    "replication-stop",
    "xen-set-replication",
    "query-xen-replication-status",
    "xen-colo-do-checkpoint",
    "x-colo-lost-heartbeat",
    "replication-set-replica",
    "replication-verify",
    "replication-promote",
    "replication-digest",
    "replication-sync-begin",
    "replication-generations",
    "replication-discard-changes",
];

fn promote_request(args: &Args) -> Result<PromoteRequest, QmpError> {
    let bad = |m: &str| QmpError::generic(m.to_string());
    let list = args
        .0
        .get("replicas")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("Parameter 'replicas' is missing or not a list"))?;
    let mut replicas = Vec::new();
    for r in list {
        let field = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(disk), Some(uri)) = (field("disk"), field("uri")) else {
            return Err(bad("each of 'replicas' needs 'disk' and 'uri' strings"));
        };
        replicas.push(ReplicaSpec {
            disk,
            uri,
            sync: field("sync"),
        });
    }
    let peer_control = match args.opt_str("peer-control")? {
        Some(p) => Some(
            p.parse()
                .map_err(|e: nbd::addr::AddrError| bad(&e.to_string()))?,
        ),
        None => None,
    };
    let mode = match args.opt_str("mode")? {
        Some(m) => crate::disk_spec::forward_mode(m).map_err(|e| bad(&e))?,
        None => replication::primary::ForwardMode::Async,
    };
    Ok(PromoteRequest {
        replicas,
        peer_control,
        mode,
    })
}

fn required_str<'a>(args: &'a Args, name: &str) -> Result<&'a str, QmpError> {
    args.opt_str(name)?
        .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' is missing")))
}

fn required_u64(args: &Args, name: &str) -> Result<u64, QmpError> {
    args.opt_u64(name)?
        .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' is missing")))
}

fn reply<T: serde::Serialize>(r: Result<T, ControlError>) -> Result<Value, QmpError> {
    match r {
        Ok(v) => Ok(serde_json::to_value(v).expect("replies always serialise")),
        Err(e) => Err(QmpError::generic(e.to_string())),
    }
}

fn empty(r: Result<(), ControlError>) -> Result<Value, QmpError> {
    reply(r.map(|()| json!({})))
}

#[async_trait]
impl<G: Group + ?Sized> Handler for Control<G> {
    /// Every command that changes something is logged with who gave it (a failover, a stop, a
    /// forced checkpoint, a promotion can each lose data: the log says whose decision it was).
    async fn execute_from(&self, peer: &str, name: &str, args: Args) -> Result<Value, QmpError> {
        let reads = name.starts_with("query-") || name == "replication-digest";
        if !reads {
            let arguments = Value::Object(args.0.clone());
            tracing::info!(%peer, command = name, %arguments, "control command");
        }
        self.execute(name, args).await
    }

    async fn execute(&self, name: &str, args: Args) -> Result<Value, QmpError> {
        let g = &self.group;
        match name {
            "query-replication" => {
                args.only(&[])?;
                reply(Ok(g.status()))
            }
            "replication-start" => {
                args.only(&[])?;
                empty(g.start(g.role().mode()).await)
            }
            "replication-checkpoint" => {
                args.only(&["force", "epoch", "disks", "generations"])?;
                let generations = match args.0.get("generations") {
                    None => Vec::new(),
                    Some(Value::Object(m)) => m
                        .iter()
                        .map(|(k, v)| {
                            v.as_str()
                                .ok_or_else(|| "not a string".to_string())
                                .and_then(str::parse)
                                .map(|g| (k.clone(), g))
                                .map_err(|e| {
                                    QmpError::generic(format!("generation of disk '{k}': {e}"))
                                })
                        })
                        .collect::<Result<_, _>>()?,
                    Some(_) => {
                        return Err(QmpError::generic(
                            "Invalid parameter type for 'generations', expected: object",
                        ));
                    }
                };
                let disks = match args.0.get("disks") {
                    None => None,
                    Some(Value::Array(l)) if l.iter().all(Value::is_string) => Some(
                        l.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect(),
                    ),
                    Some(_) => {
                        return Err(QmpError::generic(
                            "Invalid parameter type for 'disks', expected: array of strings",
                        ));
                    }
                };
                let req = CheckpointRequest {
                    force: args.opt_bool("force")?.unwrap_or(false),
                    epoch: args.opt_u64("epoch")?,
                    qemu: false,
                    disks,
                    generations,
                };
                reply(g.checkpoint(req).await)
            }
            "replication-failover" => {
                args.only(&["force"])?;
                let req = StopRequest {
                    failover: true,
                    force: args.opt_bool("force")?.unwrap_or(false),
                    ..Default::default()
                };
                reply(g.stop(req).await)
            }
            "x-colo-lost-heartbeat" => {
                args.only(&[])?;
                let req = StopRequest {
                    failover: true,
                    qemu: true,
                    force: false,
                };
                reply(g.stop(req).await)
            }
            "replication-stop" => {
                args.only(&[])?;
                reply(g.stop(StopRequest::default()).await)
            }
            "replication-set-replica" => {
                args.only(&["disk", "uri", "peer-control", "sync"])?;
                let req = ReplicaRequest {
                    disk: required_str(&args, "disk")?.to_string(),
                    uri: required_str(&args, "uri")?.to_string(),
                    peer_control: args.opt_str("peer-control")?.map(str::to_string),
                    sync: args.opt_str("sync")?.map(str::to_string),
                };
                empty(g.set_replica(req).await)
            }
            "replication-promote" => {
                args.only(&["replicas", "peer-control", "mode"])?;
                let req = promote_request(&args)?;
                empty(g.promote(req).await)
            }
            "replication-verify" => {
                args.only(&[])?;
                reply(g.verify().await)
            }
            "replication-digest" => {
                args.only(&["disk", "offset", "length", "block"])?;
                let req = DigestRequest {
                    disk: required_str(&args, "disk")?.to_string(),
                    offset: required_u64(&args, "offset")?,
                    len: required_u64(&args, "length")?,
                    block: required_u64(&args, "block")?,
                };
                reply(g.digest(req).await.map(|d| json!({"digests": d})))
            }
            "replication-sync-begin" => {
                args.only(&["disk"])?;
                let disk = required_str(&args, "disk")?;
                empty(g.sync_begin(disk).await)
            }
            "replication-generations" => {
                args.only(&["disk"])?;
                let disk = required_str(&args, "disk")?;
                reply(g.generations(disk))
            }
            "replication-discard-changes" => {
                args.only(&["disk"])?;
                let disk = required_str(&args, "disk")?;
                tracing::warn!(disk, "the operator discards this disk's own changes");
                empty(g.discard_changes(disk))
            }
            "xen-set-replication" => {
                args.only(&["enable", "primary", "failover"])?;
                let enable = args.bool("enable")?;
                let primary = args.bool("primary")?;
                let failover = args.opt_bool("failover")?;
                if enable {
                    if failover.is_some() {
                        return Err(QmpError::generic(
                            "Parameter 'failover' is only for stopping replication",
                        ));
                    }
                    let mode = if primary {
                        Mode::Primary
                    } else {
                        Mode::Secondary
                    };
                    empty(g.start(mode).await)
                } else {
                    let failover = failover.unwrap_or(false);
                    let req = StopRequest {
                        failover,
                        qemu: true,
                        force: false,
                    };
                    match g.stop(req).await {
                        // Not a usable copy: never swallowed, a failover would lose data.
                        Err(e @ ControlError::NotUsable(_)) => empty(Err(e)),
                        // QEMU discards stop errors when failing over.
                        Err(_) if failover => Ok(json!({})),
                        r => empty(r.map(|_| ())),
                    }
                }
            }
            "query-xen-replication-status" => {
                args.only(&[])?;
                Ok(match g.get_error() {
                    Ok(()) => json!({"error": false}),
                    Err(desc) => json!({"error": true, "desc": desc.to_string()}),
                })
            }
            "xen-colo-do-checkpoint" => {
                args.only(&[])?;
                let req = CheckpointRequest {
                    qemu: true,
                    ..Default::default()
                };
                empty(g.checkpoint(req).await.map(|_| ()))
            }
            _ => Err(QmpError::not_found(name)),
        }
    }

    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }
}

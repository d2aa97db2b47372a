//! The control socket: QMP commands (ours and QEMU's COLO ones) mapped onto a replication
//! group, whichever role the daemon plays.
//!
//! | command | effect |
//! |---|---|
//! | `query-replication` | status of every disk |
//! | `replication-start` / `-checkpoint` / `-failover` / `-stop` | our clear names |
//! | `xen-set-replication {enable, primary, failover?}` | QEMU: start or stop all |
//! | `query-xen-replication-status` | QEMU: `{error, desc?}` |
//! | `xen-colo-do-checkpoint` | QEMU: checkpoint all |
//! | `x-colo-lost-heartbeat` | QEMU: fail over |

use std::sync::Arc;

use async_trait::async_trait;
use nbd::addr::SocketAddr;
use qmp::{Args, Handler, QmpError, QmpServer};
use replication::Mode;
use serde_json::{Value, json};

/// Options every daemon has.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// The QMP-compatible control socket: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "ADDR", required = true)]
    pub control: Option<SocketAddr>,

    /// Start replication at once (otherwise send replication-start).
    #[arg(long)]
    pub start: bool,

    /// Prometheus metrics endpoint: tcp:HOST:PORT (or unix:PATH).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

/// Where a group raises QMP events: the control server, once it exists (the group is built
/// first, because the server dispatches to it).
#[derive(Default)]
pub struct Events(parking_lot::Mutex<Option<Arc<QmpServer>>>);

impl Events {
    pub fn attach(&self, server: Arc<QmpServer>) {
        *self.0.lock() = Some(server);
    }

    /// The server, for tasks that raise events later on their own.
    pub fn server(&self) -> Option<Arc<QmpServer>> {
        self.0.lock().clone()
    }

    pub fn emit(&self, name: &str, data: Value) {
        if let Some(s) = self.0.lock().as_ref() {
            s.emit(name, data);
        }
    }
}

/// What a checkpoint command asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckpointRequest {
    /// Override a sticky error (never a down link, dirty ranges or an epoch mismatch).
    pub force: bool,
    /// The secondary epoch a coordinated checkpoint drained for: refused if it is not the
    /// current one.
    pub epoch: Option<u64>,
    /// Asked through QEMU's command: answer as QEMU does where QEMU has an answer.
    pub qemu: bool,
}

/// What a stop command asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopRequest {
    /// Fail over (merge the overlays) instead of discarding them.
    pub failover: bool,
    /// Asked through QEMU's command: answer as QEMU does where QEMU has an answer.
    pub qemu: bool,
}

/// What a daemon's disks do together. Errors are the texts the client sees.
#[async_trait]
pub trait Group: Send + Sync + 'static {
    fn role(&self) -> &'static str;
    /// All disks or none.
    async fn start(&self, mode: Mode) -> Result<(), String>;
    /// All disks or none; the reply describes what was done and how long it took.
    async fn checkpoint(&self, req: CheckpointRequest) -> Result<Value, String>;
    /// The first error of any disk (QEMU's texts).
    fn get_error(&self) -> Result<(), String>;
    /// The reply says what happened (`{}`, or a note when there was nothing to do).
    async fn stop(&self, req: StopRequest) -> Result<Value, String>;
    /// `query-replication`.
    fn status(&self) -> Value;
}

/// Dispatches QMP commands to a [`Group`].
pub struct Control<G: Group> {
    pub group: Arc<G>,
}

const COMMANDS: &[&str] = &[
    "query-replication",
    "replication-start",
    "replication-checkpoint",
    "replication-failover",
    "replication-stop",
    "xen-set-replication",
    "query-xen-replication-status",
    "xen-colo-do-checkpoint",
    "x-colo-lost-heartbeat",
];

fn own_mode<G: Group>(g: &G) -> Mode {
    if g.role() == "primary" {
        Mode::Primary
    } else {
        Mode::Secondary
    }
}

#[async_trait]
impl<G: Group> Handler for Control<G> {
    async fn execute(&self, name: &str, args: Args) -> Result<Value, QmpError> {
        let g = &self.group;
        let r = match name {
            "query-replication" => {
                args.only(&[])?;
                Ok(g.status())
            }
            "replication-start" => {
                args.only(&[])?;
                g.start(own_mode(g.as_ref())).await.map(|()| json!({}))
            }
            "replication-checkpoint" => {
                args.only(&["force", "epoch"])?;
                let req = CheckpointRequest {
                    force: args.opt_bool("force")?.unwrap_or(false),
                    epoch: args.opt_u64("epoch")?,
                    qemu: false,
                };
                g.checkpoint(req).await
            }
            "replication-failover" | "x-colo-lost-heartbeat" => {
                args.only(&[])?;
                let req = StopRequest {
                    failover: true,
                    qemu: name == "x-colo-lost-heartbeat",
                };
                g.stop(req).await
            }
            "replication-stop" => {
                args.only(&[])?;
                let req = StopRequest {
                    failover: false,
                    qemu: false,
                };
                g.stop(req).await
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
                    g.start(mode).await.map(|()| json!({}))
                } else {
                    let failover = failover.unwrap_or(false);
                    let req = StopRequest {
                        failover,
                        qemu: true,
                    };
                    match g.stop(req).await {
                        // QEMU discards stop errors when failing over.
                        Err(_) if failover => Ok(json!({})),
                        r => r.map(|_| json!({})),
                    }
                }
            }
            "query-xen-replication-status" => {
                args.only(&[])?;
                Ok(match g.get_error() {
                    Ok(()) => json!({"error": false}),
                    Err(desc) => json!({"error": true, "desc": desc}),
                })
            }
            "xen-colo-do-checkpoint" => {
                args.only(&[])?;
                let req = CheckpointRequest {
                    qemu: true,
                    ..Default::default()
                };
                g.checkpoint(req).await.map(|_| json!({}))
            }
            _ => return Err(QmpError::not_found(name)),
        };
        r.map_err(QmpError::generic)
    }

    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }
}

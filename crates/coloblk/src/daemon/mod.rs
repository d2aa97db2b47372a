//! The daemons (`serve`, `primary`, `secondary`) and the one start-up sequence they share.
//!
//! ```text
//!   options checked (clap, then unique names) -> metrics recorder -> disks opened (the role)
//!     -> NBD listeners bound -> --start -> control socket + events -> metrics endpoint
//!     -> SIGTERM/SIGINT -> servers stop, finish their requests, flush -> the role's last words
//! ```
//!
//! The control socket comes after the listeners and `--start`: once it answers, the daemon is
//! ready (scripts and tests wait for it), and a primary connecting to a secondary whose
//! control socket answers finds the replica export listening.

mod link;
pub mod primary;
mod promote;
pub mod secondary;
pub mod serve;
mod state;

mod listen;
mod metrics;
pub mod security;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use blockdev::IoPool;
use coloblk::export_addr::{self, ExportAddr};
use nbd::addr::SocketAddr;
use nbd::server::{Export, ExportSet, Server, TlsPolicy};
use qmp::QmpServer;
use tracing::info;
use vhost_blk::VhostUserExport;

use crate::control::{Control, Group};

/// Options every replicating daemon has.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// The QMP-compatible control socket: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "ADDR", required = true)]
    pub control: Option<SocketAddr>,

    /// Start replication at once (otherwise send replication-start).
    #[arg(long)]
    pub start: bool,

    /// Prometheus metrics endpoint: tcp:HOST:PORT (or unix:PATH). Plain HTTP: off loopback
    /// only with --insecure.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    #[command(flatten)]
    pub security: security::SecurityArgs,
}

/// One NBD server of a daemon and where it listens.
pub struct Endpoint {
    /// Who connects, for messages ("the VM", "the primary").
    pub who: &'static str,
    /// Where.
    pub addr: SocketAddr,
    /// The server.
    pub server: Arc<Server>,
    /// Whether a failed final flush fails the shutdown (not for an export fenced on purpose).
    pub flush_matters: Box<dyn Fn() -> bool + Send + Sync>,
    /// TLS is required here even on a unix socket (the replica export: only an authenticated
    /// primary may write).
    pub tls_always: bool,
}

impl Endpoint {
    /// An endpoint whose final flush always matters.
    pub fn new(who: &'static str, addr: SocketAddr, server: Arc<Server>) -> Self {
        Endpoint {
            who,
            addr,
            server,
            flush_matters: Box::new(|| true),
            tls_always: false,
        }
    }
}

/// A vhost-user-blk export of a daemon: one disk on one socket, the same device object the
/// NBD server hands out (so replication and failover see its writes alike).
pub struct VhostEndpoint {
    /// Who connects, for messages.
    pub who: &'static str,
    /// The socket.
    pub path: PathBuf,
    /// The disk.
    pub export: Arc<Export>,
}

/// The listeners of `addrs` for `who`: the NBD ones share `server` (which serves `exports`),
/// each vhost-user one serves its disk of `exports`.
pub fn export_endpoints(
    who: &'static str,
    addrs: &[ExportAddr],
    exports: &ExportSet,
    server: Arc<Server>,
) -> anyhow::Result<(Vec<Endpoint>, Vec<VhostEndpoint>)> {
    let all = exports.list();
    let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
    export_addr::check(addrs, &names).map_err(coloblk::UsageError)?;
    let (mut nbd, mut vhost) = (Vec::new(), Vec::new());
    for a in addrs {
        match a {
            ExportAddr::Nbd(addr) => nbd.push(Endpoint::new(who, addr.clone(), server.clone())),
            ExportAddr::VhostUser { path, export } => {
                let name = export_addr::vhost_disk(export.as_deref(), &names)
                    .map_err(|e| coloblk::UsageError(format!("{a}: {e}")))?;
                let export = exports.get(name).context("a checked disk name")?;
                vhost.push(VhostEndpoint {
                    who,
                    path: path.clone(),
                    export,
                });
            }
        }
    }
    Ok((nbd, vhost))
}

/// What a daemon opened: its export endpoints and, for a replicating daemon, its group.
pub struct Plan {
    /// The process's name in the QMP greeting ("coloblk primary").
    pub name: &'static str,
    /// The NBD servers.
    pub endpoints: Vec<Endpoint>,
    /// The vhost-user-blk exports.
    pub vhost: Vec<VhostEndpoint>,
    /// The replication group and the daemon options (none for `serve`).
    pub group: Option<(Arc<dyn Group>, DaemonArgs)>,
}

/// Runs a daemon: `open` opens its disks and builds its servers; everything around it is the
/// same for every daemon, in the order of the module docs.
pub async fn run<F>(
    metrics_addr: Option<&SocketAddr>,
    security: &security::SecurityArgs,
    open: F,
) -> anyhow::Result<ExitCode>
where
    F: AsyncFnOnce(&IoPool) -> anyhow::Result<Plan>,
{
    let sec = security::Security::install(security)?;
    if let Some(addr) = metrics_addr {
        sec.check_metrics(addr)?;
    }
    if let Err(e) = net::raise_fd_limit() {
        tracing::warn!("cannot raise the descriptor limit: {e}");
    }
    let metrics_handle = metrics_addr.map(|_| metrics::install()).transpose()?;
    let pool = IoPool::default();
    let plan = open(&pool).await?;
    let mut bound = Vec::new();
    for e in &plan.endpoints {
        let tls = sec.nbd_policy(&e.addr, e.who, e.tls_always)?;
        let l = sec
            .bind(&e.addr)
            .await
            .with_context(|| format!("cannot listen on {} for {}", e.addr, e.who))?;
        let mode = match &tls {
            TlsPolicy::Off => "plain",
            TlsPolicy::Allowed(_) => "TLS allowed",
            TlsPolicy::Required(_) => "TLS required",
        };
        info!(addr = %e.addr, tls = mode, "listening for {}", e.who);
        bound.push((l, tls));
    }
    let mut vhost_bound = Vec::new();
    for v in &plan.vhost {
        let addr = SocketAddr::Unix(v.path.clone());
        let l = sec.bind(&addr).await.with_context(|| {
            format!(
                "cannot listen on vhost-user:{} for {}",
                v.path.display(),
                v.who
            )
        })?;
        info!(path = %v.path.display(), disk = %v.export.name, "vhost-user listening for {}", v.who);
        vhost_bound.push(l);
    }
    if let Some((group, args)) = &plan.group {
        if args.start {
            group
                .start(group.role().mode())
                .await
                .map_err(|e| anyhow::anyhow!("cannot start replication: {e}"))?;
        }
        let qmp = QmpServer::new(
            Arc::new(Control {
                group: group.clone(),
            }),
            plan.name,
        );
        group.attach(qmp.clone());
        for (disk, rx) in group.events() {
            crate::control::forward_events(disk, rx, qmp.clone());
        }
        let control = args.control.as_ref().context("--control is required")?;
        listen::serve(control, qmp, &sec).await?;
        if let (Some(addr), Some(handle)) = (metrics_addr, metrics_handle) {
            let g = group.clone();
            metrics::serve(addr, handle, Arc::new(move || g.refresh_metrics())).await?;
        }
    }
    let mut serving = tokio::task::JoinSet::new();
    for (e, (l, tls)) in plan.endpoints.iter().zip(bound) {
        let server = e.server.clone();
        serving.spawn(async move { server.serve_with(l, tls).await });
    }
    let mut vhost = Vec::new();
    for (v, l) in plan.vhost.iter().zip(vhost_bound) {
        let export = start_vhost(v, &l)?;
        // The listener stays: dropping it removes the socket file at exit.
        vhost.push((export, l));
    }
    wait_for_signal().await?;
    info!("shutting down: finishing requests, flushing");
    for e in &plan.endpoints {
        e.server.shutdown();
    }
    while let Some(r) = serving.join_next().await {
        r.context("listener task failed")?
            .context("listener failed")?;
    }
    // Every server is flushed whatever another's outcome.
    let mut failed = None;
    for e in &plan.endpoints {
        if let Err(err) = e.server.finish().await {
            if (e.flush_matters)() {
                failed.get_or_insert(anyhow::anyhow!(
                    "final flush of the disks {} uses failed: {err}",
                    e.who
                ));
            } else {
                info!("export for {} after it was fenced: {err}", e.who);
            }
        }
    }
    for (export, listener) in vhost {
        let path = export.path().display().to_string();
        if let Err(err) = export.stop().await {
            failed.get_or_insert(anyhow::anyhow!(
                "final flush of the disk behind vhost-user:{path} failed: {err}"
            ));
        }
        drop(listener);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some((group, _)) = &plan.group {
        group.shutdown().await;
    }
    info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// Starts serving a bound vhost-user socket: the library takes a blocking std listener, so it
/// gets a duplicate of the bound socket's descriptor.
fn start_vhost(v: &VhostEndpoint, l: &net::Listener) -> anyhow::Result<VhostUserExport> {
    use std::os::fd::AsFd;
    let net::Listener::Unix(unix, _) = l else {
        anyhow::bail!("vhost-user:{} is not a unix socket", v.path.display());
    };
    let fd = unix
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("vhost-user:{}", v.path.display()))?;
    Ok(VhostUserExport::start(
        std::os::unix::net::UnixListener::from(fd),
        v.path.clone(),
        &v.export.name,
        v.export.dev.clone(),
        v.export.read_only,
        tokio::runtime::Handle::current(),
    )?)
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

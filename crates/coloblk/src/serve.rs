//! `coloblk serve`: a qemu-nbd-like server for one or more images.

use anyhow::Context;
use blockdev::IoPool;
use clap::Args;
use nbd::addr::SocketAddr;
use nbd::server::{Export, ExportSet, Listener, Server, ServerConfig};
use tracing::info;

use crate::disk_spec::DiskSpec;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    coloblk serve --export disk=/var/lib/vm/disk.raw --listen unix:/run/disk.sock\n  \
    coloblk serve --export a=a.qcow2,format=qcow2 --export b=b.raw,readonly --listen tcp:127.0.0.1:10809\n\n\
    Clients reach an export as nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME.\n\
    SIGTERM or SIGINT: stop accepting, finish in-flight requests, flush, exit 0.")]
pub struct ServeArgs {
    /// An export: NAME=PATH[,format=raw|qcow2][,readonly][,direct]. Repeat for several.
    /// `readonly` refuses writes with EPERM; `direct` opens a raw file with O_DIRECT.
    #[arg(long = "export", value_name = "SPEC", required = true)]
    exports: Vec<DiskSpec>,

    /// Where to listen: unix:PATH or tcp:HOST:PORT. Repeat to listen on several.
    #[arg(long = "listen", value_name = "ADDR", required = true)]
    listen: Vec<SocketAddr>,

    /// Blocking disk calls run at most this many at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    io_threads: u16,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<std::process::ExitCode> {
    let pool = IoPool::new(args.io_threads as usize);
    let exports = ExportSet::new();
    for spec in &args.exports {
        spec.no_extra()?;
        if exports.get(&spec.name).is_some_and(|e| e.name == spec.name) {
            anyhow::bail!("export '{}' is given twice", spec.name);
        }
        let dev = spec.open(&pool)?;
        info!(export = %spec.name, path = %spec.path.display(), len = dev.len(), "export ready");
        let mut export = Export::new(spec.name.clone(), dev);
        export.read_only = spec.read_only;
        exports.add(export);
    }
    let server = Server::new(exports, ServerConfig::default());
    let mut listeners = Vec::new();
    for addr in &args.listen {
        let l = Listener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        info!(%addr, "listening");
        listeners.push(l);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let server = server.clone();
        tasks.spawn(async move { server.serve(l).await });
    }
    wait_for_signal().await?;
    info!("shutting down: finishing in-flight requests");
    server.shutdown();
    while let Some(r) = tasks.join_next().await {
        r.context("listener task failed")?
            .context("listener failed")?;
    }
    server.finish().await.context("final flush failed")?;
    info!("stopped cleanly");
    Ok(std::process::ExitCode::SUCCESS)
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

//! `coloblk serve`: a qemu-nbd-like server for one or more images.

use blockdev::IoPool;
use clap::Args;
use nbd::addr::SocketAddr;
use nbd::server::{Export, ExportSet, Server, ServerConfig};
use tracing::info;

use super::{Endpoint, Plan};
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
    #[arg(long = "export", value_name = "SPEC", required = true,
          value_parser = crate::disk_spec::export)]
    exports: Vec<DiskSpec>,

    /// Where to listen: unix:PATH or tcp:HOST:PORT. Repeat to listen on several.
    #[arg(long = "listen", value_name = "ADDR", required = true)]
    listen: Vec<SocketAddr>,

    #[command(flatten)]
    security: super::security::SecurityArgs,

    /// Blocking disk calls run at most this many at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    io_threads: u16,
}

/// Runs `coloblk serve` until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> anyhow::Result<std::process::ExitCode> {
    crate::disk_spec::unique_names(&args.exports)?;
    super::run(None, &args.security, async |_: &IoPool| {
        // Its own pool: `--io-threads` sizes it.
        let pool = IoPool::new(args.io_threads as usize);
        let exports = ExportSet::new();
        for spec in &args.exports {
            let dev = spec.open(&pool)?;
            info!(export = %spec.name, path = %spec.path.display(), len = dev.len(), "export ready");
            let mut export = Export::new(spec.name.clone(), dev);
            export.read_only = spec.read_only;
            exports.add(export);
        }
        let server = Server::new(exports, ServerConfig::default());
        let endpoints = args
            .listen
            .iter()
            .map(|addr| Endpoint::new("clients", addr.clone(), server.clone()))
            .collect();
        Ok(Plan {
            name: "coloblk serve",
            endpoints,
            group: None,
        })
    })
    .await
}

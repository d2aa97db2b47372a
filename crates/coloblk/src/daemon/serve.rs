//! `coloblk serve`: a qemu-nbd-like server for one or more images.

use blockdev::IoPool;
use clap::Args;
use coloblk::export_addr::ExportAddr;
use nbd::server::{Export, ExportSet, Server, ServerConfig};
use tracing::info;

use super::Plan;
use crate::disk_spec::DiskSpec;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    coloblk serve --export disk=/var/lib/vm/disk.raw --listen unix:/run/disk.sock\n  \
    coloblk serve --export a=a.qcow2,format=qcow2 --export b=b.raw,readonly --listen tcp:127.0.0.1:10809\n  \
    coloblk serve --export vm0=vm0.raw --listen vhost-user:/run/vm0.vhost\n\n\
    Clients reach an export as nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME.\n\
    QEMU attaches a vhost-user socket with (guest memory must be shared):\n  \
    -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem\n  \
    -chardev socket,id=c0,path=/run/vm0.vhost -device vhost-user-blk-pci,chardev=c0,num-queues=2\n\
    SIGTERM or SIGINT: stop accepting, finish in-flight requests, flush, exit 0.")]
pub struct ServeArgs {
    /// An export: NAME=PATH[,format=raw|qcow2][,readonly][,direct]. Repeat for several.
    /// `readonly` refuses writes with EPERM; `direct` opens a raw file with O_DIRECT.
    #[arg(long = "export", value_name = "SPEC", required = true,
          value_parser = crate::disk_spec::export)]
    exports: Vec<DiskSpec>,

    /// Where to listen: unix:PATH or tcp:HOST:PORT (NBD, every export), or
    /// vhost-user:PATH[,export=NAME] (vhost-user-blk for QEMU, one export: name it when there
    /// are several). Repeat to listen on several.
    #[arg(long = "listen", value_name = "ADDR", required = true)]
    listen: Vec<ExportAddr>,

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
        let server = Server::new(exports.clone(), ServerConfig::default());
        let (endpoints, vhost) =
            super::export_endpoints("clients", &args.listen, &exports, server)?;
        Ok(Plan {
            name: "coloblk serve",
            endpoints,
            vhost,
            group: None,
        })
    })
    .await
}

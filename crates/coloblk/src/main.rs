//! `coloblk`: COLO-style block replication for fault-tolerant virtual machines.
//!
//! One binary with subcommands; the engine lives in the library crates so a VMM can embed it.

#![forbid(unsafe_code)]

mod cli;
mod control;
mod daemon;

use std::process::ExitCode;

// Operator-input parsers live in the library target, where the fuzz targets reach them.
use coloblk::{config, disk_spec};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "coloblk",
    version,
    about = "COLO-style block replication for fault-tolerant virtual machines",
    long_about = "COLO-style block replication for fault-tolerant virtual machines.\n\n\
        A primary serves a VM's disk over NBD and forwards every write to a secondary; the \
        secondary keeps the primary's image current while a speculative VM runs on an overlay \
        view that checkpoints empty and failover merges.\n\n\
        Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to change their level.\n\n\
        Every daemon option can also come from a TOML file: --config FILE (keys are the long \
        option names; command-line options override the file's).",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve images over NBD (like qemu-nbd, several exports at once).
    Serve(daemon::serve::ServeArgs),
    /// Run the primary: serve the VM's disks and forward every write to the secondary.
    Primary(daemon::primary::PrimaryArgs),
    /// Run the secondary: apply the primary's writes (copy-before-write) and serve the
    /// speculative VM its overlay view; checkpoint and fail over on command.
    Secondary(daemon::secondary::SecondaryArgs),
    /// Talk to a running primary or secondary: status, start, checkpoint, failover, stop.
    Ctl(cli::ctl::CtlArgs),
    /// Run the whole story on this machine: a secondary and a primary as real processes, a
    /// workload, a checkpoint, a killed primary, a failover, with checks and timings.
    Demo(cli::demo::DemoArgs),
}

fn main() -> ExitCode {
    let args = match config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coloblk: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => daemon::serve::run(args).await,
            Command::Primary(args) => daemon::primary::run(args).await,
            Command::Secondary(args) => daemon::secondary::run(args).await,
            Command::Ctl(args) => Ok(ExitCode::from(cli::ctl::run(args).await)),
            Command::Demo(args) => cli::demo::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coloblk: {}", coloblk::error_chain(e.as_ref()));
            match e.downcast_ref::<coloblk::UsageError>() {
                Some(_) => ExitCode::from(2),
                None => ExitCode::FAILURE,
            }
        }
    }
}

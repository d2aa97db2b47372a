//! `coloblk ctl`: the human front end of the control socket.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use nbd::addr::SocketAddr;
use qmp::{QmpClient, QmpClientError};
use serde_json::{Value, json};

use crate::control::status::{CheckpointReply, PrimaryDisk, Status, StopReply};

/// A control session.
type Client = QmpClient<net::tls::ClientStream>;

/// Exit codes scripts can rely on.
pub mod exit {
    /// The command did what was asked.
    pub const OK: u8 = 0;
    /// The daemon refused or the operation failed (the message says why).
    pub const FAILED: u8 = 1;
    // 2: bad command line (clap's own exit code for usage errors).
    /// The control socket could not be reached.
    pub const UNREACHABLE: u8 = 3;
}

#[derive(Args, Debug)]
#[command(
    after_help = "Exit codes: 0 done, 1 refused or failed (the message says why), \
    2 bad command line, 3 control socket unreachable (no connection, or no QMP handshake \
    within --timeout).\n\n\
    Examples:\n  coloblk ctl --control unix:/run/coloblk/secondary.qmp status\n  \
    coloblk ctl --control tcp:secondary:4445 --tls-creds /etc/coloblk/tls failover"
)]
pub struct CtlArgs {
    /// The daemon's control socket: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    control: SocketAddr,

    /// TLS credentials (QEMU's tls-creds-x509 layout; client-cert.pem and client-key.pem are
    /// presented): a tcp: control socket is then spoken to over TLS, its certificate checked
    /// against the host. A unix socket stays plain (its file mode protects it).
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<std::path::PathBuf>,

    /// How long to wait for the socket to connect and greet (exit code 3 after that), for
    /// each status reply, and with `wait-protected` for the protection itself.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds)]
    timeout: Duration,

    /// How long to wait for the reply to start, checkpoint, failover or stop (a primary's
    /// checkpoint drains its queue and then checkpoints its secondary, which takes a while).
    #[arg(long, value_name = "SECONDS", default_value = "120", value_parser = seconds)]
    command_timeout: Duration,

    /// Print the daemon's JSON reply instead of a table.
    #[arg(long)]
    json: bool,

    /// With `promote`: a disk's new secondary, NAME=URI[,sync=checksum|full|none] (its replica
    /// export). Repeat for every disk.
    #[arg(long = "replica", value_name = "NAME=URI")]
    replicas: Vec<String>,

    /// With `promote`: the new secondary's control socket (checksum sync, coordinated
    /// checkpoints).
    #[arg(long, value_name = "ADDR")]
    peer_control: Option<SocketAddr>,

    /// With `promote`: async or sync forwarding from now on.
    #[arg(long, value_name = "MODE", value_parser = ["async", "sync"])]
    mode: Option<String>,

    /// With `status`: show it again every second, with a progress bar per syncing disk, until
    /// interrupted.
    #[arg(long)]
    watch: bool,

    /// With `checkpoint`: go on although forwarding failed earlier (a sticky error); never
    /// overrides a down link, ranges not yet on the secondary, or an epoch mismatch. With
    /// `failover`: fail over although a primary's sync had not finished (the disk is then
    /// not known to be a usable copy).
    #[arg(long)]
    force: bool,

    /// With `discard-changes`: the disk whose own changes are discarded.
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,

    #[arg(value_enum)]
    action: Action,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Action {
    /// Show each disk's stage, errors, queue, dirty bytes, overlays and last checkpoint.
    Status,
    /// Start replication.
    Start,
    /// Checkpoint (on a primary with --peer-control: drain, then checkpoint the secondary).
    Checkpoint,
    /// Fail over (a secondary merges its overlays and becomes a standalone disk; a primary
    /// stops forwarding). Shows the merge progress and waits for it.
    Failover,
    /// Stop replication without failover (a secondary discards its overlays).
    Stop,
    /// Compare every disk of a primary with its secondary by digests (DRBD's online verify);
    /// what differs is marked dirty and resynced. Prints the bytes compared and found
    /// different.
    Verify,
    /// After a failover: make this secondary the primary of its disks, forwarding to a new
    /// secondary (--replica for each disk) after a first sync; the VM's connections stay.
    Promote,
    /// Wait until every disk of a primary is protected (running, synced, link up): what an
    /// orchestrator does before its first checkpoint. Exit 1 after --timeout, saying how far
    /// each disk got.
    WaitProtected,
    /// On a secondary after a split brain (both sides served as a primary after their last
    /// shared generation): discard this side's own changes to --disk; the primary's next
    /// connection overwrites them with a checksum sync.
    DiscardChanges,
}

/// A positive, finite number of seconds.
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("must be a positive number of seconds, not '{s}'"));
    }
    Duration::try_from_secs_f64(v).map_err(|_| format!("'{s}' seconds is too long"))
}

pub async fn run(args: CtlArgs) -> u8 {
    let addr = &args.control;
    let tls = match args.tls_creds.as_deref().map(tls_client).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("coloblk ctl: --tls-creds: {e}");
            return exit::FAILED;
        }
    };
    let connect = net::tls::connect(addr, tls.as_ref());
    let mut client = match QmpClient::connect(addr, connect, args.timeout).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coloblk ctl: {}", unreachable(addr, e));
            return exit::UNREACHABLE;
        }
    };
    match act(&mut client, &args).await {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("coloblk ctl: {}", coloblk::error_chain(e.as_ref()));
            exit::FAILED
        }
    }
}

fn tls_client(dir: &std::path::Path) -> Result<net::TlsClient, net::TlsError> {
    net::TlsClient::new(&net::TlsCreds::load(dir)?, net::Authz::default())
}

/// Why the session could not be opened, in words for the operator.
fn unreachable(addr: &SocketAddr, e: QmpClientError) -> String {
    match e {
        // These name the address and the step already.
        QmpClientError::Connect { .. } => e.to_string(),
        QmpClientError::HandshakeTimedOut { .. } => {
            format!("{e}: the daemon is not answering (--timeout sets how long to wait)")
        }
        QmpClientError::Qmp(q) => format!("{addr} refused qmp_capabilities: {}", q.desc),
        QmpClientError::Io(io) => {
            format!("{addr} dropped the connection during the handshake: {io}")
        }
        other => format!("{addr} does not speak QMP: {other}"),
    }
}

/// Runs one command, bounded by `t`; the daemon's refusal comes out as its `desc`, verbatim.
async fn call(c: &mut Client, command: &str, args: Value, t: Duration) -> anyhow::Result<Value> {
    match c.execute_timeout(command, args, t).await {
        Ok(v) => Ok(v),
        Err(QmpClientError::Qmp(q)) => Err(anyhow::anyhow!("{}", q.desc)),
        Err(QmpClientError::TimedOut(t)) if command == "query-replication" => {
            Err(anyhow::anyhow!("no reply to {command} within {t:?}"))
        }
        Err(QmpClientError::TimedOut(t)) => Err(anyhow::anyhow!(
            "no reply to {command} within {t:?}: the daemon may still complete it \
             (`coloblk ctl status` shows where it is; --command-timeout sets how long to wait)"
        )),
        Err(e) => Err(anyhow::anyhow!("{command}: {e}")),
    }
}

async fn act(c: &mut Client, args: &CtlArgs) -> anyhow::Result<()> {
    let (command, cmd_args) = match args.action {
        Action::WaitProtected => return wait_protected(c, args.timeout, args.json).await,
        Action::Status if args.watch && !args.json => return watch(c, args.timeout).await,
        Action::Status => {
            let status = call(c, "query-replication", json!({}), args.timeout).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let status: Status = serde_json::from_value(status)
                    .context("the daemon's status is not one this ctl knows")?;
                print!("{}", render_status(&status));
            }
            return Ok(());
        }
        Action::Start => ("replication-start", json!({})),
        Action::Checkpoint => ("replication-checkpoint", json!({"force": args.force})),
        Action::Failover => ("replication-failover", json!({"force": args.force})),
        Action::Stop => ("replication-stop", json!({})),
        Action::Verify => ("replication-verify", json!({})),
        Action::Promote => ("replication-promote", promote_args(args)?),
        Action::DiscardChanges => {
            let disk = args
                .disk
                .clone()
                .context("discard-changes needs --disk NAME")?;
            ("replication-discard-changes", json!({ "disk": disk }))
        }
    };
    let reply = call(c, command, cmd_args, args.command_timeout).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    }
    if matches!(args.action, Action::Failover | Action::Stop) {
        let stop: StopReply = serde_json::from_value(reply.clone()).unwrap_or_default();
        if let Some(note) = stop.note {
            if !args.json {
                println!("{note}");
            }
            return Ok(());
        }
    }
    match args.action {
        Action::Failover => follow_failover(c, args.json, args.timeout).await,
        Action::Verify if !args.json => {
            for d in reply["disks"].as_array().into_iter().flatten() {
                println!(
                    "disk '{}': {} compared, {} different (being resynced)",
                    d["name"].as_str().unwrap_or("?"),
                    bytes(d["compared-bytes"].as_u64().unwrap_or(0)),
                    bytes(d["differing-bytes"].as_u64().unwrap_or(0)),
                );
            }
            Ok(())
        }
        Action::Checkpoint if !args.json => {
            let reply: CheckpointReply = serde_json::from_value(reply).unwrap_or_default();
            let mut line = "checkpoint done".to_string();
            if let Some(d) = reply.drain_ms {
                line += &format!(": drain {d:.2} ms");
            }
            if let Some(Some(s)) = reply.secondary_ms {
                line += &format!(", secondary {s:.2} ms");
            }
            if let Some(t) = reply.duration_ms {
                line += &format!(": {t:.2} ms");
            }
            if reply.forced {
                line += " (forced past an earlier forwarding error)";
            }
            println!("{line}");
            Ok(())
        }
        _ => {
            if !args.json {
                println!("{command}: done");
            }
            Ok(())
        }
    }
}

/// `replication-promote`'s arguments from `--replica`, `--peer-control` and `--mode`.
fn promote_args(args: &CtlArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(
        !args.replicas.is_empty(),
        "promote needs --replica NAME=URI for every disk"
    );
    let mut replicas = Vec::new();
    for r in &args.replicas {
        let (name, rest) = r
            .split_once('=')
            .with_context(|| format!("'{r}' is not NAME=URI[,sync=checksum|full|none]"))?;
        let (uri, sync) = match rest.rsplit_once(",sync=") {
            Some((uri, sync)) => (uri, Some(sync)),
            None => (rest, None),
        };
        let mut one = json!({"disk": name, "uri": uri});
        if let Some(s) = sync {
            one["sync"] = json!(s);
        }
        replicas.push(one);
    }
    let mut v = json!({"replicas": replicas});
    if let Some(p) = &args.peer_control {
        v["peer-control"] = json!(p.to_string());
    }
    if let Some(m) = &args.mode {
        v["mode"] = json!(m);
    }
    Ok(v)
}

/// Polls a primary's status until every disk is protected, or `limit` has passed.
async fn wait_protected(c: &mut Client, limit: Duration, quiet: bool) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let st = call(c, "query-replication", json!({}), limit).await?;
        let Status::Primary(p) =
            serde_json::from_value(st).context("the daemon's status is not one this ctl knows")?
        else {
            anyhow::bail!("wait-protected asks a primary; this is a secondary");
        };
        if p.disks.iter().all(|d| d.protected) {
            if !quiet {
                println!("protected: every disk running, synced, link up");
            }
            return Ok(());
        }
        if start.elapsed() >= limit {
            let left: Vec<String> = p
                .disks
                .iter()
                .filter(|d| !d.protected)
                .map(|d| {
                    let why = d
                        .link_error
                        .clone()
                        .unwrap_or_else(|| format!("{} dirty", bytes(d.dirty_bytes)));
                    format!("disk '{}': {} ({why})", d.name, sync_state(d))
                })
                .collect();
            anyhow::bail!("not protected after {limit:?}: {}", left.join("; "));
        }
        // Woken by the daemon's next event (REPLICATION_PROTECTED among them), so the wait
        // ends when protection does, not at the next poll; a second at most between looks.
        let left = limit.saturating_sub(start.elapsed());
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), c.next_event()).await;
    }
}

/// `status --watch`: the table again every second, a bar under each syncing disk.
async fn watch(c: &mut Client, t: Duration) -> anyhow::Result<()> {
    loop {
        let st = call(c, "query-replication", json!({}), t).await?;
        let st: Status =
            serde_json::from_value(st).context("the daemon's status is not one this ctl knows")?;
        let mut screen = render_status(&st);
        if let Status::Primary(p) = &st {
            for d in p.disks.iter().filter(|d| d.resync.active) {
                screen += &format!(
                    "{}: {} {}/{}\n",
                    d.name,
                    bar(d.resync.done_bytes, d.resync.total_bytes, 40),
                    bytes(d.resync.done_bytes),
                    bytes(d.resync.total_bytes)
                );
            }
        }
        // Clear the screen and draw again from the top.
        print!("\x1b[2J\x1b[H{screen}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A text progress bar of `width` cells.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = match total {
        0 => width,
        t => (done.min(t) as u128 * width as u128 / t as u128) as usize,
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Polls the status and draws a progress bar until every disk has finished merging.
async fn follow_failover(c: &mut Client, quiet: bool, t: Duration) -> anyhow::Result<()> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "merging {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .context("progress template")?,
        );
        b
    };
    loop {
        let st = call(c, "query-replication", json!({}), t).await?;
        let disks = st["disks"].as_array().cloned().unwrap_or_default();
        let (mut done, mut total, mut finished, mut failed) = (0u64, 0u64, true, None);
        for d in &disks {
            let stage = d["stage"].as_str().unwrap_or("");
            done += d["failover"]["done-bytes"].as_u64().unwrap_or(0);
            total += d["failover"]["total-bytes"].as_u64().unwrap_or(0);
            match stage {
                "failover" => finished = false,
                "failover-failed" => {
                    failed = Some(format!(
                        "disk '{}': failover failed: {}",
                        d["name"].as_str().unwrap_or("?"),
                        d["error"].as_str().unwrap_or("unknown error")
                    ))
                }
                _ => {}
            }
        }
        bar.set_length(total);
        bar.set_position(done);
        if let Some(f) = failed {
            bar.abandon_with_message("failed");
            anyhow::bail!("{f} (run `coloblk ctl failover` again to retry)");
        }
        if finished {
            bar.finish_with_message("done");
            if !quiet {
                println!("failover done: the disks now serve their merged content");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn or_dash(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

/// Where a primary disk stands with its secondary: protected, syncing (how far), or not.
fn sync_state(d: &PrimaryDisk) -> String {
    let r = &d.resync;
    if d.protected {
        "protected".into()
    } else if r.active {
        format!("syncing {}%", r.done_bytes * 100 / r.total_bytes.max(1))
    } else if d.dirty_bytes > 0 {
        "unsynced".into()
    } else {
        "-".into()
    }
}

/// Lines of a table, columns padded to their widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

/// A table's header: DISK and STAGE, the role's columns, ERROR.
fn header(rest: &[&str]) -> Vec<String> {
    ["DISK", "STAGE"]
        .iter()
        .chain(rest)
        .chain(&["ERROR"])
        .map(|s| s.to_string())
        .collect()
}

/// A disk's row: its name and stage, then the role's columns.
fn row<const N: usize>(name: &str, stage: &str, rest: [String; N]) -> Vec<String> {
    [name.to_string(), stage.to_string()]
        .into_iter()
        .chain(rest)
        .collect()
}

fn ago(time_unix_ms: u64) -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|n| n.as_millis() as i64 - time_unix_ms as i64)
        .unwrap_or(0)
}

/// A readable table of `query-replication`.
pub fn render_status(st: &Status) -> String {
    let (head, rows, last) = match st {
        Status::Primary(p) => {
            let mut rows = vec![header(&["LINK", "SYNC", "QUEUE", "FORWARDED", "DIRTY"])];
            rows.extend(p.disks.iter().map(|d| {
                row(
                    &d.name,
                    &d.stage,
                    [
                        if d.link_up { "up" } else { "down" }.into(),
                        sync_state(d),
                        format!("{} req / {}", d.queue_requests, bytes(d.queue_bytes)),
                        bytes(d.forwarded_bytes),
                        bytes(d.dirty_bytes),
                        or_dash(&d.error),
                    ],
                )
            }));
            let last = p.last_checkpoint.map(|l| {
                let secondary = l
                    .secondary_ms
                    .map(|s| format!(", secondary {s:.2} ms"))
                    .unwrap_or_default();
                format!(
                    "last checkpoint: {} ms ago, drain {:.2} ms{secondary}",
                    ago(l.time_unix_ms),
                    l.drain_ms
                )
            });
            (format!("role: primary   mode: {}", p.mode), rows, last)
        }
        Status::Secondary(s) => {
            let mut rows = vec![header(&["ACTIVE", "HIDDEN", "CBW COPIES", "FAILOVER"])];
            rows.extend(s.disks.iter().map(|d| {
                let f = &d.failover;
                let mut progress = match f.total_bytes {
                    0 => "-".into(),
                    t => format!("{}%", f.done_bytes * 100 / t),
                };
                if f.resumed && d.stage == "failover" {
                    progress.push_str(" (resuming after a restart)");
                }
                row(
                    &d.name,
                    &d.stage,
                    [
                        bytes(d.active_bytes),
                        bytes(d.hidden_bytes),
                        d.cbw_copies.to_string(),
                        progress,
                        or_dash(&d.error),
                    ],
                )
            }));
            let last = s.last_checkpoint.map(|l| {
                format!(
                    "last checkpoint: {} ms ago, took {:.2} ms",
                    ago(l.time_unix_ms),
                    l.duration_ms
                )
            });
            ("role: secondary".to_string(), rows, last)
        }
    };
    let mut out = head + "\n" + &table(&rows);
    if let Some(l) = last {
        out += &l;
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_fills_in_proportion_and_never_overflows() {
        assert_eq!(bar(0, 100, 10), "[----------]");
        assert_eq!(bar(43, 100, 10), "[####------]");
        assert_eq!(bar(200, 100, 10), "[##########]");
        assert_eq!(bar(5, 0, 4), "[####]");
    }

    #[test]
    fn renders_a_primary_status_table() {
        let st = json!({"role": "primary", "mode": "async", "disks": [
            {"name": "vm0", "stage": "running", "link-up": true, "queue-requests": 3, "queue-bytes": 12288,
             "forwarded-bytes": 3221225472u64, "dirty-bytes": 0, "error": null, "protected": true},
            {"name": "vm1", "stage": "running", "link-up": true, "queue-requests": 0, "queue-bytes": 0,
             "forwarded-bytes": 0, "dirty-bytes": 3145728, "error": null, "protected": false,
             "resync": {"active": true, "done-bytes": 1048576, "total-bytes": 4194304}}
        ], "last-checkpoint": null});
        let text = render_status(&serde_json::from_value(st).unwrap());
        assert_eq!(
            text,
            "role: primary   mode: async\n\
             DISK  STAGE    LINK  SYNC         QUEUE             FORWARDED  DIRTY    ERROR\n\
             vm0   running  up    protected    3 req / 12.0 KiB  3.0 GiB    0 B      -\n\
             vm1   running  up    syncing 25%  0 req / 0 B       0 B        3.0 MiB  -\n"
        );
    }
}

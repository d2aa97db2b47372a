//! `coloblk demo`: the whole story on one machine, with real processes on loopback.
//!
//! 1. start a secondary and a primary (two `coloblk` processes) on fresh images;
//! 2. write a workload through the primary's export while the speculative VM writes to the
//!    secondary's top view;
//! 3. checkpoint (coordinated: primary drain, then secondary) and verify that the secondary
//!    disk equals the primary disk;
//! 4. write more on both sides, remember what the speculative view shows;
//! 5. kill -9 the primary, fail over the secondary, and verify that the secondary disk now
//!    equals what the speculative view showed just before;
//! 6. bring the old primary's disk back as a secondary, promote the failed-over side to
//!    primary (the VM's connection stays open), let it re-protect with a checksum sync,
//!    checkpoint, and verify that both disks are equal.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use blockdev::{BlockDev, WriteFlags};
use bytes::Bytes;
use clap::Args;
use nbd::addr::SocketAddr;
use nbd::client::{ClientConfig, NbdClient};
use qmp::QmpClient;
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of each disk, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    size_mib: u64,
    /// MiB the primary's VM writes in each phase.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    write_mib: u64,
    /// Keep the working directory (images, logs) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

/// A daemon process, killed on drop.
struct Daemon {
    name: &'static str,
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Report {
    start: Instant,
}

impl Report {
    fn step(&self, t: Instant, what: &str) {
        println!(
            "[{:>7.3} s] {what} ({:.0} ms)",
            self.start.elapsed().as_secs_f64(),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
}

fn spawn(name: &'static str, args: &[String], log: &Path) -> anyhow::Result<Daemon> {
    let exe = std::env::current_exe().context("cannot find the coloblk binary")?;
    let log_file = std::fs::File::create(log)?;
    let child = Command::new(exe)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start the {name}"))?;
    Ok(Daemon { name, child })
}

async fn wait_for(sock: &Path, d: &mut Daemon, log: &Path) -> anyhow::Result<()> {
    let t = Instant::now();
    while tokio::net::UnixStream::connect(sock).await.is_err() {
        if let Some(st) = d.child.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("the {} exited ({st}) before listening:\n{log}", d.name);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the {} did not start within 30 s",
            d.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn qmp(sock: &Path, cmd: &str, args: Value) -> anyhow::Result<Value> {
    let addr = SocketAddr::Unix(sock.to_path_buf());
    let mut c = QmpClient::connect(&addr, addr.connect(), Duration::from_secs(10)).await?;
    Ok(c.execute_timeout(cmd, args, Duration::from_secs(120))
        .await?)
}

/// Waits until the primary's every disk is protected (its initial sync done); returns the
/// first disk's status.
async fn wait_protected(sock: &Path) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let st = qmp(sock, "query-replication", json!({})).await?;
        let disks = st["disks"].as_array().cloned().unwrap_or_default();
        if !disks.is_empty() && disks.iter().all(|d| d["protected"] == true) {
            return Ok(disks[0].clone());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "the primary was not protected within 120 s: {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deterministic data for write `i` of a phase.
fn block(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// Writes `total` bytes in 4 KiB to 1 MiB pieces at pseudo-random offsets, 16 at a time.
async fn workload(dev: Arc<NbdClient>, seed: u64, total: u64, disk: u64) -> anyhow::Result<u64> {
    let mut tasks = tokio::task::JoinSet::new();
    let (mut written, mut i) = (0u64, 0u64);
    while written < total {
        let len = 4096u64 << ((seed + i) % 9);
        let off = ((seed.wrapping_mul(31) + i * 7919) % (disk / 4096)) * 4096;
        let off = off.min(disk - len);
        let dev = dev.clone();
        tasks.spawn(async move {
            dev.write(
                off,
                block(seed * 100_000 + i, len as usize),
                WriteFlags::default(),
            )
            .await
        });
        if tasks.len() >= 16 {
            tasks.join_next().await.expect("non-empty")??;
        }
        written += len;
        i += 1;
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(written)
}

/// Reads a whole export and hashes it.
async fn hash_export(dev: &NbdClient) -> anyhow::Result<u64> {
    let mut h = std::hash::DefaultHasher::new();
    let mut off = 0;
    while off < dev.len() {
        let n = (dev.len() - off).min(4 << 20);
        h.write(&dev.read(off, n as usize).await?);
        off += n;
    }
    Ok(h.finish())
}

fn hash_file(p: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        // Hash in the same 4 MiB pieces as hash_export so the two agree.
        let mut filled = n;
        while filled < buf.len() {
            let m = f.read(&mut buf[filled..])?;
            if m == 0 {
                break;
            }
            filled += m;
        }
        h.write(&buf[..filled]);
    }
}

async fn connect(sock: &Path, export: &str) -> anyhow::Result<Arc<NbdClient>> {
    Ok(Arc::new(
        NbdClient::connect(
            &SocketAddr::Unix(sock.to_path_buf()),
            export,
            ClientConfig::default(),
        )
        .await?,
    ))
}

/// A secondary over `disk` in `dir`, its sockets, log and buffer named with `tag`, listening.
async fn start_secondary(dir: &Path, disk: &str, tag: &str) -> anyhow::Result<Daemon> {
    let s = |n: &str| dir.join(format!("{tag}{n}")).display().to_string();
    let log = dir.join(format!("{tag}secondary.log"));
    let mut d = spawn(
        "secondary",
        &[
            "secondary".into(),
            "--disk".into(),
            format!("vm0={}", dir.join(disk).display()),
            "--replica-listen".into(),
            format!("unix:{}", s("replica.sock")),
            "--export-listen".into(),
            format!("unix:{}", s("top.sock")),
            "--control".into(),
            format!("unix:{}", s("secondary.qmp")),
            "--buffer-dir".into(),
            s("buffer"),
            "--start".into(),
        ],
        &log,
    )?;
    wait_for(&dir.join(format!("{tag}secondary.qmp")), &mut d, &log).await?;
    Ok(d)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    ensure!(args.size_mib >= 16, "--size-mib must be at least 16");
    let dir = tempfile::Builder::new().prefix("coloblk-demo.").tempdir()?;
    let d = dir.path().to_path_buf();
    let r = Report {
        start: Instant::now(),
    };
    let disk = args.size_mib << 20;
    let write = (args.write_mib << 20).min(disk);
    println!(
        "coloblk demo in {} ({} MiB disks, {} MiB written per phase)",
        d.display(),
        args.size_mib,
        args.write_mib
    );
    let p = |n: &str| -> PathBuf { d.join(n) };
    let s = |n: &str| -> String { d.join(n).display().to_string() };

    let t = Instant::now();
    for img in ["primary.raw", "secondary.raw"] {
        std::fs::File::create(p(img))?.set_len(disk)?;
    }
    let secondary = start_secondary(&d, "secondary.raw", "").await?;
    let mut primary = spawn(
        "primary",
        &[
            "primary".into(),
            "--disk".into(),
            format!(
                "vm0={},replica=nbd+unix:///vm0?socket={}",
                s("primary.raw"),
                s("replica.sock")
            ),
            "--export-listen".into(),
            format!("unix:{}", s("primary.sock")),
            "--control".into(),
            format!("unix:{}", s("primary.qmp")),
            "--peer-control".into(),
            format!("unix:{}", s("secondary.qmp")),
            "--start".into(),
        ],
        &p("primary.log"),
    )?;
    wait_for(&p("primary.qmp"), &mut primary, &p("primary.log")).await?;
    r.step(
        t,
        "started a secondary and a primary (two processes, unix sockets), replication running",
    );
    let t = Instant::now();
    let d = wait_protected(&p("primary.qmp")).await?;
    r.step(
        t,
        &format!(
            "initial {} sync: {} MiB compared, {} bytes sent (the two disks start equal)",
            d["sync"].as_str().unwrap_or("?"),
            d["compared"]["compared-bytes"].as_u64().unwrap_or(0) >> 20,
            d["resync"]["sent-bytes"].as_u64().unwrap_or(0)
        ),
    );

    let vm = connect(&p("primary.sock"), "vm0").await?;
    let svm = connect(&p("top.sock"), "vm0").await?;
    let t = Instant::now();
    let (a, b) = tokio::join!(
        workload(vm.clone(), 1, write, disk),
        workload(svm.clone(), 2, write / 4, disk)
    );
    let (a, b) = (a?, b?);
    let secs = t.elapsed().as_secs_f64();
    r.step(
        t,
        &format!(
            "VM wrote {} MiB through the primary ({:.0} MiB/s) while the speculative VM wrote {} MiB to its view",
            a >> 20,
            (a >> 20) as f64 / secs,
            b >> 20
        ),
    );

    let t = Instant::now();
    let cp = qmp(&p("primary.qmp"), "replication-checkpoint", json!({})).await?;
    r.step(
        t,
        &format!(
            "coordinated checkpoint: primary drain {:.2} ms, secondary checkpoint {:.2} ms",
            cp["drain-ms"].as_f64().unwrap_or(0.0),
            cp["secondary-ms"].as_f64().unwrap_or(0.0)
        ),
    );

    let t = Instant::now();
    let (hp, hs) = (
        hash_file(&p("primary.raw"))?,
        hash_file(&p("secondary.raw"))?,
    );
    ensure!(
        hp == hs,
        "after the checkpoint the secondary disk differs from the primary disk"
    );
    let ht = hash_export(&svm).await?;
    ensure!(
        ht == hs,
        "after the checkpoint the speculative view differs from the secondary disk"
    );
    r.step(
        t,
        &format!(
            "verified: secondary disk == primary disk == speculative view (checksum {hp:016x})"
        ),
    );

    let t = Instant::now();
    let (a, b) = tokio::join!(
        workload(vm.clone(), 3, write, disk),
        workload(svm.clone(), 4, write / 4, disk)
    );
    let (a, b) = (a?, b?);
    let view = hash_export(&svm).await?;
    r.step(
        t,
        &format!(
            "wrote {} MiB more through the primary and {} MiB on the speculative view; view checksum {view:016x}",
            a >> 20,
            b >> 20
        ),
    );

    let t = Instant::now();
    drop(vm);
    primary.child.kill()?;
    primary.child.wait()?;
    r.step(t, "killed the primary (SIGKILL)");

    let t = Instant::now();
    qmp(&p("secondary.qmp"), "replication-failover", json!({})).await?;
    loop {
        let st = qmp(&p("secondary.qmp"), "query-replication", json!({})).await?;
        match st["disks"][0]["stage"].as_str() {
            Some("done") => break,
            Some("failover") => tokio::time::sleep(Duration::from_millis(20)).await,
            other => bail!(
                "failover ended in stage {other:?}: {}",
                st["disks"][0]["error"]
            ),
        }
    }
    r.step(
        t,
        "failed over: overlays merged into the secondary disk while its view stayed online",
    );

    let t = Instant::now();
    let after_view = hash_export(&svm).await?;
    let after_disk = hash_file(&p("secondary.raw"))?;
    ensure!(after_view == view, "the view changed during failover");
    ensure!(
        after_disk == view,
        "the secondary disk differs from what the speculative view showed"
    );
    r.step(t, &format!("verified: secondary disk == speculative view before the failover (checksum {view:016x})"));

    // The old primary's host comes back as a secondary on its old disk, and the survivor
    // re-protects the VM (still connected to it) to it.
    let t = Instant::now();
    let old = start_secondary(dir.path(), "primary.raw", "old-").await?;
    qmp(
        &p("secondary.qmp"),
        "replication-promote",
        json!({
            "replicas": [{"disk": "vm0", "uri": format!("nbd+unix:///vm0?socket={}", s("old-replica.sock"))}],
            "peer-control": format!("unix:{}", s("old-secondary.qmp")),
        }),
    )
    .await?;
    let d = wait_protected(&p("secondary.qmp")).await?;
    r.step(
        t,
        &format!(
            "re-protected: the old primary's disk came back as a secondary; checksum sync compared {} MiB, sent {} MiB (what the failover rolled back and what was written since)",
            d["compared"]["compared-bytes"].as_u64().unwrap_or(0) >> 20,
            d["resync"]["sent-bytes"].as_u64().unwrap_or(0) >> 20
        ),
    );

    let t = Instant::now();
    let more = workload(svm.clone(), 5, write / 4, disk).await?;
    drop(svm);
    let cp = qmp(&p("secondary.qmp"), "replication-checkpoint", json!({})).await?;
    let (ha, hb) = (
        hash_file(&p("secondary.raw"))?,
        hash_file(&p("primary.raw"))?,
    );
    ensure!(
        ha == hb,
        "after re-protection and a checkpoint the two disks differ"
    );
    r.step(
        t,
        &format!(
            "the VM wrote {} MiB more on its kept connection; checkpoint (drain {:.2} ms); verified: both disks equal (checksum {ha:016x})",
            more >> 20,
            cp["drain-ms"].as_f64().unwrap_or(0.0)
        ),
    );

    drop(old);
    drop(secondary);
    println!("demo passed in {:.2} s", r.start.elapsed().as_secs_f64());
    if args.keep {
        println!("kept {}", dir.keep().display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

//! The product end to end, with real processes: `coloblk demo`, a secondary and a primary
//! under fio load with coordinated checkpoints, a primary killed under load then a failover,
//! QEMU's quorum + NBD writing into our secondary, and the daemons' memory use.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

/// A secondary and (optionally) a primary, as processes.
struct Cluster {
    dir: tempfile::TempDir,
    secondary: Proc,
    primary: Option<Proc>,
}

impl Cluster {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn unix(&self, name: &str) -> String {
        format!("unix:{}", self.p(name).display())
    }
    fn vm(&self) -> String {
        unix_uri("vm0", &self.p("primary.sock"))
    }
    fn view(&self) -> String {
        unix_uri("vm0", &self.p("top.sock"))
    }
    fn ctl(&self, qmp: &str, action: &str) -> std::process::Output {
        coloblk()
            .args(["ctl", "--control", &self.unix(qmp), action])
            .output()
            .unwrap()
    }
    /// `coloblk ctl ACTION` running in the background, its output captured.
    fn ctl_spawn(&self, qmp: &str, action: &str) -> std::process::Child {
        coloblk()
            .args(["ctl", "--control", &self.unix(qmp), action])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
    fn ok(&self, qmp: &str, action: &str) -> String {
        let out = self.ctl(qmp, action);
        assert!(
            out.status.success(),
            "ctl {action} on {qmp}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
    /// Both images, once asserted byte-equal (`why` is the failure's message).
    fn equal_disks(&self, why: &str) -> (Vec<u8>, Vec<u8>) {
        let a = std::fs::read(self.p("primary.raw")).unwrap();
        let b = std::fs::read(self.p("secondary.raw")).unwrap();
        assert_eq!(first_difference(&a, &b), None, "{why}");
        (a, b)
    }
    fn status(&self, qmp: &str) -> serde_json::Value {
        let out = run(coloblk().args(["ctl", "--json", "--control", &self.unix(qmp), "status"]));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn start_secondary(dir: &Path) -> Proc {
    start_secondary_with(dir, &["--start"])
}

fn start_secondary_with(dir: &Path, extra: &[&str]) -> Proc {
    raw_image(dir, "secondary.raw", DISK);
    spawn_secondary(dir, extra)
}

/// A secondary over the `secondary.raw` already in `dir`.
fn spawn_secondary(dir: &Path, extra: &[&str]) -> Proc {
    spawn_secondary_named(dir, "secondary.raw", "", extra)
}

fn cluster(mode: &str) -> Cluster {
    cluster_with(mode, &["--start"])
}

fn cluster_with(mode: &str, secondary_args: &[&str]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let secondary = start_secondary_with(dir.path(), secondary_args);
    raw_image(dir.path(), "primary.raw", DISK);
    let p = spawn_primary(dir.path(), mode);
    Cluster {
        dir,
        secondary,
        primary: Some(p),
    }
}

/// A primary (default sync, started) over the `primary.raw` already in `dir`, forwarding to
/// the secondary there, once it is protected.
fn spawn_primary(d: &Path, mode: &str) -> Proc {
    spawn_primary_named(d, ("primary.raw", ""), "", mode)
}

/// A primary over `disk` in `d`, its sockets named with `tag` (`TAGprimary.sock`,
/// `TAGprimary.qmp`), forwarding to the secondary whose sockets are named with `to`, started,
/// once it is protected.
fn spawn_primary_named(d: &Path, (disk, tag): (&str, &str), to: &str, mode: &str) -> Proc {
    let control = d.join(format!("{tag}primary.qmp"));
    let p = common::spawn_primary(
        &d.join(disk),
        &d.join(format!("{to}replica.sock")),
        (
            &format!("unix:{}", d.join(format!("{tag}primary.sock")).display()),
            &control,
        ),
        &d.join(format!("{to}secondary.qmp")),
        mode,
    );
    // The primary knows nothing of the secondary's disk at start: its first sync comes first.
    wait_protected(&format!("unix:{}", control.display()));
    p
}

fn fio(uri: &str, secs: u32, seed: u32) -> std::process::Child {
    Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            "--rw=randrw",
            "--rwmixwrite=80",
            "--bs=4k,64k",
            "--iodepth=16",
        ])
        .args([
            "--size=64M",
            "--time_based",
            &format!("--runtime={secs}"),
            &format!("--randseed={seed}"),
        ])
        .arg(format!("--uri={uri}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn read_export(uri: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    let _ = std::fs::remove_file(&out);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri)
        .arg(&out));
    std::fs::read(&out).unwrap()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    (0..a.len()).find(|&i| a[i] != b[i])
}

fn rss_kib(p: &Proc, field: &str) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    let line = st.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The demo's steps, as the demo itself asserts them, and its report.
#[test]
fn the_demo_passes_and_reports_every_step() {
    let out = coloblk()
        .args(["demo", "--size-mib", "64", "--write-mib", "16"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "started a secondary and a primary",
        "coordinated checkpoint: primary drain",
        "verified: secondary disk == primary disk == speculative view",
        "killed the primary (SIGKILL)",
        "failed over: overlays merged",
        "verified: secondary disk == speculative view before the failover",
        "re-protected: the old primary's disk came back as a secondary; checksum sync compared",
        "verified: both disks equal",
        "demo passed in",
    ] {
        assert!(text.contains(step), "missing step '{step}' in:\n{text}");
    }
}

/// Coordinated checkpoints under fio load (reads and writes on the primary, writes on the
/// speculative view), in both modes: every checkpoint succeeds, and once the load stops the
/// secondary disk equals the primary disk byte for byte, and the view equals both.
#[test]
fn coordinated_checkpoints_under_fio_load_keep_the_disks_equal() {
    require("fio");
    for mode in ["async", "sync"] {
        let c = cluster(mode);
        for round in 0..2u32 {
            let mut vm = fio(&c.vm(), 3, round + 1);
            let mut svm = fio(&c.view(), 3, round + 100);
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(700));
                assert!(c.ok("primary.qmp", "checkpoint").contains("secondary"));
            }
            assert!(vm.wait().unwrap().success());
            assert!(svm.wait().unwrap().success());
            c.ok("primary.qmp", "checkpoint");
            if round == 0 {
                // Resource use under fio load (before the bulk reads below, which are not the
                // load in question): each daemon under 64 MiB plus its forwarding queue (64 MiB
                // on the primary, none on the secondary).
                let p = c.primary.as_ref().unwrap();
                assert!(
                    rss_kib(p, "VmHWM:") < 128 * 1024,
                    "primary peak RSS {} KiB",
                    rss_kib(p, "VmHWM:")
                );
                let s = rss_kib(&c.secondary, "VmHWM:");
                assert!(s < 64 * 1024, "secondary peak RSS {s} KiB");
            }
            let a = std::fs::read(c.p("primary.raw")).unwrap();
            let b = std::fs::read(c.p("secondary.raw")).unwrap();
            assert_eq!(
                first_difference(&a, &b),
                None,
                "{mode} round {round}: secondary differs from primary"
            );
            let view = read_export(&c.view(), c.dir.path(), "view.raw");
            assert_eq!(
                first_difference(&view, &b),
                None,
                "{mode} round {round}: view differs after checkpoint"
            );
        }
        let st = c.status("secondary.qmp");
        assert_eq!(st["disks"][0]["active-bytes"], 0);
        assert_eq!(st["disks"][0]["hidden-bytes"], 0);
    }
}

/// kill -9 of the primary in the middle of a fio load, then failover: the secondary disk equals
/// exactly what the speculative view showed just before.
#[test]
fn killing_the_primary_under_load_then_failover_keeps_the_speculative_view() {
    require("fio");
    let mut c = cluster("async");
    let mut vm = fio(&c.vm(), 3, 7);
    let mut svm = fio(&c.view(), 2, 8);
    std::thread::sleep(Duration::from_millis(1000));
    c.ok("primary.qmp", "checkpoint");
    std::thread::sleep(Duration::from_millis(500));
    let mut primary = c.primary.take().unwrap();
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    let _ = vm.wait();
    assert!(svm.wait().unwrap().success());
    let before = read_export(&c.view(), c.dir.path(), "before.raw");
    let out = c.ok("secondary.qmp", "failover");
    assert!(out.contains("failover done"), "{out}");
    let st = c.status("secondary.qmp");
    assert_eq!(st["disks"][0]["stage"], "done", "{st}");
    assert_eq!(st["disks"][0]["error"], serde_json::Value::Null, "{st}");
    let disk = std::fs::read(c.p("secondary.raw")).unwrap();
    assert_eq!(
        first_difference(&disk, &before),
        None,
        "secondary disk differs from the view before failover"
    );
    // The view is the disk now, and takes writes.
    qemu_io(&c.view(), "write -P 0x7e 0 64k");
    let disk = std::fs::read(c.p("secondary.raw")).unwrap();
    assert!(disk[..65536].iter().all(|&b| b == 0x7e));
}

/// Interop: QEMU's own quorum + NBD drivers (as a COLO primary uses them) write into our
/// secondary's replica export; the speculative view keeps the old content until a checkpoint,
/// and then shows exactly QEMU's local image.
#[test]
fn qemu_quorum_and_nbd_write_into_our_secondary() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let mut secondary = start_secondary(dir.path());
    let d = dir.path();
    let local = raw_image(d, "qemu-local.raw", DISK);
    // Same starting content on both sides, written before replication matters.
    qemu_io(&local.display().to_string(), "write -P 0x11 0 8M");
    qemu_io(
        &unix_uri("vm0", &d.join("replica.sock")),
        "write -P 0x11 0 8M",
    );
    let u = |n: &str| format!("unix:{}", d.join(n).display());
    let ctl = |a: &str| run(coloblk().args(["ctl", "--control", &u("secondary.qmp"), a]));
    ctl("checkpoint");
    // Idle resource use, once started and after the first writes and a checkpoint. (After the
    // whole-view reads below, glibc's malloc keeps some of their buffers: see docs/BENCHMARKS.md.)
    let idle = rss_kib(&secondary, "VmRSS:");
    assert!(idle < 32 * 1024, "idle secondary RSS {idle} KiB");
    let quorum = format!(
        r#"json:{{"driver":"quorum","vote-threshold":1,"read-pattern":"fifo","children":[{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}},{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"export":"vm0"}}}}]}}"#,
        local.display(),
        d.join("replica.sock").display()
    );
    run(Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x22 1M 2M",
            "-c",
            "write -P 0x33 6M 4k",
            "-c",
            "flush",
        ])
        .arg(&quorum));
    let view = read_export(&unix_uri("vm0", &d.join("top.sock")), d, "view.raw");
    assert!(
        view[..8 * MIB as usize].iter().all(|&b| b == 0x11),
        "the view changed before the checkpoint"
    );
    ctl("checkpoint");
    let want = std::fs::read(&local).unwrap();
    assert_eq!(
        first_difference(&std::fs::read(d.join("secondary.raw")).unwrap(), &want),
        None
    );
    let view = read_export(&unix_uri("vm0", &d.join("top.sock")), d, "view2.raw");
    assert_eq!(first_difference(&view, &want), None);
    secondary.signal("TERM");
    assert!(secondary.wait_exit(Duration::from_secs(10)).success());
}

/// The secondary's status table and Prometheus metrics show copy-before-write copies, overlay
/// sizes and checkpoint durations.
#[test]
fn secondary_status_and_metrics_count_copies_and_checkpoints() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _s = start_secondary_with(
        d,
        &["--start", "--metrics", &format!("tcp:127.0.0.1:{port}")],
    );
    // Three clusters overwritten by the primary, one twice: three copies; 128 KiB on the view.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 128k",
            "-c",
            "write -P 3 0 4k",
        ])
        .arg(unix_uri("vm0", &d.join("replica.sock"))));
    qemu_io(&unix_uri("vm0", &d.join("top.sock")), "write -P 4 4M 128k");
    let qmp = format!("unix:{}", d.join("secondary.qmp").display());
    let table = String::from_utf8(run(coloblk().args(["ctl", "--control", &qmp, "status"])).stdout)
        .unwrap();
    let want = "role: secondary\n\
                DISK  STAGE    ACTIVE     HIDDEN     CBW COPIES  FAILOVER  ERROR\n\
                vm0   running  128.0 KiB  192.0 KiB  3           -         -\n";
    assert_eq!(table, want);
    run(coloblk().args(["ctl", "--control", &qmp, "checkpoint"]));
    qemu_io(
        &unix_uri("vm0", &d.join("replica.sock")),
        "write -P 5 0 64k",
    );
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    for line in [
        "coloblk_cbw_copies_total{disk=\"vm0\"} 4",
        "coloblk_hidden_bytes{disk=\"vm0\"} 65536",
        "coloblk_active_bytes{disk=\"vm0\"} 0",
        "coloblk_checkpoint_seconds_count 1",
        "coloblk_replication_error{disk=\"vm0\"} 0",
    ] {
        assert!(body.contains(line), "missing '{line}' in:\n{body}");
    }
}

/// A coordinated checkpoint refused because the secondary was never started says why,
/// changes neither side, and QEMU's x-colo-lost-heartbeat then stops the primary.
#[test]
fn a_failed_coordinated_checkpoint_says_why_and_changes_nothing() {
    require("qemu-io");
    let c = cluster_with("async", &[]);
    for (name, p) in [
        ("primary", c.primary.as_ref().unwrap()),
        ("secondary", &c.secondary),
    ] {
        let idle = rss_kib(p, "VmRSS:");
        assert!(idle < 32 * 1024, "idle {name} RSS {idle} KiB");
    }
    qemu_io(&c.vm(), "write -P 9 0 64k");
    let out = c.ctl("primary.qmp", "checkpoint");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "coloblk ctl: checkpoint refused: the secondary's disk 'vm0' is not running (stage none)"
    );
    let p = c.status("primary.qmp");
    assert_eq!(p["disks"][0]["stage"], "running");
    assert_eq!(p["last-checkpoint"], serde_json::Value::Null);
    let s = c.status("secondary.qmp");
    assert_eq!(s["disks"][0]["stage"], "none");
    assert_eq!(s["last-checkpoint"], serde_json::Value::Null);
    // Before start the replica export writes straight through, as QEMU's does.
    let disk = std::fs::read(c.p("secondary.raw")).unwrap();
    assert!(disk[..65536].iter().all(|&b| b == 9));
    let script = r#"
import asyncio, sys
from qemu.qmp import QMPClient
async def main(p):
    c = QMPClient("x"); await c.connect(p)
    await c.execute("x-colo-lost-heartbeat")
    print((await c.execute("query-replication"))["disks"][0]["stage"])
asyncio.run(main(sys.argv[1]))"#;
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(c.p("primary.qmp")));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
}

/// The secondary raises QMP events for checkpoints and for the failover's start and end, and
/// python's qemu.qmp receives them.
#[test]
fn checkpoint_and_failover_raise_qmp_events() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _s = start_secondary(d);
    let replica = unix_uri("vm0", &d.join("replica.sock"));
    qemu_io(&replica, "write -P 1 0 4M");
    let script = r#"
import asyncio, sys
from qemu.qmp import QMPClient, EventListener
async def main(path):
    c = QMPClient("events")
    await c.connect(path)
    listener = EventListener()
    with c.listen(listener):
        await c.execute("replication-checkpoint")
        ev = await asyncio.wait_for(listener.get(), 5)
        print(ev["event"], "duration-ms" in ev["data"])
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", "-c", "write -P 2 0 4M", sys.argv[2], stdout=asyncio.subprocess.DEVNULL)
    await proc.wait()
    names = []
    listener = EventListener()
    with c.listen(listener):
        await c.execute("replication-failover")
        while "FAILOVER_DONE" not in names:
            ev = await asyncio.wait_for(listener.get(), 10)
            names.append(ev["event"])
            if ev["event"] == "FAILOVER_DONE":
                print("FAILOVER_DONE", ev["data"]["disk"], ev["data"]["merged-bytes"])
    print(names[0])
    await c.disconnect()
asyncio.run(main(sys.argv[1]))
"#;
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(d.join("secondary.qmp"))
        .arg(&replica));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "REPLICATION_CHECKPOINT True",
            "FAILOVER_DONE vm0 4194304",
            "FAILOVER_STARTED"
        ],
        "{text}"
    );
}

/// `replication-stop` then `replication-start` on a primary really starts it again: writes
/// made while stopped are only dirty, a checkpoint meanwhile is refused, and after the start
/// the resync sends them and a checkpoint means equal disks. (Before, the start answered
/// "done" but left the primary stopped, and every later checkpoint said yes over differing
/// disks.)
#[test]
fn stop_then_start_on_a_primary_really_starts_and_checkpoints_mean_equal_disks() {
    require("qemu-io");
    let c = cluster("async");
    c.ok("primary.qmp", "stop");
    qemu_io(&c.vm(), "write -P 0x51 1M 64k");
    let out = c.ctl("primary.qmp", "checkpoint");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "coloblk ctl: disk 'vm0': checkpoint refused: replication is not running (stage done); \
         start it first"
    );
    c.ok("primary.qmp", "start");
    assert_eq!(c.status("primary.qmp")["disks"][0]["stage"], "running");
    qemu_io(&c.vm(), "write -P 0x52 2M 64k");
    wait_protected(&c.unix("primary.qmp"));
    c.ok("primary.qmp", "checkpoint");
    let (_, b) = c.equal_disks("disks differ after a checkpoint");
    assert!(b[MIB as usize..][..65536].iter().all(|&x| x == 0x51));
    assert!(b[2 * MIB as usize..][..65536].iter().all(|&x| x == 0x52));
}

/// A coordinated checkpoint is bound to the secondary buffer it drained into: a stale epoch
/// is refused, and once the secondary has failed over every checkpoint is refused (the
/// primary's says why), while a second failover says there was nothing to do. Racing a
/// checkpoint against a failover, a checkpoint that says yes always left equal disks.
#[test]
fn checkpoints_are_refused_for_another_epoch_and_after_a_failover() {
    require("qemu-io");
    let c = cluster("async");
    let st = c.status("secondary.qmp");
    let epoch = st["epoch"].as_u64().unwrap();
    let stale = qmp_execute(
        &c.p("secondary.qmp"),
        "replication-checkpoint",
        &format!(r#"{{"epoch": {}}}"#, epoch + 1),
    );
    assert_eq!(
        stale,
        format!(
            "error: checkpoint refused: the primary drained into epoch {}, but this secondary \
             is in epoch {epoch} (it restarted or checkpointed meanwhile)",
            epoch + 1
        )
    );
    c.ok("primary.qmp", "checkpoint");
    assert_eq!(c.status("secondary.qmp")["epoch"], epoch + 1);
    qemu_io(&c.vm(), "write -P 0x61 0 64k");
    c.ok("secondary.qmp", "failover");
    // Refused for the first reason found: the forwarded write hit the fenced replica export
    // (link down), or the secondary's stage.
    let out = c.ctl("primary.qmp", "checkpoint");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checkpoint refused: the secondary link is down")
            || err.contains("checkpoint refused: the secondary's disk 'vm0' is not running"),
        "{err}"
    );
    assert_eq!(
        qmp_execute(&c.p("secondary.qmp"), "replication-checkpoint", "{}"),
        "error: checkpoint refused: already failed over, there is no buffer to empty"
    );
    // QEMU's command keeps QEMU's answer (a checkpoint after failover is ignored).
    assert_eq!(
        qmp_execute(&c.p("secondary.qmp"), "xen-colo-do-checkpoint", "{}"),
        "return: {}"
    );
    assert_eq!(
        qmp_execute(&c.p("secondary.qmp"), "replication-failover", "{}"),
        r#"return: {"note":"already failed over: nothing to do"}"#
    );
    // The failover rolled the forwarded write back: the secondary holds the checkpoint.
    let b = std::fs::read(c.p("secondary.raw")).unwrap();
    assert!(b[..65536].iter().all(|&x| x == 0));

    // The race itself, a few rounds: whoever wins, a checkpoint that said yes means equal.
    for round in 0..4u64 {
        let c = cluster("async");
        // The first checkpoint makes the synced secondary a usable copy, so it may fail over.
        c.ok("primary.qmp", "checkpoint");
        qemu_io(&c.vm(), &format!("write -P {} 0 256k", round + 1));
        let checkpoint = c.ctl_spawn("primary.qmp", "checkpoint");
        std::thread::sleep(Duration::from_millis(round * 3));
        c.ok("secondary.qmp", "failover");
        let out = checkpoint.wait_with_output().unwrap();
        let b = std::fs::read(c.p("secondary.raw")).unwrap();
        if out.status.success() {
            let a = std::fs::read(c.p("primary.raw")).unwrap();
            assert_eq!(
                first_difference(&a, &b),
                None,
                "round {round}: yes over unequal disks"
            );
        } else {
            assert!(b[..65536].iter().all(|&x| x == 0), "round {round}");
        }
    }
}

/// A primary that restarts knows nothing of what its secondary lacks (it died with writes
/// unsent): by default it copies the whole disk before it accepts a checkpoint, so the
/// checkpoint after the restart means equal disks. (Before, it started clean and the next
/// checkpoint said yes over 64 differing clusters.)
#[test]
fn a_restarted_primary_syncs_before_its_first_checkpoint() {
    require("qemu-io");
    let mut c = cluster("async");
    let _ = c.secondary.child.kill();
    let _ = c.secondary.child.wait();
    // Written while the secondary is gone: only the primary has it.
    qemu_io(&c.vm(), "write -P 0x71 4M 4M");
    for f in ["replica.sock", "top.sock", "secondary.qmp"] {
        let _ = std::fs::remove_file(c.p(f));
    }
    c.secondary = spawn_secondary(c.dir.path(), &["--start"]);
    let mut primary = c.primary.take().unwrap();
    signal(&primary, "TERM");
    assert!(primary.child.wait().unwrap().success());
    for f in ["primary.sock", "primary.qmp"] {
        let _ = std::fs::remove_file(c.p(f));
    }
    c.primary = Some(spawn_primary(c.dir.path(), "async"));
    c.ok("primary.qmp", "checkpoint");
    let (_, b) = c.equal_disks("disks differ after a checkpoint");
    assert!(
        b[4 * MIB as usize..][..4 * MIB as usize]
            .iter()
            .all(|&x| x == 0x71)
    );
}

/// SIGTERM on a secondary that failed over flushes the export that now serves the VM and exits
/// 0 (before: it tried the fenced replica export first, exited 1 and skipped that flush).
#[test]
fn sigterm_after_failover_flushes_the_live_export_and_exits_0() {
    require("qemu-io");
    let mut c = cluster("async");
    // The first checkpoint makes the synced secondary a usable copy.
    c.ok("primary.qmp", "checkpoint");
    c.ok("secondary.qmp", "failover");
    qemu_io(&c.view(), "write -P 0x3c 128k 64k");
    signal(&c.secondary, "TERM");
    let st = c.secondary.child.wait().unwrap();
    assert!(st.success(), "secondary exited with {st}");
    let disk = std::fs::read(c.p("secondary.raw")).unwrap();
    assert!(disk[131072..][..65536].iter().all(|&b| b == 0x3c));
}

/// A secondary whose disk a coloblk primary is syncing is no usable copy: every way of failing
/// over refuses, with the disk named, until the next checkpoint (or `--force`). The first sync
/// with a coloblk secondary compares digests (checksum) and, the disks being equal, copies
/// nothing.
#[test]
fn a_secondary_under_sync_refuses_failover_until_the_next_checkpoint() {
    let c = cluster("async");
    let p = c.status("primary.qmp");
    assert_eq!(p["disks"][0]["sync"], "checksum");
    assert_eq!(p["disks"][0]["peer-verified"], true);
    assert_eq!(
        p["disks"][0]["resync"]["sent-bytes"], 0,
        "equal disks: nothing sent"
    );
    let s = c.status("secondary.qmp");
    assert_eq!(s["disks"][0]["consistent"], false);
    assert_eq!(s["disks"][0]["primary-connected"], true);
    let refused = "disk vm0 is not a usable copy: resync incomplete (replication-failover \
                   with force: true fails over all the same)";
    let out = c.ctl("secondary.qmp", "failover");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("coloblk ctl: {refused}")
    );
    let sock = c.p("secondary.qmp");
    assert_eq!(
        qmp_execute(&sock, "x-colo-lost-heartbeat", "{}"),
        format!("error: {refused}")
    );
    assert_eq!(
        qmp_execute(
            &sock,
            "xen-set-replication",
            r#"{"enable": false, "primary": false, "failover": true}"#
        ),
        format!("error: {refused}")
    );
    assert_eq!(c.status("secondary.qmp")["disks"][0]["stage"], "running");
    c.ok("primary.qmp", "checkpoint");
    assert_eq!(c.status("secondary.qmp")["disks"][0]["consistent"], true);

    // The secondary sees its primary go (and logs it), and --force fails over all the same.
    let mut c = cluster("async");
    let mut primary = c.primary.take().unwrap();
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    let t = std::time::Instant::now();
    while c.status("secondary.qmp")["disks"][0]["primary-connected"] != false {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the primary's going went unseen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = coloblk()
        .args([
            "ctl",
            "--control",
            &c.unix("secondary.qmp"),
            "--force",
            "failover",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.status("secondary.qmp")["disks"][0]["stage"], "done");
}

/// Online verify: a secondary disk changed behind the pair's back (bit rot, a stray write) is
/// found by `ctl verify`, which names the bytes that differ, and the resync repairs them.
#[test]
fn verify_finds_a_silently_changed_secondary_block_and_the_resync_repairs_it() {
    require("qemu-io");
    let c = cluster("async");
    qemu_io(&c.vm(), "write -P 0x5a 0 1M");
    c.ok("primary.qmp", "checkpoint");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.p("secondary.raw"))
            .unwrap();
        f.seek(SeekFrom::Start(3 * MIB + 100)).unwrap();
        f.write_all(b"rot").unwrap();
    }
    let out = c.ok("primary.qmp", "verify");
    assert_eq!(
        out.trim(),
        "disk 'vm0': 64.0 MiB compared, 64.0 KiB different (being resynced)"
    );
    wait_protected(&c.unix("primary.qmp"));
    c.ok("primary.qmp", "checkpoint");
    let a = std::fs::read(c.p("primary.raw")).unwrap();
    let b = std::fs::read(c.p("secondary.raw")).unwrap();
    assert_eq!(first_difference(&a, &b), None);
}

/// The whole protection cycle, with exact bytes at every step: A primary, B secondary; kill A;
/// fail over B (the write after the checkpoint is rolled back); B re-protects its VM to A,
/// restarted as a secondary on its old disk (a checksum sync sends only what differs), with the
/// VM's connection to B kept; checkpoint; kill B; fail over A, which then holds exactly the
/// checkpoint.
#[test]
fn the_whole_cycle_fails_over_reprotects_and_fails_back() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = |n: &str| format!("unix:{}", d.join(n).display());
    let nbd = |sock: &str| unix_uri("vm0", &d.join(sock));
    let write = |uri: &str, cmd: &str| {
        qemu_io(uri, cmd);
    };
    let secondary =
        |disk: &str, tag: &str| spawn_secondary_named(d, disk, &format!("{tag}-"), &["--start"]);
    let ctl_ok = |qmp: &str, args: &[&str]| {
        let out = coloblk()
            .args(["ctl", "--control", &u(qmp)])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?} on {qmp}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let read = |n: &str| std::fs::read(d.join(n)).unwrap();

    // A primary (a.raw), B secondary (b.raw).
    raw_image(d, "a.raw", DISK);
    raw_image(d, "b.raw", DISK);
    let mut b = secondary("b.raw", "b");
    let mut a = spawn_primary_named(d, ("a.raw", "a-"), "b-", "async");
    write(&nbd("a-primary.sock"), "write -P 0x11 0 2M");
    ctl_ok("a-primary.qmp", &["checkpoint"]);
    let at_checkpoint_1 = read("a.raw");
    write(&nbd("a-primary.sock"), "write -P 0x22 4M 1M");

    // Kill A; fail over B: B's disk is the checkpoint (the 0x22 write rolled back).
    let _ = a.child.kill();
    let _ = a.child.wait();
    assert!(ctl_ok("b-secondary.qmp", &["failover"]).contains("failover done"));
    assert_eq!(first_difference(&read("b.raw"), &at_checkpoint_1), None);
    // The VM runs on B now, and writes.
    write(&nbd("b-top.sock"), "write -P 0x33 8M 1M");

    // A's host comes back as a secondary on its old disk; B re-protects to it.
    let _a2 = secondary("a.raw", "a2");
    ctl_ok(
        "b-secondary.qmp",
        &[
            "promote",
            "--replica",
            &format!("vm0={}", nbd("a2-replica.sock")),
            "--peer-control",
            &u("a2-secondary.qmp"),
        ],
    );
    let st = wait_protected(&u("b-secondary.qmp"));
    assert_eq!(st["role"], "primary");
    assert_eq!(st["disks"][0]["sync"], "checksum");
    // What differs: the rolled-back 1 MiB on A and the 1 MiB written on B since.
    assert_eq!(st["disks"][0]["resync"]["done-bytes"], 2 * MIB);
    // Sent as payload: at most those bytes (the rolled-back range may go as data: the merge
    // wrote its old zeroes, so the file holds them allocated).
    assert!(st["disks"][0]["resync"]["sent-bytes"].as_u64().unwrap() <= 2 * MIB);
    ctl_ok("b-secondary.qmp", &["checkpoint"]);
    let at_checkpoint_2 = read("b.raw");
    assert_eq!(first_difference(&read("a.raw"), &at_checkpoint_2), None);
    assert!(
        at_checkpoint_2[8 * MIB as usize..][..MIB as usize]
            .iter()
            .all(|&x| x == 0x33)
    );
    assert!(
        at_checkpoint_2[4 * MIB as usize..][..MIB as usize]
            .iter()
            .all(|&x| x == 0)
    );

    // The VM writes more through its old connection path on B; kill B; fail over A.
    write(&nbd("b-top.sock"), "write -P 0x44 12M 1M");
    let _ = b.child.kill();
    let _ = b.child.wait();
    assert!(ctl_ok("a2-secondary.qmp", &["failover"]).contains("failover done"));
    assert_eq!(first_difference(&read("a.raw"), &at_checkpoint_2), None);
}

/// kill -9 of the secondary under fio, then a restart on the same disk: the primary
/// reconnects without a command, compares (the secondary is another process now) and copies
/// about what was dirtied while it was away; a checkpoint then succeeds and the disks are equal.
#[test]
fn a_killed_secondary_restarted_under_fio_is_resynced_without_a_command() {
    require("fio");
    let mut c = cluster("async");
    c.ok("primary.qmp", "checkpoint");
    // fio writes the first 8 MiB of the 64 MiB disk: the outage dirties at most that.
    let region = 8 * MIB;
    let mut vm = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k,64k",
        ])
        .args(["--iodepth=16", "--size=8M", "--time_based", "--runtime=4"])
        .arg(format!("--uri={}", c.vm()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let _ = c.secondary.child.kill();
    let _ = c.secondary.child.wait();
    std::thread::sleep(Duration::from_millis(1500));
    let dirty = c.status("primary.qmp")["disks"][0]["dirty-bytes"]
        .as_u64()
        .unwrap();
    assert!(dirty > 0, "the VM wrote while the secondary was away");
    for f in ["replica.sock", "top.sock", "secondary.qmp"] {
        let _ = std::fs::remove_file(c.p(f));
    }
    c.secondary = spawn_secondary(c.dir.path(), &["--start"]);
    assert!(
        vm.wait().unwrap().success(),
        "fio failed while the pair healed"
    );
    let st = wait_protected(&c.unix("primary.qmp"));
    c.ok("primary.qmp", "checkpoint");
    let _ = c.equal_disks("disks differ after the resync");
    // The comparison of all 64 MiB finds what the outage dirtied, inside fio's 8 MiB: the
    // resync sends that, not the disk.
    let sent = st["disks"][0]["resync"]["sent-bytes"].as_u64().unwrap();
    eprintln!("dirty at the restart {dirty} bytes, resync sent {sent} bytes");
    assert!(dirty <= region, "dirty {dirty}");
    assert!(sent <= region, "sent {sent} bytes for {dirty} dirty");
}

/// A primary whose secondary has failed over (it serves the VM now) must not go on writing:
/// it raises REPLICATION_PEER_PROMOTED and refuses further VM writes (two VMs would write).
#[test]
fn a_primary_whose_secondary_took_over_fences_itself() {
    require("qemu-io");
    let c = cluster("async");
    c.ok("primary.qmp", "checkpoint");
    c.ok("secondary.qmp", "failover");
    // The next forwarded write fails at the fenced replica export; the primary asks its peer.
    assert_fences_itself(&c);
}

/// The old primary is fenced also when its secondary has gone on to be promoted (it answers
/// as a primary now, and its replica export is gone): before, the old primary kept retrying
/// and its VM kept writing beside the new one.
#[test]
fn a_primary_whose_secondary_was_promoted_fences_itself() {
    require("qemu-io");
    let c = cluster("async");
    c.ok("primary.qmp", "checkpoint");
    c.ok("secondary.qmp", "failover");
    let out = coloblk()
        .args([
            "ctl",
            "--control",
            &c.unix("secondary.qmp"),
            "promote",
            "--replica",
        ])
        .arg(format!("vm0={}", unix_uri("vm0", &c.p("nobody.sock"))))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.status("secondary.qmp")["role"], "primary");
    assert_fences_itself(&c);
}

/// After set-replica the coordinated checkpoint is the new secondary's: its epoch moves and
/// its disk becomes a usable copy; the old secondary is left alone. (Before, the checkpoint
/// went to the secondary named at start, and the new one was never checkpointed.)
#[test]
fn after_set_replica_the_checkpoint_goes_to_the_new_secondary() {
    let c = cluster("async");
    c.ok("primary.qmp", "checkpoint");
    let old_epoch = c.status("secondary.qmp")["epoch"].as_u64().unwrap();
    let d = c.dir.path();
    raw_image(d, "second.raw", DISK);
    let u = |n: &str| format!("unix:{}", d.join(n).display());
    let _b2 = spawn_secondary_named(d, "second.raw", "b2-", &["--start"]);
    let st = qmp_execute(&d.join("b2-secondary.qmp"), "query-replication", "{}");
    assert!(
        st.contains(r#""consistent":false"#),
        "a new daemon is no usable copy yet: {st}"
    );
    let args = format!(
        r#"{{"disk": "vm0", "uri": "{}", "peer-control": "{}"}}"#,
        unix_uri("vm0", &d.join("b2-replica.sock")),
        u("b2-secondary.qmp")
    );
    assert_eq!(
        qmp_execute(&c.p("primary.qmp"), "replication-set-replica", &args),
        "return: {}"
    );
    wait_protected(&c.unix("primary.qmp"));
    let b2_epoch = |st: &str| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(st.strip_prefix("return: ").unwrap()).unwrap();
        v["epoch"].as_u64().unwrap()
    };
    let before = b2_epoch(&qmp_execute(
        &d.join("b2-secondary.qmp"),
        "query-replication",
        "{}",
    ));
    c.ok("primary.qmp", "checkpoint");
    let after = qmp_execute(&d.join("b2-secondary.qmp"), "query-replication", "{}");
    assert_eq!(b2_epoch(&after), before + 1);
    assert!(after.contains(r#""consistent":true"#), "{after}");
    assert_eq!(
        c.status("secondary.qmp")["epoch"].as_u64().unwrap(),
        old_epoch
    );
    let a = std::fs::read(c.p("primary.raw")).unwrap();
    assert!(a == std::fs::read(d.join("second.raw")).unwrap());
}

/// A checkpoint without the primary's epoch (QEMU's command, an orchestrator) does not make a
/// disk that a coloblk primary is syncing a usable copy.
#[test]
fn only_the_coordinated_checkpoint_makes_a_synced_disk_usable_again() {
    let c = cluster("async");
    let sock = c.p("secondary.qmp");
    assert_eq!(c.status("secondary.qmp")["disks"][0]["consistent"], false);
    assert_eq!(
        qmp_execute(&sock, "xen-colo-do-checkpoint", "{}"),
        "return: {}"
    );
    assert_eq!(c.status("secondary.qmp")["disks"][0]["consistent"], false);
    assert!(
        qmp_execute(&sock, "x-colo-lost-heartbeat", "{}")
            .starts_with("error: disk vm0 is not a usable copy")
    );
    c.ok("primary.qmp", "checkpoint");
    assert_eq!(c.status("secondary.qmp")["disks"][0]["consistent"], true);
}

/// After a VM write, the primary finds that its secondary took over: it says so, refuses the
/// next VM write, and nothing of that write lands.
fn assert_fences_itself(c: &Cluster) {
    let _ = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 64k"])
        .arg(c.vm())
        .output();
    let t = std::time::Instant::now();
    while c.status("primary.qmp")["disks"][0]["link"] != "peer-promoted" {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{}",
            c.status("primary.qmp")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 2 1M 64k"])
        .arg(c.vm())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("write failed"), "{text}");
    let a = std::fs::read(c.p("primary.raw")).unwrap();
    assert!(
        a[MIB as usize..][..65536].iter().all(|&x| x == 0),
        "a fenced write landed"
    );
}

/// A primary killed with -9 under fio forgets its queue and its dirty bitmap, but not its write
/// log: restarted on the same disk, it finds the secondary in the generation of their last
/// checkpoint, copies only the logged extents (no comparison of the disk), and the next
/// checkpoint finds the disks equal.
#[test]
fn a_primary_killed_under_fio_resyncs_its_write_log_and_ends_equal() {
    require("fio");
    let mut c = cluster("async");
    c.ok("primary.qmp", "checkpoint");
    // fio writes 8 MiB in the middle of the 64 MiB disk: two 4 MiB extents of the log.
    let mut vm = Command::new("fio")
        .args(["--name=load", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"])
        .args(["--iodepth=16", "--offset=24M", "--size=8M", "--time_based"])
        .args(["--runtime=10"])
        .arg(format!("--uri={}", c.vm()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut primary = c.primary.take().unwrap();
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    let _ = vm.kill();
    let _ = vm.wait();
    for f in ["primary.sock", "primary.qmp"] {
        let _ = std::fs::remove_file(c.p(f));
    }
    c.primary = Some(spawn_primary(c.dir.path(), "async"));
    let st = c.status("primary.qmp");
    let d = &st["disks"][0];
    assert_eq!(
        d["compared"],
        serde_json::Value::Null,
        "no comparison: {st}"
    );
    let sent = d["resync"]["sent-bytes"].as_u64().unwrap();
    assert!(sent <= 8 * MIB, "sent {sent} bytes for an 8 MiB log");
    c.ok("primary.qmp", "checkpoint");
    let (a, _) = c.equal_disks("disks differ after the resync");
    assert!(
        a[24 * MIB as usize..32 * MIB as usize]
            .iter()
            .any(|&x| x != 0)
    );
}

/// A secondary killed with -9 comes back knowing its disk is no usable copy (its buffer is
/// gone, and it cannot tell which of the epoch's writes reached it): failover is refused
/// until the primary, which finds it in their generation, has resynced and checkpointed.
#[test]
fn a_restarted_secondary_is_no_usable_copy_until_resynced_and_checkpointed() {
    require("qemu-io");
    let mut c = cluster("async");
    qemu_io(&c.vm(), "write -P 0x31 0 1M");
    c.ok("primary.qmp", "checkpoint");
    let _ = c.secondary.child.kill();
    let _ = c.secondary.child.wait();
    qemu_io(&c.vm(), "write -P 0x32 8M 1M");
    for f in ["replica.sock", "top.sock", "secondary.qmp"] {
        let _ = std::fs::remove_file(c.p(f));
    }
    // Not started: the primary cannot resync it yet, and failover must still be refused.
    c.secondary = spawn_secondary(c.dir.path(), &[]);
    let st = c.status("secondary.qmp");
    assert_eq!(st["disks"][0]["consistent"], false, "{st}");
    c.ok("secondary.qmp", "start");
    let out = c.ctl("secondary.qmp", "failover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a usable copy"),
        "{err}"
    );
    let st = wait_protected(&c.unix("primary.qmp"));
    // The last comparison is still the first sync's (nothing differed then): a comparison now
    // would have found the 1 MiB written while the secondary was away. Its dirty bitmap went
    // instead, exactly that MiB (the host did not restart: the secondary's page cache kept
    // what it had acknowledged, so the write log is not needed).
    let d = &st["disks"][0];
    assert_eq!(d["compared"]["differing-bytes"], 0, "{st}");
    assert_eq!(d["resync"]["done-bytes"], MIB, "{st}");
    c.ok("primary.qmp", "checkpoint");
    assert_eq!(c.status("secondary.qmp")["disks"][0]["consistent"], true);
    let (_, b) = c.equal_disks("disks differ after the resync");
    assert!(
        b[8 * MIB as usize..9 * MIB as usize]
            .iter()
            .all(|&x| x == 0x32)
    );
}

/// The state names its image and is checked whole: a damaged state file or one of another
/// image stops the daemon with the path and the reason, and nothing is served.
#[test]
fn a_damaged_or_foreign_state_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = raw_image(d, "p.raw", DISK);
    let state = d.join("p.raw.coloblk");
    // A primary of `image` whose secondary is absent (it serves anyway).
    let primary = |spec: &str| {
        let mut c = coloblk();
        c.args(["primary", "--disk"])
            .arg(format!(
                "vm0={},replica=nbd+unix:///vm0?socket={}{spec}",
                image.display(),
                d.join("none.sock").display()
            ))
            .args([
                "--export-listen",
                &format!("unix:{}", d.join("p.sock").display()),
            ])
            .args(["--control", &format!("unix:{}", d.join("p.qmp").display())]);
        c
    };
    let start = || primary("").output().unwrap();
    // A first run writes the state (the primary serves, then is stopped).
    let mut p = Proc::spawn("coloblk primary", &mut primary(",sync=full"));
    wait_socket(&d.join("p.qmp"), &mut p);
    signal(&p, "TERM");
    assert!(p.child.wait().unwrap().success());
    let good = std::fs::read(state.join("state")).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x20;
    std::fs::write(state.join("state"), &bad).unwrap();
    let out = start();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&state.join("state").display().to_string()) && err.contains("damaged"),
        "{err}"
    );
    assert!(!d.join("p.sock").exists(), "nothing is served");
    // Another image where this one was: the state is not its own.
    std::fs::write(state.join("state"), &good).unwrap();
    let other = raw_image(d, "q.raw", DISK);
    std::fs::rename(&other, &image).unwrap();
    let out = start();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to another image"),
        "{err}"
    );
}

/// Split brain: A (primary) writes alone while B is gone, then B is failed over and written
/// too. When B, promoted, meets A's disk again (A back as a secondary), the generations show
/// that both served after their last shared one: nothing is copied, the link says why, until
/// the operator discards A's changes; then B's checksum sync makes A's disk B's.
#[test]
fn a_split_brain_is_refused_until_one_side_is_discarded() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = |n: &str| format!("unix:{}", d.join(n).display());
    let nbd = |sock: &str| unix_uri("vm0", &d.join(sock));
    let ctl = |qmp: &str, args: &[&str]| {
        coloblk()
            .args(["ctl", "--control", &u(qmp)])
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |qmp: &str, args: &[&str]| {
        let out = ctl(qmp, args);
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    raw_image(d, "a.raw", DISK);
    raw_image(d, "b.raw", DISK);
    let mut b = spawn_secondary_named(d, "b.raw", "b-", &["--start"]);
    let mut a = spawn_primary_named(d, ("a.raw", "a-"), "b-", "async");
    qemu_io(&nbd("a-primary.sock"), "write -P 0x11 0 2M");
    ok("a-primary.qmp", &["checkpoint"]);
    // B goes away; once A knows, it serves alone (a new generation), then dies. (Writes A
    // served before it noticed are those in flight at the failover: void, as in any COLO
    // failover.)
    let _ = b.child.kill();
    let _ = b.child.wait();
    qemu_io(&nbd("a-primary.sock"), "write -P 0x21 6M 4k");
    for _ in 0..100 {
        let out = coloblk()
            .args(["ctl", "--json", "--control", &u("a-primary.qmp"), "status"])
            .output()
            .unwrap();
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if st["disks"][0]["link-up"] == false {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    qemu_io(&nbd("a-primary.sock"), "write -P 0x22 4M 1M");
    let _ = a.child.kill();
    let _ = a.child.wait();
    // B comes back and is failed over (forced: a restarted secondary is no usable copy), and
    // the VM writes on B.
    for f in ["b-replica.sock", "b-top.sock", "b-secondary.qmp"] {
        let _ = std::fs::remove_file(d.join(f));
    }
    let _b = spawn_secondary_named(d, "b.raw", "b-", &["--start"]);
    ok("b-secondary.qmp", &["failover", "--force"]);
    qemu_io(&nbd("b-top.sock"), "write -P 0x33 8M 1M");
    // A's host comes back as a secondary on its old disk; B, promoted, meets it.
    let _a2 = spawn_secondary_named(d, "a.raw", "a2-", &["--start"]);
    let a_before = std::fs::read(d.join("a.raw")).unwrap();
    ok(
        "b-secondary.qmp",
        &[
            "promote",
            "--replica",
            &format!("vm0={}", nbd("a2-replica.sock")),
            "--peer-control",
            &u("a2-secondary.qmp"),
        ],
    );
    let mut said = String::new();
    for _ in 0..100 {
        let out = coloblk()
            .args([
                "ctl",
                "--json",
                "--control",
                &u("b-secondary.qmp"),
                "status",
            ])
            .output()
            .unwrap();
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        said = st["disks"][0]["link-error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if said.contains("split brain") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        said.contains("split brain") && said.contains("discard-changes"),
        "{said}"
    );
    assert_eq!(
        first_difference(&std::fs::read(d.join("a.raw")).unwrap(), &a_before),
        None,
        "nothing was copied onto A"
    );
    let out = ctl("b-secondary.qmp", &["checkpoint"]);
    assert!(
        !out.status.success(),
        "a checkpoint in split brain is refused"
    );
    // The operator gives up A's changes: B's next connection overwrites them.
    ok("a2-secondary.qmp", &["discard-changes", "--disk", "vm0"]);
    wait_protected(&u("b-secondary.qmp"));
    ok("b-secondary.qmp", &["checkpoint"]);
    let (a, b) = (
        std::fs::read(d.join("a.raw")).unwrap(),
        std::fs::read(d.join("b.raw")).unwrap(),
    );
    assert_eq!(first_difference(&a, &b), None, "A is B's copy now");
    assert!(
        a[8 * MIB as usize..9 * MIB as usize]
            .iter()
            .all(|&x| x == 0x33)
    );
    assert!(
        a[4 * MIB as usize..5 * MIB as usize]
            .iter()
            .all(|&x| x == 0),
        "A's alone write is gone"
    );
}

/// A secondary killed with -9 during its failover merge, after a VM write into the view while
/// it merged: a restart that finds the record of another boot of the host refuses the disk as
/// half-merged; a restart in this boot resumes the merge (status says so), the disk ends as
/// the view at failover plus that write, byte for byte, and is then served plain. The merge is large
/// (192 MiB) so that the kill lands inside it; an attempt where it finished first is redone.
#[test]
fn a_secondary_killed_during_the_merge_resumes_it_and_keeps_the_vm_writes() {
    require("qemu-io");
    const BIG: u64 = 256 * MIB;
    for attempt in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        raw_image(d, "secondary.raw", BIG);
        raw_image(d, "primary.raw", BIG);
        let mut c = Cluster {
            secondary: spawn_secondary(d, &["--start"]),
            primary: None,
            dir,
        };
        c.primary = Some(spawn_primary(c.dir.path(), "sync"));
        qemu_io(&c.vm(), "write -P 0x21 0 16M");
        c.ok("primary.qmp", "checkpoint");
        qemu_io(&c.vm(), "write -P 0x22 64M 8M");
        qemu_io(&c.view(), "write -P 0x5c 8M 192M");
        let mut expected = read_export(&c.view(), c.dir.path(), "view.raw");
        drop(c.primary.take());
        let mut failover = c.ctl_spawn("secondary.qmp", "failover");
        for _ in 0..500 {
            if c.status("secondary.qmp")["disks"][0]["stage"] != "running" {
                break;
            }
        }
        // Into the merging view: at 100 MiB, held by the active overlay until merged.
        qemu_io(&c.view(), "write -P 0x6d 100M 1M");
        expected[(100 * MIB) as usize..(101 * MIB) as usize].fill(0x6d);
        signal(&c.secondary, "KILL");
        let _ = c.secondary.child.wait();
        let _ = failover.wait();
        for f in ["replica.sock", "top.sock", "secondary.qmp"] {
            let _ = std::fs::remove_file(c.p(f));
        }
        let state = c.p("secondary.raw.coloblk");
        if let Some(record) = replication::state::read_checked(&state, "merge").unwrap() {
            // As if the host had restarted since (another boot id in the record): refused as
            // half-merged, nothing served.
            let boot = replication::state::boot_id().unwrap();
            let nl = record.iter().position(|&b| b == b'\n').unwrap();
            let head = std::str::from_utf8(&record[..nl]).unwrap();
            assert!(head.contains(&boot), "the record names the boot: {head}");
            let mut other = head.replacen(&boot, "another-boot", 1).into_bytes();
            other.extend_from_slice(&record[nl..]);
            replication::state::write_atomic(&state, "merge", &other).unwrap();
            let out = secondary_command(c.dir.path(), "secondary.raw", "", &["--start"])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(
                err.contains("another boot of this host") && err.contains("half-merged"),
                "{err}"
            );
            assert!(!c.p("top.sock").exists(), "nothing is served");
            replication::state::write_atomic(&state, "merge", &record).unwrap();
        }
        c.secondary = spawn_secondary(c.dir.path(), &["--start"]);
        let st = c.status("secondary.qmp");
        let resumed = st["disks"][0]["failover"]["resumed"] == true;
        for _ in 0..400 {
            let s = std::fs::read_to_string(state.join("state")).unwrap();
            if s.contains("\"merging\": false") && !state.join("merge").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let st = c.status("secondary.qmp");
        assert_eq!(st["disks"][0]["stage"], "done", "{st}");
        assert!(
            !state.join("merge").exists(),
            "the record outlived the merge"
        );
        let disk = std::fs::read(c.p("secondary.raw")).unwrap();
        assert_eq!(
            first_difference(&disk, &expected),
            None,
            "attempt {attempt} (resumed: {resumed}): the disk is not the promised view"
        );
        if !resumed {
            continue;
        }
        // Served plain now: a VM write lands on the disk.
        qemu_io(&c.view(), "write -P 0x7e 0 64k");
        let disk = std::fs::read(c.p("secondary.raw")).unwrap();
        assert!(disk[..65536].iter().all(|&b| b == 0x7e));
        return;
    }
    panic!("in 3 attempts the merge always finished before the kill");
}

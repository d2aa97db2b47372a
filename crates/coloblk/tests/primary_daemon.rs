//! `coloblk primary` as a real process: forwarding into qemu-nbd (interop), the control socket
//! driven by python's qemu.qmp and by `coloblk ctl`, a secondary killed under fio load, the
//! metrics endpoint, and refusals at startup.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// A qemu-nbd secondary and a `coloblk primary` forwarding to it.
struct Pair {
    dir: tempfile::TempDir,
    secondary: Proc,
    primary: Proc,
}

impl Pair {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn export(&self) -> String {
        unix_uri("vm0", &self.path("primary.sock"))
    }
    fn qmp(&self) -> String {
        format!("unix:{}", self.path("primary.qmp").display())
    }
}

fn qemu_nbd_secondary(dir: &Path, len: u64) -> Proc {
    let img = raw_image(dir, "secondary.raw", len);
    qemu_nbd(&dir.join("secondary.sock"), &img)
}

/// qemu-nbd serving `img` as export vm0 on `sock`, listening.
fn qemu_nbd(sock: &Path, img: &Path) -> Proc {
    require("qemu-nbd");
    let mut p = Proc::spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-x", "vm0", "-k"])
            .arg(sock)
            .arg(img),
    );
    wait_socket(sock, &mut p);
    p
}

/// `coloblk primary` in `dir` with one disk (`disk`: the whole spec), its VM export and
/// control socket named `export` and `control` there, listening on both.
fn start_primary(
    dir: &Path,
    (export, control): (&str, &str),
    disk: String,
    extra: &[&str],
) -> Proc {
    let mut cmd = coloblk();
    cmd.args(["primary", "--disk", &disk])
        .arg("--export-listen")
        .arg(format!("unix:{}", dir.join(export).display()))
        .arg("--control")
        .arg(format!("unix:{}", dir.join(control).display()))
        .args(extra);
    let mut primary = Proc::spawn("coloblk primary", &mut cmd);
    wait_socket(&dir.join(export), &mut primary);
    wait_socket(&dir.join(control), &mut primary);
    primary
}

/// A primary over a fresh image forwarding to qemu-nbd over another fresh image: the disks are
/// identical, so the primary is told so (`sync=none`) unless `disk_options` say otherwise.
fn pair(extra: &[&str]) -> Pair {
    pair_with(",sync=none", extra)
}

fn pair_with(disk_options: &str, extra: &[&str]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let secondary = qemu_nbd_secondary(dir.path(), 64 * MIB);
    let img = raw_image(dir.path(), "primary.raw", 64 * MIB);
    let d = dir.path();
    let disk = format!(
        "vm0={},replica=nbd+unix:///vm0?socket={}{disk_options}",
        img.display(),
        d.join("secondary.sock").display()
    );
    let primary = start_primary(d, ("primary.sock", "primary.qmp"), disk, extra);
    Pair {
        dir,
        secondary,
        primary,
    }
}

fn ctl(qmp: &str, action: &[&str]) -> std::process::Output {
    coloblk()
        .args(["ctl", "--control", qmp])
        .args(action)
        .output()
        .unwrap()
}

fn status(p: &Pair) -> serde_json::Value {
    let out = run(coloblk().args(["ctl", "--json", "--control", &p.qmp(), "status"]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Interop: our primary forwarding into a qemu-nbd export; writes made before start are dirty,
/// the resync sends them after start, and only then is a checkpoint accepted: afterwards the
/// two images are identical (before, the checkpoint said yes while the first MiB differed).
#[test]
fn primary_forwards_into_qemu_nbd_and_checkpoint_makes_the_images_equal() {
    require("qemu-io");
    let p = pair(&[]);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 1M"])
        .arg(p.export()));
    let st = status(&p);
    assert_eq!(st["disks"][0]["stage"], "none");
    assert_eq!(
        st["disks"][0]["dirty-bytes"], MIB,
        "the write before start is dirty"
    );
    // Until start nothing may be called a checkpoint.
    let out = ctl(&p.qmp(), &["checkpoint"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "coloblk ctl: disk 'vm0': checkpoint refused: replication is not running (stage none); \
         start it first"
    );
    let out = ctl(&p.qmp(), &["start"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x22 1M 3M",
            "-c",
            "write -z 2M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "write -P 0x33 1000 5000",
        ])
        .arg(p.export()));
    let st = wait_protected(&p.qmp());
    assert_eq!(st["disks"][0]["resync"]["done-bytes"], MIB);
    assert_eq!(st["disks"][0]["resync"]["sent-bytes"], MIB);
    let out = ctl(&p.qmp(), &["checkpoint"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("checkpoint done: drain "));
    let a = std::fs::read(p.path("primary.raw")).unwrap();
    let b = std::fs::read(p.path("secondary.raw")).unwrap();
    let first_diff = (0..a.len()).find(|&i| a[i] != b[i]);
    assert_eq!(first_diff, None, "the images differ after a checkpoint");
    assert_eq!(b[..1000], [0x11u8; 1000]);
    assert!(b[1000..6000].iter().all(|&x| x == 0x33));
    // The discard reads back as zeroes on both sides (the primary sends it as write-zeroes
    // with unmap, because a discard's content is the one thing the two sides could disagree on).
    assert!(
        b[3 * MIB as usize..3 * MIB as usize + 65536]
            .iter()
            .all(|&x| x == 0)
    );
    let st = status(&p);
    assert_eq!(st["disks"][0]["stage"], "running");
    assert_eq!(st["disks"][0]["forward-errors"], 0);
    assert_eq!(st["disks"][0]["dirty-bytes"], 0);
}

/// A primary that knows nothing of its secondary (the default, `sync=full`) copies the whole
/// disk before it calls itself protected: data as writes, holes as write-zeroes (so a sparse
/// disk costs about what it holds), and a secondary that held other bytes ends equal.
#[test]
fn the_default_full_sync_makes_a_different_secondary_equal_and_sends_only_data() {
    let p = pair_with("", &["--start"]);
    let st = wait_protected(&p.qmp());
    let a = std::fs::read(p.path("primary.raw")).unwrap();
    assert!(a == std::fs::read(p.path("secondary.raw")).unwrap());
    assert_eq!(st["disks"][0]["sync"], "full");
    assert_eq!(st["disks"][0]["resync"]["done-bytes"], 64 * MIB);
    assert_eq!(
        st["disks"][0]["resync"]["sent-bytes"], 0,
        "an empty disk is all holes"
    );
    drop(p);

    // Now a secondary holding garbage where the primary holds data and where it holds holes.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sec = raw_image(d, "other.raw", 64 * MIB);
    let garbage = pattern(7, 3 * MIB as usize);
    std::fs::write(
        &sec,
        [&garbage[..], &vec![0u8; 61 * MIB as usize][..]].concat(),
    )
    .unwrap();
    let pri = raw_image(d, "primary.raw", 64 * MIB);
    let data = pattern(8, MIB as usize);
    let mut f = std::fs::OpenOptions::new().write(true).open(&pri).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(2 * MIB)).unwrap();
    std::io::Write::write_all(&mut f, &data).unwrap();
    drop(f);
    let sock = d.join("other.sock");
    let _peer = qemu_nbd(&sock, &sec);
    let qmp = format!("unix:{}", d.join("p.qmp").display());
    let disk = format!("vm0={},replica={}", pri.display(), unix_uri("vm0", &sock));
    let _primary = start_primary(d, ("p.nbd", "p.qmp"), disk, &["--start"]);
    let st = wait_protected(&qmp);
    assert!(
        std::fs::read(&pri).unwrap() == std::fs::read(&sec).unwrap(),
        "the full sync left the disks different"
    );
    // The one MiB of data (plus at most a file-system block around it) went as payload.
    let sent = st["disks"][0]["resync"]["sent-bytes"].as_u64().unwrap();
    assert!((MIB..=MIB + 65536).contains(&sent), "sent {sent} bytes");
}

/// Python's qemu.qmp library works as a client: negotiation, commands with results and with
/// errors (class and description), and a second client at the same time.
#[test]
fn python_qemu_qmp_drives_the_control_socket() {
    let p = pair(&["--start"]);
    let script = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError
async def main(path):
    a, b = QMPClient("a"), QMPClient("b")
    await a.connect(path)
    await b.connect(path)
    st = await a.execute("query-replication")
    assert st["role"] == "primary" and st["disks"][0]["stage"] == "running", st
    cp = await b.execute("replication-checkpoint")
    assert cp["drain-ms"] >= 0, cp
    assert (await a.execute("query-xen-replication-status")) == {"error": False}
    try:
        await a.execute("no-such-command")
        raise SystemExit("unknown command accepted")
    except ExecuteError as e:
        assert e.error.error.class_ == "CommandNotFound", e.error.error.class_
        assert e.error.error.desc == "The command no-such-command has not been found", e.error.error.desc
    try:
        await a.execute("xen-set-replication", {"enable": True, "primary": True, "failover": True})
        raise SystemExit("failover with enable accepted")
    except ExecuteError as e:
        assert e.error.error.class_ == "GenericError"
        assert e.error.error.desc == "Parameter 'failover' is only for stopping replication", e.error.error.desc
    await a.disconnect()
    await b.disconnect()
    print("qemu.qmp ok")
asyncio.run(main(sys.argv[1]))
"#;
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(p.path("primary.qmp")));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "qemu.qmp ok");
}

/// Malformed JSON and bad envelopes get QMP errors and the same connection goes on.
#[test]
fn malformed_control_input_gets_errors_not_a_crash() {
    use std::io::{BufRead, BufReader, Write};
    let p = pair(&[]);
    let s = std::os::unix::net::UnixStream::connect(p.path("primary.qmp")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    // The next reply; events (the link coming up, whenever it does) are not replies.
    let mut next = |r: &mut BufReader<_>| loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let v = serde_json::from_str::<serde_json::Value>(&line).unwrap();
        if v.get("event").is_none() {
            return v;
        }
    };
    assert!(next(&mut r)["QMP"].is_object());
    for (input, class, desc) in [
        (
            "{\"execute\": \"query-replication\"}\n",
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        ),
        ("{\"execute\": \"qmp_capabilities\"}\n", "", ""),
        ("{\"execute\": oops}\n", "GenericError", "JSON parse error"),
        (
            "[1, 2]\n",
            "GenericError",
            "QMP input must be a JSON object",
        ),
        (
            "{\"arguments\": {}}\n",
            "GenericError",
            "QMP input lacks member 'execute'",
        ),
        (
            "{\"execute\": \"replication-start\", \"arguments\": {\"x\": 1}}\n",
            "GenericError",
            "Parameter 'x' is unexpected",
        ),
        (
            "{\"execute\": \"xen-set-replication\", \"arguments\": {\"enable\": \"yes\", \"primary\": true}}\n",
            "GenericError",
            "Invalid parameter type for 'enable', expected: boolean",
        ),
        (
            "{\"execute\": \"replication-stop\", \"id\": \"x1\"}\n",
            "GenericError",
            "Block replication is not running",
        ),
    ] {
        w.write_all(input.as_bytes()).unwrap();
        let v = next(&mut r);
        if class.is_empty() {
            assert_eq!(v, serde_json::json!({"return": {}}), "{input}");
        } else {
            assert_eq!(v["error"]["class"], class, "{input}: {v}");
            assert!(
                v["error"]["desc"].as_str().unwrap().starts_with(desc),
                "{input}: {v}"
            );
        }
    }
    w.write_all(b"{\"execute\": \"query-replication\", \"id\": 42}\n")
        .unwrap();
    let v = next(&mut r);
    assert_eq!(v["id"], 42);
    assert_eq!(v["return"]["role"], "primary");
}

/// A secondary that stops answering (SIGSTOP: the socket stays open) is given up on after
/// `--link-timeout` by the NBD client's own timer, which closes the connection, so no request
/// is left pending on it; the VM's writes go on at local speed meanwhile.
#[test]
fn a_silent_secondary_is_given_up_on_after_the_link_timeout() {
    require("qemu-io");
    let p = pair(&["--start", "--link-timeout", "1"]);
    let write = |offset: u64| {
        let cmd = format!("write -P 0x5a {offset} 4k");
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &cmd])
            .arg(p.export()));
    };
    write(0);
    // Acknowledged by the secondary before it stops (async mode: the VM's write returns first).
    let drained = ctl(&p.qmp(), &["checkpoint"]);
    assert!(drained.status.success(), "{drained:?}");
    let pid = p.secondary.child.id().to_string();
    run(Command::new("kill").args(["-STOP", &pid]));
    let stopped = Instant::now();
    write(65536);
    assert!(
        stopped.elapsed() < Duration::from_millis(900),
        "the VM waited for the secondary"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let d = loop {
        let s = status(&p);
        let d = s["disks"][0].clone();
        if d["link-up"] == false || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert_eq!(d["link-up"], false, "{d}");
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let error = d["error"].as_str().unwrap_or_default();
    assert!(error.contains("got no reply within 1s"), "{error}");
    assert_eq!(d["dirty-bytes"], 65536, "{d}");
}

/// kill -9 of the secondary under fio load: the VM's writes keep succeeding, the error shows
/// in status and events, the next checkpoint is refused, and dirty bytes grow.
#[test]
fn killing_the_secondary_under_fio_load_keeps_the_vm_writing() {
    require("fio");
    let mut p = pair(&["--start", "--link-timeout", "2"]);
    let export = p.export();
    let fio = |secs: u32| {
        Command::new("fio")
            .args([
                "--name=load",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=64M",
            ])
            .args([
                "--time_based",
                &format!("--runtime={secs}"),
                "--output-format=json",
            ])
            .arg(format!("--uri={export}"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut load = fio(4);
    std::thread::sleep(Duration::from_millis(1000));
    let _ = p.secondary.child.kill();
    let _ = p.secondary.child.wait();
    let killed = Instant::now();
    let st = load.wait().unwrap();
    assert!(st.success(), "fio failed: the VM saw errors");
    assert!(killed.elapsed() < Duration::from_secs(10));
    let s1 = status(&p);
    let d = &s1["disks"][0];
    assert_eq!(d["link-up"], false, "{s1}");
    assert!(d["error"].as_str().is_some(), "{s1}");
    let dirty1 = d["dirty-bytes"].as_u64().unwrap();
    assert!(dirty1 > 0, "{s1}");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import asyncio, sys
from qemu.qmp import QMPClient
async def main(p):
    c = QMPClient("x"); await c.connect(p)
    print((await c.execute("query-xen-replication-status"))["desc"])
asyncio.run(main(sys.argv[1]))"#,
        )
        .arg(p.path("primary.qmp"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "I/O error occurred"
    );
    let out = ctl(&p.qmp(), &["checkpoint"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checkpoint refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // More writes at local speed: dirty grows.
    assert!(fio(1).wait().unwrap().success());
    let dirty2 = status(&p)["disks"][0]["dirty-bytes"].as_u64().unwrap();
    assert!(dirty2 >= dirty1, "dirty went from {dirty1} to {dirty2}");
    p.primary.signal("TERM");
    assert!(p.primary.wait_exit(Duration::from_secs(20)).success());
}

/// The Prometheus endpoint serves our counters.
#[test]
fn metrics_endpoint_serves_forwarding_counters() {
    require("qemu-io");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = pair(&["--start", "--metrics", &format!("tcp:127.0.0.1:{port}")]);
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 1 0 256k",
            "-c",
            "write -P 2 1M 256k",
        ])
        .arg(p.export()));
    assert!(ctl(&p.qmp(), &["checkpoint"]).status.success());
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("coloblk_forwarded_bytes_total{disk=\"vm0\"} 524288"),
        "{body}"
    );
    assert!(
        body.contains("coloblk_forwarded_writes_total{disk=\"vm0\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("coloblk_checkpoint_drain_seconds_count 1"),
        "{body}"
    );
    assert!(
        body.contains("coloblk_replication_error{disk=\"vm0\"} 0"),
        "{body}"
    );
    assert!(body.contains("coloblk_protected{disk=\"vm0\"} 1"), "{body}");
    assert!(
        body.contains("coloblk_dirty_bytes{disk=\"vm0\"} 0"),
        "{body}"
    );
}

/// Startup refusals: one clear line and a failing exit code, for an unreachable secondary,
/// disks of different lengths, a missing image and a missing replica URI.
#[test]
fn bad_startups_are_refused_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = raw_image(d, "p.raw", 8 * MIB);
    let run_primary = |disk: String| {
        let out = coloblk()
            .args(["primary", "--disk", &disk, "--export-listen"])
            .arg(format!("unix:{}", d.join("x.sock").display()))
            .arg("--control")
            .arg(format!("unix:{}", d.join("x.qmp").display()))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };
    let (code, err) = run_primary(format!(
        "vm0={}/none.raw,replica=nbd://127.0.0.1:1/x",
        d.display()
    ));
    assert_eq!(code, Some(1));
    assert!(err.contains("disk 'vm0': cannot open"), "{err}");
    // Mistakes in the command line exit 2 and show the primary's own syntax.
    let (code, err) = run_primary(format!("vm0={}", img.display()));
    assert_eq!(code, Some(2));
    assert!(
        err.contains(
            "missing replica=NBD-URI (the secondary's replica export); a primary disk is \
             NAME=PATH[,format=raw|qcow2][,direct],replica=NBD-URI[,sync=checksum|full|none]"
        ),
        "{err}"
    );
    let (code, err) = run_primary(format!("vm0={},replica", img.display()));
    assert_eq!(code, Some(2));
    assert!(err.contains("option 'replica' needs a value"), "{err}");
    // An nbds:// replica needs credentials, said at start rather than by a link that never
    // comes up.
    let (code, err) = run_primary(format!("vm0={},replica=nbds://h:1/vm0", img.display()));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("disk 'vm0': nbds://h:1/vm0 asks for TLS: give --tls-creds DIR"),
        "{err}"
    );

    let out = coloblk()
        .args([
            "ctl",
            "--control",
            &format!("unix:{}/nothing.qmp", d.display()),
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

/// A secondary control socket that accepts and never greets is given up on after
/// `--peer-timeout`, naming the step: the link keeper says so in the status and retries, and a
/// checkpoint is refused at once instead of hanging (before: over 90 s).
#[test]
fn a_silent_peer_control_socket_fails_the_checkpoint_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent.qmp");
    let listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    // Accepts and holds every connection, never writing a byte.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let peer = format!("unix:{}", silent.display());
    let p = pair(&["--start", "--peer-control", &peer, "--peer-timeout", "1"]);
    let want = format!("no QMP greeting from the secondary's control socket {peer} within 1s");
    let t = Instant::now();
    loop {
        let st = status(&p);
        if st["disks"][0]["link-error"] == want.as_str() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(8), "{st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let out = ctl(&p.qmp(), &["checkpoint"]);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "coloblk ctl: disk 'vm0': checkpoint refused: the secondary link is down; the secondary \
         may be missing writes"
    );
}

/// A primary whose secondary is unreachable starts all the same (degraded): the VM writes, the
/// status says why the link is down, a checkpoint is refused; when a secondary appears the
/// primary connects by itself, syncs, and the checkpoint then means equal disks. A secondary
/// of the wrong size is named in the status, not connected.
#[test]
fn a_primary_starts_degraded_and_connects_when_the_secondary_comes() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = raw_image(d, "primary.raw", 16 * MIB);
    let sock = d.join("secondary.sock");
    let qmp = format!("unix:{}", d.join("p.qmp").display());
    let disk = format!("vm0={},replica={}", img.display(), unix_uri("vm0", &sock));
    let _primary = start_primary(d, ("p.nbd", "p.qmp"), disk, &["--start"]);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x41 1M 1M"])
        .arg(unix_uri("vm0", &d.join("p.nbd"))));
    let out = run(coloblk().args(["ctl", "--json", "--control", &qmp, "status"]));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let disk = &st["disks"][0];
    assert_eq!(disk["stage"], "running");
    assert_eq!(disk["link"], "connecting");
    assert_eq!(disk["protected"], false);
    assert!(
        disk["link-error"]
            .as_str()
            .unwrap()
            .starts_with("cannot reach the secondary at nbd+unix:///vm0?socket="),
        "{disk}"
    );
    // An orchestrator waiting for protection hears why it does not come.
    let out = ctl(&qmp, &["--timeout", "0.5", "wait-protected"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("coloblk ctl: not protected after 500ms: disk 'vm0': unsynced (cannot reach the secondary at"),
        "{err}"
    );
    let out = ctl(&qmp, &["checkpoint"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the secondary link is down"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A secondary of another size: named, not connected.
    let wrong = raw_image(d, "wrong.raw", 32 * MIB);
    let peer = qemu_nbd(&sock, &wrong);
    let t = Instant::now();
    loop {
        let out = run(coloblk().args(["ctl", "--json", "--control", &qmp, "status"]));
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let e = st["disks"][0]["link-error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if e.contains("disk lengths differ") {
            assert_eq!(
                e,
                format!(
                    "disk lengths differ: the primary disk has {} bytes, the secondary {}",
                    16 * MIB,
                    32 * MIB
                )
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(peer);
    let _ = std::fs::remove_file(&sock);

    // The right secondary: the primary connects by itself and copies everything.
    let sec = raw_image(d, "secondary.raw", 16 * MIB);
    let _peer = qemu_nbd(&sock, &sec);
    let out = ctl(&qmp, &["--timeout", "30", "wait-protected"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = wait_protected(&qmp);
    assert_eq!(st["disks"][0]["link"], "up");
    assert_eq!(st["disks"][0]["peer-verified"], false);
    let out = ctl(&qmp, &["checkpoint"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&sec).unwrap());
}

/// A checkpoint before the sync ends is refused and names the bytes left; the sync keeps to
/// --resync-rate meanwhile.
#[test]
fn a_checkpoint_during_the_sync_is_refused_with_the_bytes_left() {
    require("qemu-io");
    let p = pair(&["--resync-rate", "1"]);
    // Written before start: 8 MiB the resync must copy, at 1 MiB/s.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 8M"])
        .arg(p.export()));
    let out = ctl(&p.qmp(), &["start"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&p.qmp(), &["checkpoint"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let left: u64 = err
        .strip_prefix("coloblk ctl: disk 'vm0': checkpoint refused: ")
        .and_then(|r| {
            r.strip_suffix(" bytes are not yet on the secondary (the resync is copying them)")
        })
        .unwrap_or_else(|| panic!("{err}"))
        .parse()
        .unwrap();
    assert!(left > 0 && left <= 8 * MIB, "{left}");
    let st = status(&p);
    assert_eq!(st["disks"][0]["resync"]["active"], true);
}

/// `replication-set-replica` points a disk at another secondary: the link moves, the new
/// secondary gets the whole disk (it is unknown), and a checkpoint then means it is equal.
#[test]
fn set_replica_moves_a_disk_to_another_secondary() {
    require("qemu-io");
    let p = pair(&["--start"]);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x6b 2M 3M"])
        .arg(p.export()));
    let d = p.dir.path();
    let other = raw_image(d, "other.raw", 64 * MIB);
    let sock = d.join("other.sock");
    let _peer = qemu_nbd(&sock, &other);
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import asyncio, sys
from qemu.qmp import QMPClient
async def main(p, uri):
    c = QMPClient("x"); await c.connect(p)
    print(await c.execute("replication-set-replica", {"disk": "vm0", "uri": uri}))
asyncio.run(main(sys.argv[1], sys.argv[2]))"#,
        )
        .arg(d.join("primary.qmp"))
        .arg(unix_uri("vm0", &sock)));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{}");
    let st = wait_protected(&p.qmp());
    assert_eq!(st["disks"][0]["resync"]["done-bytes"], 64 * MIB);
    let out = ctl(&p.qmp(), &["checkpoint"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(p.path("primary.raw")).unwrap() == std::fs::read(&other).unwrap());
}

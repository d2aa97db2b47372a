//! Shared helpers for the end-to-end tests: start our binary and real peers, wait for their
//! sockets, run tools and check their exit status, and clean up every process on drop.

#![allow(dead_code)]

pub mod qemu;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `coloblk` binary under test.
pub fn coloblk() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_coloblk"));
    // Daemons' info logs would drown the test output; warnings and errors still show.
    c.env(
        "RUST_LOG",
        std::env::var("COLOBLK_TEST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    c
}

/// Is `tool` on PATH? The test script installs every peer, so a missing one is a setup bug:
/// tests fail loudly unless COLOBLK_ALLOW_MISSING_PEERS is set.
pub fn require(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found && std::env::var_os("COLOBLK_ALLOW_MISSING_PEERS").is_none() {
        panic!("{tool} is not installed; run scripts/test, which installs the test peers");
    }
    found
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (by number) to the process.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {} failed", self.name);
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "{} did not exit within {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `path` exists and accepts connections.
pub fn wait_socket(path: &Path, proc_: &mut Proc) {
    let start = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        if let Some(st) = proc_.child.try_wait().unwrap() {
            panic!(
                "{} exited with {st} before listening on {}",
                proc_.name,
                path.display()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never listened",
            proc_.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command, asserts success, returns its output.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// The NBD URI of export `name` on unix socket `sock`.
pub fn unix_uri(name: &str, sock: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// A sparse raw file of `len` bytes.
pub fn raw_image(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

/// `coloblk serve` on a unix socket in `dir`, already listening.
pub struct Served {
    pub proc_: Proc,
    pub sock: PathBuf,
}

pub fn serve(dir: &Path, exports: &[&str]) -> Served {
    let sock = dir.join("coloblk.sock");
    let mut cmd = coloblk();
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()));
    for e in exports {
        cmd.arg("--export").arg(e);
    }
    let mut proc_ = Proc::spawn("coloblk serve", &mut cmd);
    wait_socket(&sock, &mut proc_);
    Served { proc_, sock }
}

/// `coloblk primary` over `disk` in `mode`, forwarding to the export `vm0` on the unix socket
/// `replica`, serving the VM at the address `export` (`unix:PATH`, `vhost-user:PATH`) and
/// control at `control`, checkpointing the secondary
/// through its control socket `peer`; started, returned once its control socket listens.
pub fn spawn_primary(
    disk: &Path,
    replica: &Path,
    (export, control): (&str, &Path),
    peer: &Path,
    mode: &str,
) -> Proc {
    spawn_primary_with(disk, replica, (export, control), peer, mode, &[])
}

/// [`spawn_primary`] with `extra` options on its command line.
pub fn spawn_primary_with(
    disk: &Path,
    replica: &Path,
    (export, control): (&str, &Path),
    peer: &Path,
    mode: &str,
    extra: &[&str],
) -> Proc {
    let unix = |p: &Path| format!("unix:{}", p.display());
    let mut p = Proc::spawn(
        "coloblk primary",
        coloblk()
            .args(["primary", "--disk"])
            .arg(format!(
                "vm0={},replica=nbd+unix:///vm0?socket={}",
                disk.display(),
                replica.display()
            ))
            .args(["--export-listen", export])
            .args(["--control", &unix(control)])
            .args(["--peer-control", &unix(peer)])
            .args(["--mode", mode, "--start"])
            .args(extra),
    );
    wait_socket(control, &mut p);
    p
}

/// A secondary over `disk` in `dir` (or at `disk`, an absolute path), its sockets and buffer named with `tag` (`TAGreplica.sock`,
/// `TAGtop.sock`, `TAGsecondary.qmp`, `TAGbuffer`), listening.
pub fn spawn_secondary_named(dir: &Path, disk: &str, tag: &str, extra: &[&str]) -> Proc {
    let mut s = Proc::spawn(
        "coloblk secondary",
        &mut secondary_command(dir, disk, tag, extra),
    );
    wait_socket(&dir.join(format!("{tag}secondary.qmp")), &mut s);
    s
}

/// The command line of [`spawn_secondary_named`].
pub fn secondary_command(dir: &Path, disk: &str, tag: &str, extra: &[&str]) -> Command {
    let u = |n: &str| format!("unix:{}", dir.join(format!("{tag}{n}")).display());
    let mut c = coloblk();
    c.args(["secondary", "--disk"])
        .arg(format!("vm0={}", dir.join(disk).display()))
        .args(["--replica-listen", &u("replica.sock")])
        .args(["--export-listen", &u("top.sock")])
        .args(["--control", &u("secondary.qmp"), "--buffer-dir"])
        .arg(dir.join(format!("{tag}buffer")))
        .args(extra);
    c
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no rand crate.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    testutil::pattern(seed, len).to_vec()
}

/// Waits until every disk of the primary behind control socket `qmp` (`unix:PATH`) is
/// protected (its first sync done); returns that status.
#[allow(dead_code)]
pub fn wait_protected(qmp: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let out = run(coloblk().args(["ctl", "--json", "--control", qmp, "status"]));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let disks = status["disks"].as_array().expect("a disks array");
        if disks.iter().all(|d| d["protected"] == true) {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never protected: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Runs one QMP command on the unix socket at `path` (`args`: a JSON object) and returns
/// `return: JSON` or `error: DESC`, skipping events.
#[allow(dead_code)]
pub fn qmp_execute(path: &Path, command: &str, args: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut next = || loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("event").is_none() {
            return v;
        }
    };
    next(); // the greeting
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    next();
    writeln!(writer, r#"{{"execute": "{command}", "arguments": {args}}}"#).unwrap();
    let v = next();
    match v.get("return") {
        Some(r) => format!("return: {r}"),
        None => format!("error: {}", v["error"]["desc"].as_str().unwrap_or("?")),
    }
}

/// Sends signal `sig` (a name, e.g. TERM) to a process.
#[allow(dead_code)]
pub fn signal(p: &Proc, sig: &str) {
    run(Command::new("kill").args([&format!("-{sig}"), &p.child.id().to_string()]));
}

/// Runs one qemu-io command on `uri` (an NBD URI), asserting success.
#[allow(dead_code)]
pub fn qemu_io(uri: &str, cmd: &str) {
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd])
        .arg(uri));
}

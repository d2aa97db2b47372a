//! `coloblk ctl` against control sockets that misbehave: silent, not QMP, absent, slow to
//! answer, refusing. Each must end in the exit code the help promises, with a message that
//! says what is wrong, and never hang (issue 15 item 7).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, coloblk};
use serde_json::{Value, json};

const GREETING: &str = r#"{"QMP": {"version": {}, "capabilities": []}}"#;

/// A fake daemon on a unix socket in its own directory. `serve` runs on each accepted
/// connection in its own thread; the threads end with the test process.
struct Fake {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Fake {
    fn new(serve: fn(UnixStream)) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.qmp");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let s = s.unwrap();
                std::thread::spawn(move || serve(s));
            }
        });
        Fake { _dir: dir, path }
    }

    fn addr(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

/// Holds the connection open without writing a byte.
fn silent(s: UnixStream) {
    std::thread::sleep(Duration::from_secs(600));
    drop(s);
}

/// Greets, accepts capabilities, then answers each command with `reply(name)`, or never
/// when it is `None`.
fn qmp_like(s: UnixStream, reply: fn(&str) -> Option<Value>) {
    let mut w = s.try_clone().unwrap();
    writeln!(w, "{GREETING}").unwrap();
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        let req: Value = serde_json::from_str(&line).unwrap();
        let name = req["execute"].as_str().unwrap_or("");
        let answer = if name == "qmp_capabilities" {
            Some(json!({"return": {}}))
        } else {
            reply(name)
        };
        match answer {
            Some(mut a) => {
                a["id"] = req["id"].clone();
                writeln!(w, "{a}").unwrap();
            }
            None => silent(w.try_clone().unwrap()),
        }
    }
}

/// Runs ctl, killed after 30 s so that a hang fails the test instead of stalling it.
fn ctl(addr: &str, extra: &[&str], action: &str) -> Output {
    let mut cmd = coloblk();
    cmd.args(["ctl", "--control", addr])
        .args(extra)
        .arg(action)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc::spawn("coloblk ctl", &mut cmd);
    let status = p.wait_exit(Duration::from_secs(30));
    let take = |r: &mut dyn Read| {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    };
    let stdout = take(p.child.stdout.as_mut().unwrap());
    let stderr = take(p.child.stderr.as_mut().unwrap());
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Runs ctl and checks its exit code, that stderr contains `says`, and that it took less
/// than `within`; returns stderr.
fn expect(addr: &str, extra: &[&str], action: &str, code: i32, says: &str, within: u64) -> String {
    let t = Instant::now();
    let out = ctl(addr, extra, action);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{action} {extra:?}: stderr: {err}"
    );
    assert!(err.contains(says), "{action} {extra:?}: stderr: {err}");
    assert!(took < Duration::from_secs(within), "{action} took {took:?}");
    err
}

#[test]
fn status_on_a_socket_that_never_greets_exits_3_after_the_default_timeout() {
    let fake = Fake::new(silent);
    let says = format!("no QMP greeting from {} within 10s", fake.addr());
    expect(&fake.addr(), &[], "status", 3, &says, 20);
}

#[test]
fn timeout_option_bounds_the_wait_for_a_greeting() {
    let fake = Fake::new(silent);
    let says = format!("no QMP greeting from {} within 1s", fake.addr());
    expect(&fake.addr(), &["--timeout", "1"], "status", 3, &says, 5);
}

#[test]
fn a_missing_socket_exits_3_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix:{}", dir.path().join("absent.qmp").display());
    let says = format!("cannot connect to {addr}: ");
    expect(&addr, &[], "status", 3, &says, 5);
}

#[test]
fn a_socket_that_is_not_qmp_exits_3() {
    let fake = Fake::new(|mut s| {
        let _ = writeln!(s, "SSH-2.0-OpenSSH_9.6");
        silent(s);
    });
    expect(&fake.addr(), &[], "status", 3, "does not speak QMP", 5);
}

#[test]
fn a_status_reply_that_never_comes_exits_1_within_the_timeout() {
    let fake = Fake::new(|s| qmp_like(s, |_| None));
    let says = "no reply to query-replication within 1s";
    expect(&fake.addr(), &["--timeout", "1"], "status", 1, says, 5);
}

#[test]
fn a_checkpoint_reply_that_never_comes_exits_1_and_says_it_may_still_happen() {
    let fake = Fake::new(|s| qmp_like(s, |_| None));
    let says = "no reply to replication-checkpoint within 1s: the daemon may still complete it";
    let extra = ["--command-timeout", "1"];
    expect(&fake.addr(), &extra, "checkpoint", 1, says, 5);
}

#[test]
fn a_refusal_exits_1_and_prints_the_daemons_description() {
    let fake = Fake::new(|s| {
        qmp_like(s, |_| {
            Some(json!({"error": {"class": "GenericError",
                "desc": "disk 'vm0': link to the secondary is down: checkpoint refused"}}))
        })
    });
    let says = "coloblk ctl: disk 'vm0': link to the secondary is down: checkpoint refused\n";
    for action in ["status", "checkpoint", "start", "stop", "failover"] {
        let err = expect(&fake.addr(), &[], action, 1, says, 5);
        // Exactly the daemon's words, nothing wrapped around them.
        assert_eq!(err, says, "{action}");
    }
}

#[test]
fn a_done_command_exits_0() {
    let fake = Fake::new(|s| qmp_like(s, |_| Some(json!({"return": {}}))));
    let out = ctl(&fake.addr(), &[], "stop");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "replication-stop: done\n"
    );
}

#[test]
fn a_timeout_that_is_not_a_positive_number_is_a_usage_error() {
    for bad in ["0", "-1", "soon", "inf"] {
        let arg = format!("--timeout={bad}");
        expect(
            "unix:/nonexistent",
            &[&arg],
            "status",
            2,
            "--timeout <SECONDS>",
            5,
        );
    }
}

//! The daemons with `--tls-creds`: a primary replicating to a secondary over `nbds://` with
//! its `--peer-control` over TLS on TCP, `coloblk ctl --tls-creds` and python's qemu.qmp
//! (`ssl=`) driving the secondary's TLS control socket, and what is refused: a plain client on
//! the replica or control port, a client not in the authz list.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use testutil::tls::{TestCa, Validity, dn, write_creds};

const MIB: u64 = 1 << 20;
const DISK: u64 = 8 * MIB;

/// A secondary with TLS on TCP (replica and control), authz: the primary's client certificate.
struct Secure {
    dir: tempfile::TempDir,
    ca: TestCa,
    creds: PathBuf,
    replica_port: u16,
    control_port: u16,
    _secondary: Proc,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_tcp(port: u16, p: &mut Proc) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(p.child.try_wait().unwrap().is_none(), "{} exited", p.name);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never listened",
            p.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Secure {
    fn start() -> Secure {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("coloblk test CA");
        let creds = ca.creds(&dir.path().join("creds"), "server", "client");
        let (replica_port, control_port) = (free_port(), free_port());
        raw_image(dir.path(), "secondary.raw", DISK);
        let mut s = Proc::spawn(
            "coloblk secondary",
            coloblk()
                .args(["secondary", "--disk"])
                .arg(format!(
                    "vm0={}",
                    dir.path().join("secondary.raw").display()
                ))
                .args(["--replica-listen", &format!("tcp:127.0.0.1:{replica_port}")])
                .arg("--export-listen")
                .arg(format!("unix:{}", dir.path().join("top.sock").display()))
                .args(["--control", &format!("tcp:127.0.0.1:{control_port}")])
                .arg("--buffer-dir")
                .arg(dir.path().join("buffer"))
                .arg("--tls-creds")
                .arg(&creds)
                .args(["--tls-authz", &dn("client"), "--start"])
                .env("RUST_LOG", "info")
                .stderr(std::fs::File::create(dir.path().join("secondary.log")).unwrap()),
        );
        wait_tcp(control_port, &mut s);
        Secure {
            dir,
            ca,
            creds,
            replica_port,
            control_port,
            _secondary: s,
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn control(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.control_port)
    }

    /// `coloblk ctl` on the secondary's TCP control socket with credentials `creds`.
    fn ctl(&self, creds: Option<&Path>, action: &str) -> std::process::Output {
        let mut c = coloblk();
        c.args(["ctl", "--control", &self.control(), "--timeout", "2"]);
        if let Some(creds) = creds {
            c.arg("--tls-creds").arg(creds);
        }
        c.arg(action).output().unwrap()
    }
}

#[test]
fn a_primary_replicates_over_nbds_and_checkpoints_over_tls_control() {
    require("qemu-io");
    let s = Secure::start();
    raw_image(s.dir.path(), "primary.raw", DISK);
    let qmp = format!("unix:{}", s.p("primary.qmp").display());
    let mut p = Proc::spawn(
        "coloblk primary",
        coloblk()
            .args(["primary", "--disk"])
            .arg(format!(
                "vm0={},replica=nbds://127.0.0.1:{}/vm0",
                s.p("primary.raw").display(),
                s.replica_port
            ))
            .arg("--export-listen")
            .arg(format!("unix:{}", s.p("primary.sock").display()))
            .args(["--control", &qmp, "--peer-control", &s.control()])
            .arg("--tls-creds")
            .arg(&s.creds)
            .arg("--start"),
    );
    wait_socket(&s.p("primary.qmp"), &mut p);
    wait_protected(&qmp);

    qemu_io(
        &unix_uri("vm0", &s.p("primary.sock")),
        "write -P 0x6b 1M 2M",
    );
    let out = coloblk()
        .args(["ctl", "--control", &qmp, "checkpoint"])
        .output()
        .unwrap();

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disk = std::fs::read(s.p("secondary.raw")).unwrap();
    assert!(
        disk[MIB as usize..3 * MIB as usize]
            .iter()
            .all(|&b| b == 0x6b)
    );
    assert!(disk[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn ctl_speaks_tls_to_a_tcp_control_socket_and_a_plain_ctl_is_refused() {
    let s = Secure::start();

    let tls = s.ctl(Some(&s.creds), "status");
    let plain = s.ctl(None, "status");

    assert!(
        tls.status.success(),
        "{}",
        String::from_utf8_lossy(&tls.stderr)
    );
    assert!(String::from_utf8_lossy(&tls.stdout).contains("vm0"));
    assert_eq!(plain.status.code(), Some(3), "a plain ctl got in");
}

#[test]
fn a_control_client_not_in_the_authz_list_is_refused() {
    let s = Secure::start();
    // Signed by the right CA, but not the name in --tls-authz.
    let intruder = s.ca.leaf("intruder", Validity::Valid);
    let creds = write_creds(&s.p("intruder"), &s.ca.cert_pem, None, Some(&intruder));

    let out = s.ctl(Some(&creds), "failover");

    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = s.ctl(Some(&s.creds), "status");
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("running"),
        "failed over anyway"
    );
}

#[test]
fn a_destructive_command_is_logged_with_the_peers_certificate_name() {
    let s = Secure::start();

    let out = s.ctl(Some(&s.creds), "stop");

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(s.p("secondary.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("control command"))
        .unwrap_or_else(|| panic!("no command logged:\n{log}"));
    assert!(
        line.contains("peer=CN=client,O=coloblk test (127.0.0.1:"),
        "{line}"
    );
    assert!(line.contains(r#"command="replication-stop""#), "{line}");
}

#[test]
fn python_qemu_qmp_drives_the_tls_control_socket() {
    let s = Secure::start();
    let script = r#"
import asyncio, ssl, sys
from qemu.qmp import QMPClient
async def main(port, creds):
    ctx = ssl.create_default_context(cafile=creds + "/ca-cert.pem")
    ctx.load_cert_chain(creds + "/client-cert.pem", creds + "/client-key.pem")
    c = QMPClient("t")
    await c.connect(("127.0.0.1", int(port)), ssl=ctx)
    r = await c.execute("query-replication")
    print(r["disks"][0]["name"])
    # No disconnect(): qemu.qmp's flush() sets the transport's write limits to 0 and drains,
    # which never returns on a python 3.11 SSL transport (whatever the server). Ending the
    # loop closes the connection.
asyncio.run(main(sys.argv[1], sys.argv[2]))"#;

    let out = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(s.control_port.to_string())
        .arg(&s.creds));

    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vm0");
}

#[test]
fn a_plain_nbd_client_on_the_replica_port_gets_tls_reqd_and_writes_nothing() {
    require("qemu-io");
    let s = Secure::start();

    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 64k"])
        .arg(format!("nbd://127.0.0.1:{}/vm0", s.replica_port))
        .output()
        .unwrap();

    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("TLS"), "{text}");
    let disk = std::fs::read(s.p("secondary.raw")).unwrap();
    assert!(disk.iter().all(|&b| b == 0), "the plain client wrote");
}

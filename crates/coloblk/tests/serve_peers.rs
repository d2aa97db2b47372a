//! `coloblk serve` against the real NBD peers: qemu-io, qemu-img, nbdinfo, nbdcopy, fio.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// Writes the same qemu-io script into our export and into a plain file, then
/// `qemu-img compare` says they are identical and the bytes read back exactly.
#[test]
fn qemu_io_writes_land_exactly_as_in_a_local_image() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let served = raw_image(dir.path(), "served.raw", 16 * MIB);
    let expected = raw_image(dir.path(), "expected.raw", 16 * MIB);
    let s = serve(dir.path(), &[&format!("disk={}", served.display())]);
    let script = [
        "write -P 0x5a 0 64k",
        "write -P 0xc3 1000 3000",
        "write -P 0x11 8M 1M",
        "write -z 8M 4k",
        "discard 8388608 65536",
        "write -P 0x77 16773120 4096",
        "flush",
    ];
    for target in [unix_uri("disk", &s.sock), expected.display().to_string()] {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in script {
            cmd.args(["-c", c]);
        }
        run(cmd.arg(&target));
    }
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(unix_uri("disk", &s.sock))
        .arg(&expected));
    let got = std::fs::read(&served).unwrap();
    let want = std::fs::read(&expected).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "served image differs from the expected image");
    assert_eq!(got[999], 0x5a);
    assert_eq!(&got[1000..4000], &[0xc3; 3000][..]);
    assert_eq!(
        &got[8 * MIB as usize..8 * MIB as usize + 65536],
        &[0u8; 65536][..]
    );
    assert_eq!(got[8 * MIB as usize + 65536], 0x11);
    let out = stdout(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x77 16773120 4096"])
            .arg(unix_uri("disk", &s.sock)),
    );
    assert!(
        out.contains("read 4096/4096 bytes at offset 16773120"),
        "{out}"
    );
}

/// nbdinfo lists both exports with their sizes and the base:allocation context, and
/// `nbdinfo --map` reports exactly the extents the file has.
#[test]
fn nbdinfo_lists_exports_and_maps_allocation() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let a = raw_image(dir.path(), "a.raw", 4 * MIB);
    let b = raw_image(dir.path(), "b.raw", MIB);
    std::fs::write(dir.path().join("chunk"), vec![0xAAu8; 65536]).unwrap();
    run(Command::new("dd")
        .args(["conv=notrunc", "bs=65536", "seek=16", "status=none"])
        .arg(format!("if={}", dir.path().join("chunk").display()))
        .arg(format!("of={}", a.display())));
    let s = serve(
        dir.path(),
        &[
            &format!("alpha={}", a.display()),
            &format!("beta={},readonly", b.display()),
        ],
    );
    let list = stdout(
        Command::new("nbdinfo")
            .arg("--list")
            .arg("--json")
            .arg(format!("nbd+unix://?socket={}", s.sock.display())),
    );
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<_> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(exports[0]["export-size"], 4 * MIB);
    assert_eq!(exports[1]["export-size"], MIB);
    assert_eq!(
        exports[0]["contexts"],
        serde_json::json!(["base:allocation"])
    );
    assert_eq!(exports[0]["is_read_only"], false);
    assert_eq!(exports[1]["is_read_only"], true);
    let map = stdout(
        Command::new("nbdinfo")
            .arg("--map")
            .arg(unix_uri("alpha", &s.sock)),
    );
    let want = format!(
        "{:>10} {:>11}    3  hole,zero\n{:>10} {:>11}    0  data\n{:>10} {:>11}    3  hole,zero\n",
        0,
        MIB,
        MIB,
        65536,
        MIB + 65536,
        3 * MIB - 65536
    );
    assert_eq!(map, want);
}

/// nbdcopy copies the export out byte for byte.
#[test]
fn nbdcopy_copies_the_export_out() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = pattern(7, 8 * MIB as usize);
    std::fs::write(&src, &data).unwrap();
    let s = serve(dir.path(), &[&format!("d={},readonly", src.display())]);
    let out = dir.path().join("out.raw");
    run(Command::new("nbdcopy")
        .arg(unix_uri("d", &s.sock))
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy output differs"
    );
}

/// fio's nbd engine writes random blocks with crc32c headers and verifies every one.
#[test]
fn fio_nbd_engine_verifies_crc32c() {
    require("fio");
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "f.raw", 32 * MIB);
    let s = serve(dir.path(), &[&format!("f={}", img.display())]);
    let out = run(Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
        ])
        .args([
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .arg(format!("--uri={}", unix_uri("f", &s.sock))));
    // fio prints "connected to NBD server" before its JSON.
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0);
    assert_eq!(job["write"]["io_bytes"], 32 * MIB);
    assert_eq!(
        job["read"]["io_bytes"],
        32 * MIB,
        "verify phase must read everything back"
    );
}

/// A read-only export is advertised read-only, so qemu-io refuses to open it for writing
/// (EPERM on the wire for clients that write anyway is checked in `protocol_abuse.rs`).
#[test]
fn readonly_export_refuses_writes_with_eperm() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.raw");
    std::fs::write(&img, vec![0x42u8; MIB as usize]).unwrap();
    let s = serve(dir.path(), &[&format!("ro={},readonly", img.display())]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0 0 4k"])
        .arg(unix_uri("ro", &s.sock))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("Permission denied"), "{text}");
    assert_eq!(std::fs::read(&img).unwrap(), vec![0x42u8; MIB as usize]);
}

/// SIGTERM with a client attached: the server finishes, flushes and exits 0, and what was
/// acknowledged is in the file.
#[test]
fn sigterm_exits_zero_after_flushing() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "t.raw", 4 * MIB);
    let mut s = serve(dir.path(), &[&format!("t={}", img.display())]);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x3c 0 1M"])
        .arg(unix_uri("t", &s.sock)));
    // A client that stays connected must not keep the server from stopping.
    let idle = std::os::unix::net::UnixStream::connect(&s.sock).unwrap();
    s.proc_.signal("TERM");
    let st = s.proc_.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "exit status {st}");
    drop(idle);
    let got = std::fs::read(&img).unwrap();
    assert_eq!(&got[..MIB as usize], &vec![0x3cu8; MIB as usize][..]);
    assert!(!s.sock.exists(), "the socket file is removed on exit");
}

/// TCP listeners work too (qemu-img reads what qemu-io wrote over nbd://).
#[test]
fn tcp_listener_serves_qemu_tools() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "tcp.raw", 2 * MIB);
    let port = free_port();
    let mut p = Proc::spawn(
        "coloblk serve",
        coloblk().args([
            "serve",
            "--listen",
            &format!("tcp:127.0.0.1:{port}"),
            "--insecure",
            "--export",
            &format!("n={}", img.display()),
        ]),
    );
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(p.child.try_wait().unwrap().is_none(), "server exited");
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd://127.0.0.1:{port}/n");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x99 65536 65536"])
        .arg(&uri));
    let out = stdout(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x99 65536 65536"])
            .arg(&uri),
    );
    assert!(out.contains("read 65536/65536"), "{out}");
}

/// A TCP listener without TLS is refused unless the operator says --insecure.
#[test]
fn a_plain_tcp_listener_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "t.raw", MIB);

    let out = coloblk()
        .args(["serve", "--listen", "tcp:127.0.0.1:0", "--export"])
        .arg(format!("n={}", img.display()))
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "the NBD listener for clients on tcp:127.0.0.1:0 would accept anyone who can reach \
             the port: give --tls-creds DIR (TLS with client certificates), or say --insecure"
        ),
        "{err}"
    );
}

/// Bad command lines give one clear error and exit code 2.
#[test]
fn bad_options_exit_2_with_a_clear_message() {
    for args in [
        vec!["serve", "--listen", "unix:/tmp/x.sock"],
        vec![
            "serve",
            "--export",
            "noequals",
            "--listen",
            "unix:/tmp/x.sock",
        ],
        vec![
            "serve",
            "--export",
            "a=b,format=vmdk",
            "--listen",
            "unix:/tmp/x.sock",
        ],
        vec!["serve", "--export", "a=b", "--listen", "udp:1.2.3.4:5"],
        vec![
            "serve",
            "--export",
            "a=b",
            "--listen",
            "unix:/tmp/x.sock",
            "--io-threads",
            "0",
        ],
    ] {
        let out = coloblk().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
    let out = coloblk()
        .args([
            "serve",
            "--export",
            "a=/nonexistent/x.raw",
            "--listen",
            "unix:/tmp/never.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disk 'a': cannot open /nonexistent/x.raw"),
        "{err}"
    );
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A qcow2 export written through NBD (data, zeroes, discards) and then stopped with SIGTERM
/// passes `qemu-img check`, and `qemu-img convert` gives exactly the bytes written.
#[test]
fn qcow2_export_written_over_nbd_passes_qemu_img_check_after_sigterm() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    let expected = raw_image(dir.path(), "expected.raw", 16 * MIB);
    let mut s = serve(dir.path(), &[&format!("q={},format=qcow2", img.display())]);
    let script = [
        "write -P 0xa1 0 100k",
        "write -P 0xb2 5M 3M",
        "write -z 6M 64k",
        "discard 7M 1M",
        "write -P 0xc3 16773120 4096",
    ];
    for target in [unix_uri("q", &s.sock), expected.display().to_string()] {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in script {
            cmd.args(["-c", c]);
        }
        run(cmd.arg(&target));
    }
    s.proc_.signal("TERM");
    assert!(s.proc_.wait_exit(Duration::from_secs(10)).success());
    run(Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&img));
    let out = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&expected).unwrap(),
        "qcow2 content differs"
    );
}

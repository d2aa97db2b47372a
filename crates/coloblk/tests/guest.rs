//! A real Linux guest end to end: an ext4 guest (scripts/build-guest: Debian's cloud kernel and
//! a busybox initramfs) in QEMU 7.2 on a coloblk primary's NBD export, checkpointed the way an
//! orchestrator does it (QMP `stop`, coordinated checkpoint, `cont`), then the primary's host
//! dies (QEMU and the primary killed with -9 together) and the secondary fails over.
//!
//! The same run attaches the guests over vhost-user-blk (the daemons' `vhost-user:PATH`
//! exports) instead of NBD, and a raw guest on `coloblk serve` checks that attachment's own
//! features: data, flush, discard, two queues, the device id, a read-only disk, and a QEMU
//! killed and started again on the same socket.
//!
//! KVM only where /proc/cpuinfo shows vmx or svm and /dev/kvm opens (`GUEST_ACCEL` overrides),
//! else TCG; the test prints which one ran.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::{qemu_colo, repo_root};
use common::{
    Proc, coloblk, qmp_execute, run, spawn_primary, spawn_secondary_named, stdout, wait_protected,
    wait_socket,
};

const DISK_MIB: u64 = 64;

/// The guest's kernel and initramfs, built (or taken from the cache in target/guest) once per
/// test process (build-guest also locks its cache against other processes).
fn guest() -> (PathBuf, PathBuf) {
    static GUEST: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    GUEST.get_or_init(build_guest).clone()
}

fn build_guest() -> (PathBuf, PathBuf) {
    let root = repo_root();
    let out = stdout(
        Command::new("bash")
            .arg(root.join("scripts/build-guest"))
            .arg(root.join("target/guest")),
    );
    let var = |k: &str| {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("build-guest printed no {k}: {out}"))
            .into()
    };
    (var("GUEST_KERNEL"), var("GUEST_INITRD"))
}

fn accel() -> String {
    let root = repo_root();
    stdout(
        Command::new("bash")
            .arg(root.join("scripts/build-guest"))
            .arg("--accel"),
    )
    .trim()
    .to_string()
}

/// How a guest reaches a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attach {
    /// QEMU's NBD client.
    Nbd,
    /// QEMU's vhost-user-blk-pci, two queues.
    VhostUser,
}

/// A disk of a guest: the unix socket of an NBD export `vm0`, or a vhost-user socket.
enum Drive {
    Nbd(PathBuf),
    VhostUser(PathBuf),
}

/// Guest RAM in MiB (the memfd backend vhost-user shares has this size).
const GUEST_MIB: u32 = 256;

/// The QEMU options attaching `drives` (vda, vdb, ... in order). vhost-user needs the guest's
/// RAM in shared memory the daemon can map.
fn drive_args(drives: &[Drive]) -> Vec<String> {
    let mut args = Vec::new();
    if drives.iter().any(|d| matches!(d, Drive::VhostUser(_))) {
        args.extend([
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on"),
            "-machine".into(),
            "memory-backend=mem".into(),
        ]);
    }
    for (i, d) in drives.iter().enumerate() {
        match d {
            // With reconnect-delay QEMU holds the guest's I/O while the daemon restarts, and
            // reconnects, instead of failing it.
            Drive::Nbd(sock) => args.extend([
                "-blockdev".into(),
                format!(
                    "driver=nbd,node-name=disk{i},server.type=unix,server.path={},export=vm0,\
                     reconnect-delay=10",
                    sock.display()
                ),
                "-device".into(),
                format!("virtio-blk-pci,drive=disk{i}"),
            ]),
            Drive::VhostUser(path) => args.extend([
                "-chardev".into(),
                format!("socket,id=vu{i},path={}", path.display()),
                "-device".into(),
                format!("vhost-user-blk-pci,chardev=vu{i},num-queues=2"),
            ]),
        }
    }
    args
}

/// A QEMU running the guest (`smp` CPUs) on `drives`, its console in `console`, its monitor
/// at `qmp`.
fn boot(
    dir: &Path,
    name: &str,
    drives: &[Drive],
    smp: u8,
    workload: &str,
) -> (Proc, PathBuf, PathBuf) {
    let q = qemu_colo();
    let (kernel, initrd) = guest();
    let console = dir.join(format!("{name}.console"));
    let qmp = dir.join(format!("{name}.qmp"));
    let accel = accel();
    eprintln!("guest {name}: {accel}");
    let mut cmd = Command::new(&q.bin);
    cmd.env("LD_LIBRARY_PATH", &q.ld_library_path)
        .arg("-L")
        .arg(&q.bios)
        .arg("-L")
        .arg(&q.data)
        .args(["-M", "pc", "-accel", &accel, "-display", "none"])
        .args(["-m", &GUEST_MIB.to_string(), "-smp", &smp.to_string()])
        .args(["-nodefaults", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {workload}"))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(drive_args(drives));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    cmd.stdout(log.try_clone().unwrap()).stderr(log);
    let p = Proc::spawn(&format!("guest {name}"), &mut cmd);
    (p, console, qmp)
}

/// The console's "GUEST: " lines so far.
fn said(console: &Path) -> Vec<String> {
    let text = String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).to_string();
    text.split(['\n', '\r'])
        .filter_map(|l| l.split_once("GUEST: ").map(|(_, m)| m.trim().to_string()))
        .collect()
}

/// Waits until the guest said `line`; fails on "failed: ...", on exit, and after 90 s.
fn wait_said(p: &mut Proc, console: &Path, line: &str) -> Vec<String> {
    let start = Instant::now();
    loop {
        let lines = said(console);
        let last = &lines[lines.len().saturating_sub(8)..];
        if lines.iter().any(|l| l == line) {
            return lines;
        }
        if let Some(f) = lines.iter().find(|l| l.starts_with("failed")) {
            panic!("the guest {f}: {last:?}");
        }
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!(
                "{} exited with {st} before saying '{line}': {lines:?}",
                p.name
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{} never said '{line}' (last lines: {last:?})",
            p.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The md5 the guest prints for its file `name` (content `yes name | head -c 65536`).
fn md5_of(name: &str) -> String {
    let out = stdout(Command::new("sh").arg("-c").arg(format!(
        "yes {name} | head -c 65536 | md5sum | cut -d' ' -f1"
    )));
    out.trim().to_string()
}

fn ext4_image(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path));
}

/// `e2fsck -fn` on a copy of `disk` whose journal was replayed first (a disk taken from a
/// running guest has committed transactions only in its journal).
fn fsck_clean(disk: &Path) {
    let copy = disk.with_extension("fsck");
    std::fs::copy(disk, &copy).unwrap();
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        replay.status.code().is_some_and(|c| c <= 1),
        "journal replay: {replay:?}"
    );
    run(Command::new("e2fsck").arg("-fn").arg(&copy));
    std::fs::remove_file(copy).unwrap();
}

/// The orchestrator's protocol around a real guest: after the checkpoint the secondary's disk
/// is the primary's disk as it was then, byte for byte, and a clean file system. A speculative
/// guest on the secondary's view writes files meanwhile; after the failover the disk is
/// exactly its view (the checkpoint plus its files), and a fresh guest there replays the
/// journal, finds every file written before the checkpoint and the speculative guest's, none
/// of the primary's guest's later ones, and writes more.
#[test]
fn ext4_guest_checkpoint_kill_failover() {
    checkpoint_kill_failover(Attach::Nbd);
}

/// The same over vhost-user-blk: the primary's VM on the primary's vhost-user export, the
/// speculative and the fresh guest on the secondary's.
#[test]
fn ext4_guest_checkpoint_kill_failover_vhost_user() {
    checkpoint_kill_failover(Attach::VhostUser);
}

/// An ext4 image as `primary.raw` and `secondary.raw` in `d`, a secondary (NBD and vhost-user
/// top exports `top.sock`, `top.vhost`) and a sync primary exporting at `export`, protected.
fn ext4_pair(d: &Path, export: &str) -> (Proc, Proc) {
    let u = |n: &str| format!("unix:{}", d.join(n).display());
    ext4_image(&d.join("secondary.raw"));
    std::fs::copy(d.join("secondary.raw"), d.join("primary.raw")).unwrap();
    let top_vhost = format!("vhost-user:{}", d.join("top.vhost").display());
    let secondary = spawn_secondary_named(
        d,
        "secondary.raw",
        "",
        &["--export-listen", &top_vhost, "--start"],
    );
    let primary = spawn_primary(
        &d.join("primary.raw"),
        &d.join("replica.sock"),
        (export, &d.join("primary.qmp")),
        &d.join("secondary.qmp"),
        "sync",
    );
    wait_protected(&u("primary.qmp"));
    (secondary, primary)
}

fn checkpoint_kill_failover(attach: Attach) {
    if !common::require("mkfs.ext4") || !common::require("e2fsck") {
        return;
    }
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = |n: &str| format!("unix:{}", d.join(n).display());
    let vhost = |p: &Path| format!("vhost-user:{}", p.display());
    // Each attachment: where the primary's VM and the secondary's guests find their disk.
    let (export, vm_drive, top_drive) = match attach {
        Attach::Nbd => (
            u("primary.sock"),
            Drive::Nbd(d.join("primary.sock")),
            Drive::Nbd(d.join("top.sock")),
        ),
        Attach::VhostUser => (
            vhost(&d.join("primary.vhost")),
            Drive::VhostUser(d.join("primary.vhost")),
            Drive::VhostUser(d.join("top.vhost")),
        ),
    };
    let (_secondary, mut primary) = ext4_pair(d, &export);

    // The VM writes five files, then (after 3 s) more until it is killed.
    let (mut vm, console, vm_qmp) = boot(
        d,
        "pvm",
        &[vm_drive],
        1,
        "guest.workload=write guest.args=a,5,more",
    );
    wait_said(&mut vm, &console, "wrote 5 files a-*");
    assert_eq!(qmp_execute(&vm_qmp, "stop", "{}"), "return: {}");
    let reply = qmp_execute(&d.join("primary.qmp"), "replication-checkpoint", "{}");
    assert!(reply.starts_with("return: "), "{reply}");
    let checkpoint = std::fs::read(d.join("primary.raw")).unwrap();
    assert!(
        std::fs::read(d.join("secondary.raw")).unwrap() == checkpoint,
        "the secondary's disk after the checkpoint is not the primary's"
    );
    fsck_clean(&d.join("secondary.raw"));
    assert_eq!(qmp_execute(&vm_qmp, "cont", "{}"), "return: {}");
    // The speculative VM on the secondary's view (the checkpoint plus its own writes) writes
    // files while the primary's VM goes on writing.
    let top = format!("nbd+unix:///vm0?socket={}", d.join("top.sock").display());
    let (mut svm, svm_console, _) = boot(
        d,
        "svm",
        std::slice::from_ref(&top_drive),
        1,
        "guest.workload=write guest.args=s,3",
    );
    wait_said(&mut svm, &svm_console, "done");
    svm.wait_exit(Duration::from_secs(30));
    wait_said(&mut vm, &console, "wrote 1 files more1-*");
    // The primary's host dies.
    vm.child.kill().unwrap();
    primary.child.kill().unwrap();
    vm.child.wait().unwrap();
    primary.child.wait().unwrap();

    let view = d.join("view.raw");
    run(Command::new("nbdcopy").arg(&top).arg(&view));
    let view = std::fs::read(view).unwrap();
    assert!(
        view != checkpoint,
        "the speculative VM's files are not in its view"
    );
    let out = stdout(coloblk().args(["ctl", "--control", &u("secondary.qmp"), "failover"]));
    assert!(out.contains("failover done"), "{out}");
    assert!(
        std::fs::read(d.join("secondary.raw")).unwrap() == view,
        "after failover the secondary's disk is not the speculative VM's view"
    );

    // A fresh guest on the survivor's export: the checkpoint's files and the speculative VM's,
    // none of the primary's VM's later ones; and it writes more.
    let (mut fresh, console, _) = boot(
        d,
        "fresh",
        &[top_drive],
        1,
        "guest.workload=check guest.args=b,2",
    );
    let lines = wait_said(&mut fresh, &console, "done");
    let files: Vec<&String> = lines.iter().filter(|l| l.starts_with("file ")).collect();
    let names = (0..5)
        .map(|i| format!("a-{i}"))
        .chain((0..3).map(|i| format!("s-{i}")));
    let want: Vec<String> = names.map(|n| format!("file {n} {}", md5_of(&n))).collect();
    assert_eq!(files, want.iter().collect::<Vec<_>>(), "{lines:?}");
    assert!(lines.iter().any(|l| l == "wrote 2 files b-*"), "{lines:?}");
    fresh.wait_exit(Duration::from_secs(30));
    run(Command::new("e2fsck")
        .arg("-fn")
        .arg(d.join("secondary.raw")));
    eprintln!("guest end to end ({attach:?}) in {:?}", t.elapsed());
}

/// The md5 of 1 MiB of `yes TEXT`.
fn mib_md5(text: &str) -> String {
    let out = stdout(Command::new("sh").arg("-c").arg(format!(
        "yes {text} | head -c 1048576 | md5sum | cut -d' ' -f1"
    )));
    out.trim().to_string()
}

/// A raw guest (two CPUs) on `coloblk serve`'s vhost-user sockets: it sees the export's name
/// as its serial and two queues, writes 1 MiB from each CPU at once (fsync'd: flushes) and
/// discards 1 MiB; QEMU is then killed and a new one started on the same socket reads all
/// three back, and finds the second, read-only disk read-only. The image afterwards is exactly
/// what the guest wrote (the discarded MiB a hole of zeroes, the rest untouched); the
/// read-only image is unchanged.
#[test]
fn vhost_user_guest_raw_reconnect_read_only() {
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (disk, ro) = (d.join("disk.raw"), d.join("ro.raw"));
    let before = common::pattern(7, 8 << 20);
    std::fs::write(&disk, &before).unwrap();
    std::fs::write(&ro, common::pattern(8, 1 << 20)).unwrap();
    let (sock, ro_sock) = (d.join("disk.vhost"), d.join("ro.vhost"));
    let mut serve = Proc::spawn(
        "coloblk serve",
        coloblk()
            .arg("serve")
            .arg("--export")
            .arg(format!("vm0={}", disk.display()))
            .arg("--export")
            .arg(format!("ro={},readonly", ro.display()))
            .arg("--listen")
            .arg(format!("vhost-user:{},export=vm0", sock.display()))
            .arg("--listen")
            .arg(format!("vhost-user:{},export=ro", ro_sock.display())),
    );
    wait_socket(&sock, &mut serve);
    wait_socket(&ro_sock, &mut serve);

    let (mut vm, console, _) = boot(
        d,
        "raw-write",
        &[Drive::VhostUser(sock.clone())],
        2,
        "guest.workload=raw-write",
    );
    let lines = wait_said(&mut vm, &console, "written");
    assert!(
        lines.iter().any(|l| l == "serial vm0 queues 2"),
        "{lines:?}"
    );
    // QEMU dies; a new one attaches to the same socket.
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    let (mut vm, console, _) = boot(
        d,
        "raw-check",
        &[Drive::VhostUser(sock), Drive::VhostUser(ro_sock)],
        2,
        "guest.workload=raw-check",
    );
    let lines = wait_said(&mut vm, &console, "done");
    let zeroes = stdout(
        Command::new("sh")
            .arg("-c")
            .arg("head -c 1048576 /dev/zero | md5sum | cut -d' ' -f1"),
    );
    let want = format!(
        "md5 a {} b {} d {}",
        mib_md5("vhost-a"),
        mib_md5("vhost-b"),
        zeroes.trim()
    );
    assert!(lines.contains(&want), "want '{want}' in {lines:?}");
    assert!(lines.iter().any(|l| l == "vdb ro 1"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "vdb write refused"), "{lines:?}");
    vm.wait_exit(Duration::from_secs(30));
    serve.signal("TERM");
    assert!(
        serve.wait_exit(Duration::from_secs(30)).success(),
        "coloblk serve failed to stop cleanly"
    );

    let mut want = before;
    let text = |t: &str| {
        stdout(
            Command::new("sh")
                .arg("-c")
                .arg(format!("yes {t} | head -c 1048576")),
        )
    };
    want[1 << 20..2 << 20].copy_from_slice(text("vhost-a").as_bytes());
    want[3 << 20..4 << 20].copy_from_slice(text("vhost-b").as_bytes());
    want[5 << 20..6 << 20].fill(0);
    assert!(
        std::fs::read(&disk).unwrap() == want,
        "the image is not what the guest wrote"
    );
    assert!(
        std::fs::read(&ro).unwrap() == common::pattern(8, 1 << 20),
        "the read-only image changed"
    );
    eprintln!("vhost-user raw guest in {:?}", t.elapsed());
}

/// A primary killed with -9 and started again under a running guest is a pause, not an error:
/// QEMU (`reconnect-delay`) holds the guest's I/O and reconnects; the new primary finds its
/// state, resyncs its write log, and after the orchestrator's checkpoint both disks are the
/// same clean file system, holding every file the guest wrote before, during and after.
#[test]
fn a_primary_restarted_under_a_running_guest_is_a_pause_not_an_error() {
    if !common::require("mkfs.ext4") || !common::require("e2fsck") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = |n: &str| format!("unix:{}", d.join(n).display());
    let (_secondary, mut primary) = ext4_pair(d, &u("primary.sock"));
    let (mut vm, console, vm_qmp) = boot(
        d,
        "pvm",
        &[Drive::Nbd(d.join("primary.sock"))],
        1,
        "guest.workload=write guest.args=a,3,more",
    );
    wait_said(&mut vm, &console, "wrote 1 files more1-*");
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    let before = said(&console).len();
    // Meanwhile the guest's I/O waits (reconnect-delay); what it writes next needs the new
    // primary.
    std::thread::sleep(Duration::from_secs(1));
    let primary = spawn_primary(
        &d.join("primary.raw"),
        &d.join("replica.sock"),
        (&u("primary.sock"), &d.join("primary.qmp")),
        &d.join("secondary.qmp"),
        "sync",
    );
    let start = Instant::now();
    while said(&console).len() < before + 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest wrote nothing after the primary's restart: {:?}",
            said(&console)
        );
        assert!(vm.child.try_wait().unwrap().is_none(), "the guest died");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(qmp_execute(&vm_qmp, "stop", "{}"), "return: {}");
    wait_protected(&u("primary.qmp"));
    let reply = qmp_execute(&d.join("primary.qmp"), "replication-checkpoint", "{}");
    assert!(reply.starts_with("return: "), "{reply}");
    let lines = said(&console);
    assert!(
        !lines.iter().any(|l| l.starts_with("failed")),
        "the guest saw an error: {lines:?}"
    );
    let p = std::fs::read(d.join("primary.raw")).unwrap();
    assert!(
        std::fs::read(d.join("secondary.raw")).unwrap() == p,
        "after the restart and a checkpoint the secondary's disk is not the primary's"
    );
    fsck_clean(&d.join("primary.raw"));
    vm.child.kill().unwrap();
    primary.signal("TERM");
}

/// The README's "Use it with QEMU" lines are the ones these tests run.
#[test]
fn the_readme_shows_the_qemu_options_the_guest_tests_use() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let shown = [
        Drive::Nbd("/run/coloblk/vm.nbd".into()),
        Drive::VhostUser("/run/coloblk/vm.vhost".into()),
    ];
    for drive in shown {
        for pair in drive_args(&[drive]).chunks(2) {
            let line = pair.join(" ");
            assert!(readme.contains(&line), "README.md lacks `{line}`");
        }
    }
}

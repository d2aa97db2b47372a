//! A host crash, not only a process crash: each daemon's disk is a file whose "stable storage"
//! keeps exactly what was flushed. The disk the daemon opens is an `nbdfuse` file in front of
//! `nbdkit file STABLE --filter=cache cache=writeback`: a write lands in nbdkit's cache and
//! reaches STABLE only when a flush (or FUA) asks for it, so `kill -9` of nbdkit loses what a
//! power cut loses. The daemons are killed right after, and STABLE is what the host would find.
//!
//! What each mode promises (docs/STATE.md): a write the VM asked to be durable (FUA, or a flush
//! it waited for) is on stable storage on the primary in both modes, and on the secondary in
//! `sync` mode; in `async` mode the secondary's stable copy is at least the last checkpoint's.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
const BLOCK: usize = 64 << 10;
/// Blocks the VM makes durable, then blocks it writes plainly just before the power cut.
const DURABLE: usize = 32;
const PLAIN: usize = 16;

/// A file served through a write-back cache that only a flush empties, mounted with nbdfuse.
struct Cuttable {
    mnt: PathBuf,
    stable: PathBuf,
    _fuse: Proc,
}

impl Cuttable {
    fn new(dir: &Path, tag: &str) -> Cuttable {
        let stable = raw_image(dir, &format!("{tag}-stable.raw"), DISK);
        let mnt = dir.join(format!("{tag}-mnt"));
        std::fs::create_dir(&mnt).unwrap();
        let mut fuse = Proc::spawn(
            "nbdfuse",
            Command::new("nbdfuse")
                .arg(mnt.join("disk.raw"))
                .args(["--command", "nbdkit", "-s", "file"])
                .arg(&stable)
                .args(["--filter=cache", "cache=writeback"]),
        );
        let start = Instant::now();
        while std::fs::metadata(mnt.join("disk.raw"))
            .map(|m| m.len())
            .ok()
            != Some(DISK)
        {
            if let Some(st) = fuse.child.try_wait().unwrap() {
                panic!("nbdfuse exited with {st} (is /dev/fuse usable?)");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nbdfuse never mounted"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Cuttable {
            mnt,
            stable,
            _fuse: fuse,
        }
    }

    fn disk(&self) -> PathBuf {
        self.mnt.join("disk.raw")
    }

    /// The power cut: nbdkit's cache is gone, what was not flushed never reached `stable`.
    fn cut(&self) {
        let pattern = format!("nbdkit -s file {}", self.stable.display());
        run(Command::new("pkill").args(["-9", "-f", &pattern]));
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn data() -> Vec<u8> {
    pattern(0x4057_c4a5, (DURABLE + PLAIN) * BLOCK)
}

/// How the VM makes its first blocks durable.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Durable {
    /// Each write carries FUA.
    Fua,
    /// Plain writes, then a flush.
    Flush,
    /// Plain writes, a flush, then a coordinated checkpoint through the primary.
    FlushAndCheckpoint,
}

/// Writes `data()` as the VM would: `DURABLE` blocks made durable as `how` says, then `PLAIN`
/// blocks with neither FUA nor a flush.
fn vm_writes(uri: &str, data_file: &Path, how: Durable, primary_qmp: &str) {
    let script = format!(
        r#"
import nbd, sys
data = open({data:?}, "rb").read()
h = nbd.NBD()
h.connect_uri({uri:?})
B = {BLOCK}
fua = sys.argv[1] == "Fua"
for i in range({DURABLE}):
    h.pwrite(data[i*B:(i+1)*B], i*B, nbd.CMD_FLAG_FUA if fua else 0)
if not fua:
    h.flush()
print("durable", flush=True)
sys.stdin.readline()
for i in range({DURABLE}, {DURABLE}+{PLAIN}):
    h.pwrite(data[i*B:(i+1)*B], i*B)
print("done", flush=True)
"#,
        data = data_file.display().to_string(),
    );
    use std::io::{BufRead, BufReader, Write};
    // Debian's python, where python3-libnbd installs (nbdsh runs on it too).
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", &script, &format!("{how:?}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line, "durable\n",
        "the VM's durable writes did not complete"
    );
    if how == Durable::FlushAndCheckpoint {
        run(coloblk().args(["ctl", "--control", primary_qmp, "checkpoint"]));
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n", "the VM's plain writes did not complete");
    assert!(child.wait().unwrap().success());
}

/// Each block of `image` holds the data or zeroes; returns how many hold the data.
fn blocks_written(image: &[u8], data: &[u8], blocks: std::ops::Range<usize>, who: &str) -> usize {
    let zero = vec![0u8; BLOCK];
    let mut written = 0;
    for i in blocks {
        let got = &image[i * BLOCK..(i + 1) * BLOCK];
        let want = &data[i * BLOCK..(i + 1) * BLOCK];
        if got == want {
            written += 1;
        } else {
            assert_eq!(
                got,
                &zero[..],
                "{who}: block {i} is neither the data nor zeroes"
            );
        }
    }
    written
}

fn host_crash(mode: &str, how: Durable) {
    require("nbdfuse");
    require("nbdsh");
    // A machine without FUSE (a container without /dev/fuse) cannot cut a disk this way: say
    // so loudly rather than fail the suite over the machine.
    if !Path::new("/dev/fuse").exists() {
        eprintln!("host_crash: SKIPPED, no /dev/fuse on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p_disk = Cuttable::new(d, "primary");
    let s_disk = Cuttable::new(d, "secondary");
    let unix = |n: &str| format!("unix:{}", d.join(n).display());

    let secondary_state = d.join("secondary-state").display().to_string();
    let secondary = spawn_secondary_named(
        d,
        &s_disk.disk().display().to_string(),
        "",
        &["--state-dir", &secondary_state, "--start"],
    );
    let primary_state = d.join("primary-state").display().to_string();
    let primary = spawn_primary_with(
        &p_disk.disk(),
        &d.join("replica.sock"),
        (&unix("primary.sock"), &d.join("primary.qmp")),
        &d.join("secondary.qmp"),
        mode,
        &["--state-dir", &primary_state],
    );
    wait_protected(&unix("primary.qmp"));

    let data = data();
    let data_file = d.join("data.bin");
    std::fs::write(&data_file, &data).unwrap();
    vm_writes(
        &unix_uri("vm0", &d.join("primary.sock")),
        &data_file,
        how,
        &unix("primary.qmp"),
    );

    // The power cut: storage first, then every process of the host.
    p_disk.cut();
    s_disk.cut();
    primary.signal("KILL");
    secondary.signal("KILL");

    let p = std::fs::read(&p_disk.stable).unwrap();
    let s = std::fs::read(&s_disk.stable).unwrap();
    // Promised in both modes on the primary; on the secondary by sync mode, or by a
    // checkpoint (whose drain flushes the secondary) in async mode.
    assert_eq!(
        blocks_written(&p, &data, 0..DURABLE, "primary"),
        DURABLE,
        "primary ({mode}, {how:?}): a write the VM made durable is not on stable storage"
    );
    if mode == "sync" || how == Durable::FlushAndCheckpoint {
        assert_eq!(
            blocks_written(&s, &data, 0..DURABLE, "secondary"),
            DURABLE,
            "secondary ({mode}, {how:?}): a write promised durable is not on stable storage"
        );
    }
    let plain = DURABLE..DURABLE + PLAIN;
    let s_plain = blocks_written(&s, &data, plain.clone(), "secondary");
    if mode == "sync" {
        // The cut is real: the plain writes were forwarded after the durable ones had been
        // acknowledged and nothing flushed them, so the secondary's stable storage lacks them
        // (else this test could not tell a flush from none). In async mode a forwarded flush
        // may still be running when they arrive, so no such claim there.
        assert_eq!(
            s_plain, 0,
            "unflushed writes reached stable storage: the cut is no cut"
        );
    }
    blocks_written(&p, &data, plain, "primary");
    let end = (DURABLE + PLAIN) * BLOCK;
    assert!(p[end..].iter().chain(&s[end..]).all(|&b| b == 0));
}

#[test]
fn sync_mode_keeps_fua_writes_on_both_sides_across_a_host_crash() {
    host_crash("sync", Durable::Fua);
}

#[test]
fn sync_mode_keeps_flushed_writes_on_both_sides_across_a_host_crash() {
    host_crash("sync", Durable::Flush);
}

#[test]
fn async_mode_keeps_fua_writes_on_the_primary_across_a_host_crash() {
    host_crash("async", Durable::Fua);
}

#[test]
fn async_mode_keeps_a_checkpoint_on_the_secondary_across_a_host_crash() {
    host_crash("async", Durable::FlushAndCheckpoint);
}

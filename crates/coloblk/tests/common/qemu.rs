//! QEMU 7.2 with COLO replication, unpacked (not installed) once per test run into
//! target/qemu-colo by scripts/get-qemu-colo: the reference peer of the differential tests and
//! the VMM of the guest tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct QemuColo {
    pub bin: PathBuf,
    pub data: PathBuf,
    /// SeaBIOS, for guests (`-L` it before `data`).
    pub bios: PathBuf,
    pub ld_library_path: String,
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// QEMU 7.2 with COLO replication. Unpacking it is not optional: this test compares against it,
/// so a failure to get it fails the test.
pub fn qemu_colo() -> &'static QemuColo {
    static QEMU: OnceLock<QemuColo> = OnceLock::new();
    QEMU.get_or_init(unpack_qemu)
}

fn unpack_qemu() -> QemuColo {
    let root = repo_root();
    let tool = root.join("scripts/get-qemu-colo");
    let dir = root.join("target/qemu-colo");
    assert!(
        tool.is_file(),
        "cannot get the QEMU 7.2 reference: {} does not exist",
        tool.display()
    );
    let out = Command::new("bash")
        .arg(&tool)
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "unpacking QEMU 7.2 (the reference of this test) failed: `{} {}` exited with {}\n\
         stdout: {stdout}\nstderr: {}",
        tool.display(),
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // `export LD_LIBRARY_PATH=...` and `export QEMU_COLO=... QEMU_COLO_DATA=...`
    let mut vars = HashMap::new();
    for line in stdout.lines() {
        if let Some(rest) = line.trim().strip_prefix("export ") {
            for kv in rest.split_whitespace() {
                if let Some((k, v)) = kv.split_once('=') {
                    vars.insert(k.to_string(), v.to_string());
                }
            }
        }
    }
    let var = |k: &str| {
        vars.get(k)
            .unwrap_or_else(|| panic!("get-qemu-colo printed no {k}:\n{stdout}"))
            .clone()
    };
    let q = QemuColo {
        bin: var("QEMU_COLO").into(),
        data: var("QEMU_COLO_DATA").into(),
        bios: var("QEMU_COLO_BIOS").into(),
        ld_library_path: var("LD_LIBRARY_PATH"),
    };
    let v = Command::new(&q.bin)
        .arg("--version")
        .env("LD_LIBRARY_PATH", &q.ld_library_path)
        .output()
        .unwrap_or_else(|e| panic!("the unpacked QEMU {} does not run: {e}", q.bin.display()));
    let version = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success() && version.contains("version 7.2"),
        "the unpacked QEMU {} is unusable ({}): {version}{}",
        q.bin.display(),
        v.status,
        String::from_utf8_lossy(&v.stderr)
    );
    q
}

//! Corrupt qcow2 images are refused at open, with the header field that is wrong, instead of
//! being handed to imago, which trusts them (a refcount table past the end of the file aborted
//! the whole process with a stack overflow on the first write). Images are made by
//! `qemu-img create` and then patched.

use std::path::{Path, PathBuf};
use std::process::Command;

use blockdev::{BlockDev, ErrorKind, IoPool, Qcow2, Qcow2Options, WriteFlags};
use bytes::Bytes;

/// Layout of a fresh 64 MiB image with 64 KiB clusters as qemu-img 7+ writes it: header,
/// refcount table, one refcount block, then a one-entry L1 table that ends the file.
const REFTABLE: u64 = 0x10000;
const REFBLOCK: u64 = 0x20000;
const FILE_LEN: u64 = 0x30008;

/// Byte offsets of header fields (docs/interop/qcow2.txt in QEMU).
const VERSION: u64 = 4;
const CLUSTER_BITS: u64 = 20;
const CRYPT_METHOD: u64 = 32;
const L1_SIZE: u64 = 36;
const L1_TABLE_OFFSET: u64 = 40;
const REFCOUNT_TABLE_OFFSET: u64 = 48;
const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
const NB_SNAPSHOTS: u64 = 60;
const SNAPSHOTS_OFFSET: u64 = 64;
const INCOMPATIBLE_FEATURES: u64 = 72;
const REFCOUNT_ORDER: u64 = 96;
const HEADER_LENGTH: u64 = 100;

/// A fresh image made by `qemu-img create` with `opts` (`-o ...`), 64 MiB.
fn qemu_image(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let img = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(&img)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    img
}

/// The default image (v3, 64 KiB clusters, 16-bit refcounts), checked against the layout the
/// patches below assume.
fn fresh(dir: &Path) -> PathBuf {
    let img = qemu_image(dir, "disk.qcow2", "cluster_size=65536");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), FILE_LEN);
    img
}

/// Bytes to write at an offset of the image file.
type Patch = (u64, Vec<u8>);

fn patch(img: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Opens writable and returns the error's message, asserting the kind and that nothing was
/// written.
fn refusal(img: &Path) -> String {
    let before = std::fs::read(img).unwrap();
    let e = Qcow2::open(img, Qcow2Options::default(), IoPool::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert_eq!(
        std::fs::read(img).unwrap(),
        before,
        "open changed the image"
    );
    e.to_string()
}

#[test]
fn open_refuses_a_refcount_table_past_the_end_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = fresh(dir.path());
    patch(&img, REFCOUNT_TABLE_OFFSET, &0x10_0000u64.to_be_bytes());

    let msg = refusal(&img);

    assert_eq!(
        msg,
        format!(
            "open {}: refcount_table_offset = 0x100000: the refcount table (65536 bytes) ends \
             past the end of the file ({FILE_LEN} bytes)",
            img.display()
        )
    );
}

#[test]
fn open_read_only_refuses_a_refcount_table_past_the_end_too() {
    let dir = tempfile::tempdir().unwrap();
    let img = fresh(dir.path());
    patch(&img, REFCOUNT_TABLE_OFFSET, &0x10_0000u64.to_be_bytes());
    let opts = Qcow2Options {
        read_only: true,
        ..Default::default()
    };

    let e = Qcow2::open(&img, opts, IoPool::default()).unwrap_err();

    assert!(e.to_string().contains("refcount_table_offset"), "{e}");
}

#[test]
fn each_corrupt_header_field_is_named_in_the_refusal() {
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    let be64 = |v: u64| v.to_be_bytes().to_vec();
    let cases: Vec<(&str, Vec<Patch>, &str)> = vec![
        ("magic", vec![(0, b"QFI\0".to_vec())], "not a qcow2 image"),
        ("version", vec![(VERSION, be32(4))], "version = 4: "),
        (
            "small clusters",
            vec![(CLUSTER_BITS, be32(8))],
            "cluster_bits = 8: must be 9 to 21",
        ),
        (
            "huge clusters",
            vec![(CLUSTER_BITS, be32(40))],
            "cluster_bits = 40: ",
        ),
        (
            "encrypted",
            vec![(CRYPT_METHOD, be32(2))],
            "crypt_method = 2: encrypted images",
        ),
        (
            "dirty",
            vec![(INCOMPATIBLE_FEATURES, be64(1))],
            "incompatible_features = 0x1: not supported: bit 0, dirty",
        ),
        (
            "unknown feature",
            vec![(INCOMPATIBLE_FEATURES, be64(1 << 40))],
            "incompatible_features = 0x10000000000: not supported: bit 40, unknown",
        ),
        (
            "refcount width",
            vec![(REFCOUNT_ORDER, be32(7))],
            "refcount_order = 7: ",
        ),
        (
            "short header",
            vec![(HEADER_LENGTH, be32(96))],
            "header_length = 96: ",
        ),
        (
            "no refcount table",
            vec![(REFCOUNT_TABLE_CLUSTERS, be32(0))],
            "refcount_table_clusters = 0: the image has no refcount table",
        ),
        (
            "refcount table too big",
            vec![(REFCOUNT_TABLE_CLUSTERS, be32(129))],
            "refcount_table_clusters = 129: the table would exceed QEMU's limit",
        ),
        (
            "unaligned refcount table",
            vec![(REFCOUNT_TABLE_OFFSET, be64(REFTABLE + 512))],
            "refcount_table_offset = 0x10200: not aligned to the 65536-byte cluster size",
        ),
        (
            "refcount table on the header",
            vec![(REFCOUNT_TABLE_OFFSET, be64(0))],
            "refcount_table_offset = 0x0: the refcount table would overlap the header",
        ),
        (
            "refcount table at the end of the address space",
            vec![(REFCOUNT_TABLE_OFFSET, be64(0xffff_ffff_ffff_0000))],
            "refcount_table_offset = 0xffffffffffff0000: the refcount table (65536 bytes) ends \
             past the end of the file",
        ),
        (
            "L1 table past the end",
            vec![(L1_TABLE_OFFSET, be64(0x40000))],
            "l1_table_offset = 0x40000: the L1 table (8 bytes) ends past the end of the file",
        ),
        (
            "unaligned L1 table",
            vec![(L1_TABLE_OFFSET, be64(0x30200))],
            "l1_table_offset = 0x30200: not aligned",
        ),
        (
            "L1 table too small",
            vec![(L1_SIZE, be32(0))],
            "l1_size = 0: the virtual size (67108864 bytes) needs 1 entries",
        ),
        (
            "L1 table too big",
            vec![(L1_SIZE, be32(5_000_000))],
            "l1_size = 5000000: the table would exceed QEMU's limit",
        ),
        (
            "snapshots",
            vec![(NB_SNAPSHOTS, be32(70_000))],
            "nb_snapshots = 70000: ",
        ),
        (
            "unaligned snapshots",
            vec![(NB_SNAPSHOTS, be32(1)), (SNAPSHOTS_OFFSET, be64(0x30008))],
            "snapshots_offset = 0x30008: not aligned",
        ),
        (
            "no refcount block for the header",
            vec![(REFTABLE, be64(0))],
            "refcount table entry 0 = 0x0: no refcount block counts the header's cluster",
        ),
        (
            "refcount block past the end",
            vec![(REFTABLE + 8, be64(0x40000))],
            "refcount table entry 1 = 0x40000: refcount block ends past the end of the file",
        ),
        (
            "unaligned refcount block",
            vec![(REFTABLE, be64(REFBLOCK + 512))],
            "refcount table entry 0 = 0x20200: refcount block not aligned",
        ),
        (
            "header cluster free",
            vec![(REFBLOCK, vec![0, 0])],
            "refcount table entry 0 = 0x20000: its refcount block says the header's cluster \
             is free",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, patches, expected) in cases {
        let img = fresh(dir.path());
        for (at, bytes) in &patches {
            patch(&img, *at, bytes);
        }

        let msg = refusal(&img);

        assert!(msg.contains(expected), "{what}: {msg:?} lacks {expected:?}");
    }
}

#[test]
fn open_refuses_a_file_shorter_than_a_header() {
    let dir = tempfile::tempdir().unwrap();
    let img = fresh(dir.path());
    let head = std::fs::read(&img).unwrap()[..50].to_vec();
    std::fs::write(&img, head).unwrap();

    let msg = refusal(&img);

    assert!(
        msg.ends_with("the file (50 bytes) is shorter than a qcow2 v3 header"),
        "{msg}"
    );
}

/// The checks must not refuse what QEMU writes: every cluster size and refcount width (the
/// sub-byte widths pack the header's refcount into the low bits), and v2 images.
#[tokio::test]
async fn every_layout_qemu_img_creates_opens_and_takes_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let layouts = [
        "cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64",
        "compat=0.10",
        "preallocation=metadata",
    ];
    for (i, opts) in layouts.iter().enumerate() {
        let img = qemu_image(dir.path(), &format!("{i}.qcow2"), opts);
        let dev = Qcow2::open(&img, Qcow2Options::default(), IoPool::default())
            .unwrap_or_else(|e| panic!("{opts}: {e}"));
        dev.write(1 << 20, Bytes::from(vec![7u8; 4096]), WriteFlags::default())
            .await
            .unwrap_or_else(|e| panic!("{opts}: {e}"));
        assert_eq!(
            &dev.read(1 << 20, 4096).await.unwrap()[..],
            &[7u8; 4096][..]
        );
        dev.close().await.unwrap();
    }
}

/// What the checks protect against: imago 0.2.6 alone, given the image `open` now refuses,
/// overflows its stack on the first write that allocates. Run in a child process (this test
/// binary again), because a stack overflow aborts the whole process. If this starts to fail
/// because imago returns an error instead, the upstream bug is fixed: update
/// docs/upstream/imago-refcount-table-offset.md.
#[test]
fn imago_alone_aborts_on_a_refcount_table_past_the_end() {
    const CHILD: &str = "COLOBLK_IMAGO_CHILD_IMAGE";
    if let Some(img) = std::env::var_os(CHILD) {
        write_with_imago_alone(Path::new(&img));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = fresh(dir.path());
    patch(&img, REFCOUNT_TABLE_OFFSET, &0x10_0000u64.to_be_bytes());

    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "imago_alone_aborts_on_a_refcount_table_past_the_end",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &img)
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(6), "not SIGABRT: {out:?}");
    assert!(stderr.contains("has overflowed its stack"), "{stderr}");
}

/// Opens `img` with imago directly (no checks of ours) and writes one sector.
fn write_with_imago_alone(img: &Path) {
    use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
    let qcow2 = imago::qcow2::Qcow2::<imago::file::File>::builder_path(img)
        .write(true)
        .open(PermissiveImplicitOpenGate::default())
        .expect("imago opens the image");
    let access = FormatAccess::new(qcow2);
    let r = access.write(&[0xa5u8; 512][..], 0);
    eprintln!("imago's write returned {r:?}");
}

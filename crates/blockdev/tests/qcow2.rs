//! The qcow2 driver against QEMU's own tools: images we write must pass `qemu-img check` and
//! read back byte for byte through `qemu-img convert`; images QEMU writes must read back byte for
//! byte through us; our block status must agree with `qemu-img map`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockdev::{
    BlockDev, ErrorKind, Extent, ExtentList, ImageFormat, IoPool, Qcow2, Qcow2Backing,
    Qcow2CreateOptions, Qcow2Options, WriteFlags, ZeroFlags,
};
use bytes::Bytes;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CLUSTER: u64 = 64 * KIB;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Runs a QEMU tool, requires success, returns stdout.
fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check`: exits 0 only without corruptions and without leaked clusters.
fn assert_qemu_check(img: &Path) {
    let out = run("qemu-img", &["check", "-f", "qcow2", s(img)]);
    assert!(out.contains("No errors were found"), "{out}");
}

fn qemu_info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&run(
        "qemu-img",
        &["info", "--output=json", "-f", "qcow2", s(img)],
    ))
    .unwrap()
}

/// The guest-visible bytes of `img` (whole chain), as QEMU sees them.
fn qemu_bytes(img: &Path) -> Vec<u8> {
    let out = img.with_extension("converted.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(img), s(&out)],
    );
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// `qemu-img map` translated into our `base:allocation` convention for the top image: depth 0
/// and present => data or zero; anything else is a hole, zero only without a backing image.
fn qemu_map(img: &Path, has_backing: bool) -> ExtentList {
    let out = run("qemu-img", &["map", "--output=json", "-f", "qcow2", s(img)]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut list = ExtentList::new();
    for e in entries {
        let len = e["length"].as_u64().unwrap();
        let own = e["depth"].as_u64().unwrap() == 0 && e["present"].as_bool().unwrap();
        list.push(if own && e["data"].as_bool().unwrap() {
            Extent::data(len)
        } else if own {
            assert!(e["zero"].as_bool().unwrap(), "{e}");
            Extent::zero(len)
        } else if has_backing {
            Extent {
                len,
                hole: true,
                zero: false,
            }
        } else {
            Extent::hole(len)
        });
    }
    list
}

/// Deterministic non-repeating bytes (so misplaced data cannot match by accident).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    testutil::pattern(seed, len).to_vec()
}

/// A byte-exact model of the device, updated alongside it.
struct Model(Vec<u8>);

impl Model {
    fn put(&mut self, offset: u64, data: &[u8]) {
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
    fn fill(&mut self, offset: u64, len: u64, byte: u8) {
        self.0[offset as usize..(offset + len) as usize].fill(byte);
    }
}

async fn write(dev: &Qcow2, model: &mut Model, offset: u64, data: Vec<u8>) {
    model.put(offset, &data);
    dev.write(offset, Bytes::from(data), WriteFlags::default())
        .await
        .unwrap();
}

async fn read_all(dev: &Qcow2) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < dev.len() {
        let n = (dev.len() - pos).min(4 * MIB);
        out.extend_from_slice(&dev.read(pos, n as usize).await.unwrap());
        pos += n;
    }
    out
}

fn open(img: &Path) -> Qcow2 {
    Qcow2::open(img, Qcow2Options::default(), IoPool::default()).unwrap()
}

fn create(img: &Path, len: u64) {
    Qcow2::create(img, len, Qcow2CreateOptions::default()).unwrap();
}

/// A raw base of `len` bytes of `byte`, and a qcow2 overlay over it made by `qemu-img create`.
fn base_and_overlay(dir: &Path, len: u64, byte: u8) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![byte; len as usize]).unwrap();
    let overlay = dir.join("overlay.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&overlay),
        ],
    );
    (base, overlay)
}

// ---------------------------------------------------------------------------------------------
// Creation

#[tokio::test]
async fn create_makes_images_qemu_img_checks_and_describes() {
    let dir = tempfile::tempdir().unwrap();

    let big = dir.path().join("big.qcow2");
    create(&big, 100 * MIB);
    assert_qemu_check(&big);
    let info = qemu_info(&big);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 100 * MIB);
    assert_eq!(info["cluster-size"], 64 * KIB);
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");

    let small = dir.path().join("small.qcow2");
    let opts = Qcow2CreateOptions {
        cluster_size: 4096,
        backing: None,
    };
    Qcow2::create(&small, MIB + 512, opts).unwrap();
    assert_qemu_check(&small);
    let info = qemu_info(&small);
    assert_eq!(info["virtual-size"], MIB + 512);
    assert_eq!(info["cluster-size"], 4096);

    std::fs::write(dir.path().join("base.raw"), vec![0x11u8; MIB as usize]).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    let backing = Some((PathBuf::from("base.raw"), ImageFormat::Raw));
    Qcow2::create(
        &overlay,
        MIB,
        Qcow2CreateOptions {
            backing,
            ..Default::default()
        },
    )
    .unwrap();
    assert_qemu_check(&overlay);
    let info = qemu_info(&overlay);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    let dev = open(&overlay);
    assert!(dev.has_backing());
    assert_eq!(read_all(&dev).await, vec![0x11u8; MIB as usize]);
}

#[test]
fn create_refuses_a_missing_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let backing = Some((PathBuf::from("nowhere.raw"), ImageFormat::Raw));
    let e = Qcow2::create(
        dir.path().join("o.qcow2"),
        MIB,
        Qcow2CreateOptions {
            backing,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Io(_)), "{e}");
    assert!(!dir.path().join("o.qcow2").exists());
}

// ---------------------------------------------------------------------------------------------
// Data round trips with QEMU

#[tokio::test]
async fn driver_writes_read_back_exactly_through_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let len = 4 * MIB;
    create(&img, len);
    let dev = open(&img);
    let mut model = Model(vec![0; len as usize]);

    write(&dev, &mut model, 0, pattern(1, CLUSTER as usize)).await; // one whole cluster
    write(&dev, &mut model, 100_000, pattern(2, 5000)).await; // inside a cluster
    write(&dev, &mut model, 3 * CLUSTER - 10, pattern(3, 200_000)).await; // across clusters
    write(&dev, &mut model, 10, pattern(4, 20)).await; // overwrite inside allocated data
    write(&dev, &mut model, len - 1, vec![0xee]).await; // the last byte
    let fua = pattern(5, 777);
    model.put(2 * MIB + 3, &fua);
    dev.write(2 * MIB + 3, Bytes::from(fua), WriteFlags { fua: true })
        .await
        .unwrap();

    assert_eq!(read_all(&dev).await, model.0);
    dev.close().await.unwrap();
    assert_qemu_check(&img);
    assert_eq!(qemu_bytes(&img), model.0);
    assert_eq!(
        read_all(&open(&img)).await,
        model.0,
        "reopened image differs"
    );
}

#[tokio::test]
async fn qemu_io_writes_read_back_exactly_through_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.qcow2");
    create(&img, MIB);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "write -P 0xa5 70000 3000",
            "-c",
            "write -P 0x77 196608 65536",
            "-c",
            "write -z 196608 65536",
            s(&img),
        ],
    );
    let mut model = Model(vec![0; MIB as usize]);
    model.fill(0, 64 * KIB, 0x5a);
    model.fill(70000, 3000, 0xa5);

    let dev = Qcow2::open(
        &img,
        Qcow2Options {
            read_only: true,
            ..Default::default()
        },
        IoPool::default(),
    )
    .unwrap();
    assert_eq!(read_all(&dev).await, model.0);
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap(),
        qemu_map(&img, false)
    );
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap().0,
        vec![
            Extent::data(2 * CLUSTER),
            Extent::hole(CLUSTER),
            Extent::zero(CLUSTER),
            Extent::hole(MIB - 4 * CLUSTER)
        ]
    );
}

#[tokio::test]
async fn compressed_clusters_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; MIB as usize];
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        chunk.fill(i as u8); // compressible, but every 4 KiB differs
    }
    data[500_000..500_100].copy_from_slice(&pattern(7, 100));
    std::fs::write(&raw, &data).unwrap();
    let img = dir.path().join("c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&img),
        ],
    );
    assert!(
        qemu_map(&img, false).iter().all(|e| !e.hole),
        "the image is fully allocated"
    );

    let dev = open(&img);
    assert_eq!(read_all(&dev).await, data);
    // Writing into a compressed cluster decompresses it into a new data cluster.
    dev.write(4096 + 3, Bytes::from_static(b"xyz"), WriteFlags::default())
        .await
        .unwrap();
    data[4099..4102].copy_from_slice(b"xyz");
    assert_eq!(read_all(&dev).await, data);
    dev.close().await.unwrap();
    assert_qemu_check(&img);
    assert_eq!(qemu_bytes(&img), data);
}

// ---------------------------------------------------------------------------------------------
// Backing chains

#[tokio::test]
async fn overlay_reads_the_base_and_writes_only_to_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (base, overlay) = base_and_overlay(dir.path(), MIB, 0x11);
    let dev = open(&overlay);
    assert!(dev.has_backing());
    let mut model = Model(vec![0x11; MIB as usize]);
    assert_eq!(read_all(&dev).await, model.0);

    write(&dev, &mut model, 70_000, vec![0x22; 1000]).await; // COW of one partial cluster
    write(
        &dev,
        &mut model,
        5 * CLUSTER,
        vec![0x33; 2 * CLUSTER as usize],
    )
    .await; // whole clusters

    assert_eq!(read_all(&dev).await, model.0);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        vec![0x11u8; MIB as usize],
        "base modified"
    );
    dev.flush().await.unwrap();
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap().0,
        vec![
            Extent {
                len: CLUSTER,
                hole: true,
                zero: false
            },
            Extent::data(CLUSTER),
            Extent {
                len: 3 * CLUSTER,
                hole: true,
                zero: false
            },
            Extent::data(2 * CLUSTER),
            Extent {
                len: MIB - 7 * CLUSTER,
                hole: true,
                zero: false
            },
        ]
    );
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap(),
        qemu_map(&overlay, true)
    );
    dev.close().await.unwrap();
    assert_qemu_check(&overlay);
    assert_eq!(qemu_bytes(&overlay), model.0);
}

#[tokio::test]
async fn discard_returns_whole_clusters_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, overlay) = base_and_overlay(dir.path(), MIB, 0x11);
    let dev = open(&overlay);
    let mut model = Model(vec![0x11; MIB as usize]);
    write(&dev, &mut model, 0, vec![0x22; 4 * CLUSTER as usize]).await;

    // Clusters 1 and 2 entirely, plus 100 bytes of cluster 3 (which keeps its data).
    dev.discard(CLUSTER, 2 * CLUSTER + 100).await.unwrap();
    model.fill(CLUSTER, 2 * CLUSTER, 0x11);

    assert_eq!(read_all(&dev).await, model.0);
    let backing_hole = |len| Extent {
        len,
        hole: true,
        zero: false,
    };
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap().0,
        vec![
            Extent::data(CLUSTER),
            backing_hole(2 * CLUSTER),
            Extent::data(CLUSTER),
            backing_hole(MIB - 4 * CLUSTER)
        ]
    );
    dev.flush().await.unwrap();
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap(),
        qemu_map(&overlay, true)
    );
    dev.close().await.unwrap();
    assert_qemu_check(&overlay);
    assert_eq!(qemu_bytes(&overlay), model.0);
}

#[tokio::test]
async fn make_empty_returns_every_cluster_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let len = 8 * MIB;
    let (_base, overlay) = base_and_overlay(dir.path(), len, 0x11);
    let dev = open(&overlay);
    let mut model = Model(vec![0x11; len as usize]);
    write(&dev, &mut model, 0, pattern(1, 10)).await;
    write(
        &dev,
        &mut model,
        3 * MIB + 7,
        pattern(2, 3 * CLUSTER as usize),
    )
    .await;
    write(
        &dev,
        &mut model,
        len - CLUSTER,
        pattern(3, CLUSTER as usize),
    )
    .await;
    dev.write_zeroes(MIB, 2 * CLUSTER, ZeroFlags::default())
        .await
        .unwrap();
    assert_ne!(read_all(&dev).await, vec![0x11u8; len as usize]);

    let emptied = dev.make_empty().await.unwrap();
    assert_eq!(emptied, 8 * CLUSTER); // 1 + 4 + 1 data clusters and 2 zero clusters
    assert_eq!(read_all(&dev).await, vec![0x11u8; len as usize]);
    let all_backing = vec![Extent {
        len,
        hole: true,
        zero: false,
    }];
    assert_eq!(dev.block_status(0, len).await.unwrap().0, all_backing);
    dev.flush().await.unwrap();
    assert_eq!(qemu_map(&overlay, true).0, all_backing);
    assert_qemu_check(&overlay);

    // The emptied overlay is usable again, and reuses the freed clusters.
    let size_before = std::fs::metadata(&overlay).unwrap().len();
    let mut model = Model(vec![0x11; len as usize]);
    write(&dev, &mut model, 2 * MIB, pattern(4, 4 * CLUSTER as usize)).await;
    dev.close().await.unwrap();
    assert_eq!(
        std::fs::metadata(&overlay).unwrap().len(),
        size_before,
        "freed clusters not reused"
    );
    assert_qemu_check(&overlay);
    assert_eq!(qemu_bytes(&overlay), model.0);
}

#[tokio::test]
async fn backing_override_replaces_or_removes_the_recorded_base() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, overlay) = base_and_overlay(dir.path(), MIB, 0x11);
    let other = dir.path().join("other.raw");
    std::fs::write(&other, vec![0x33u8; MIB as usize]).unwrap();
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 0 4k", s(&overlay)],
    );
    let mut expect = vec![0x11u8; MIB as usize];
    expect[..4096].fill(0x44);

    let with = |backing| {
        Qcow2::open(
            &overlay,
            Qcow2Options {
                read_only: true,
                backing,
                ..Default::default()
            },
            IoPool::default(),
        )
        .unwrap()
    };
    assert_eq!(read_all(&with(Qcow2Backing::FromHeader)).await, expect);

    // Cluster 0 was copied up from the recorded base when qemu-io wrote into it.
    let dev = with(Qcow2Backing::File {
        path: other.clone(),
        format: ImageFormat::Raw,
    });
    expect[CLUSTER as usize..].fill(0x33);
    assert_eq!(read_all(&dev).await, expect);

    let dev = with(Qcow2Backing::None);
    assert!(!dev.has_backing());
    expect[CLUSTER as usize..].fill(0);
    assert_eq!(read_all(&dev).await, expect);
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap().0,
        vec![Extent::data(CLUSTER), Extent::hole(MIB - CLUSTER)]
    );
}

#[tokio::test]
async fn three_level_chain_reads_each_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, mid) = base_and_overlay(dir.path(), MIB, 0x11);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 0 64k", s(&mid)],
    );
    let top = dir.path().join("top.qcow2");
    let backing = Some((PathBuf::from("overlay.qcow2"), ImageFormat::Qcow2));
    Qcow2::create(
        &top,
        MIB,
        Qcow2CreateOptions {
            backing,
            ..Default::default()
        },
    )
    .unwrap();

    let dev = open(&top);
    let mut model = Model(vec![0x11; MIB as usize]);
    model.fill(0, CLUSTER, 0x44);
    assert_eq!(read_all(&dev).await, model.0);
    write(&dev, &mut model, CLUSTER - 8, vec![0x55; 16]).await; // COW from both lower layers
    assert_eq!(read_all(&dev).await, model.0);
    dev.close().await.unwrap();
    assert_qemu_check(&top);
    assert_qemu_check(&mid);
    assert_eq!(qemu_bytes(&top), model.0);
}

// ---------------------------------------------------------------------------------------------
// Zeroes

#[tokio::test]
async fn write_zeroes_uses_zero_clusters_and_hides_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, overlay) = base_and_overlay(dir.path(), MIB, 0x11);
    let dev = open(&overlay);
    assert!(dev.info().fast_zero);
    let mut model = Model(vec![0x11; MIB as usize]);
    write(&dev, &mut model, 0, vec![0x22; 2 * CLUSTER as usize]).await;

    dev.write_zeroes(0, 2 * CLUSTER, ZeroFlags::default())
        .await
        .unwrap(); // allocation kept
    model.fill(0, 2 * CLUSTER, 0);
    dev.write_zeroes(
        3 * CLUSTER,
        CLUSTER,
        ZeroFlags {
            may_unmap: true,
            fast_only: true,
            fua: true,
        },
    )
    .await
    .unwrap();
    model.fill(3 * CLUSTER, CLUSTER, 0);
    dev.write_zeroes(
        5 * CLUSTER + 100,
        1000,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .await
    .unwrap(); // partial: COW from the base, then zeroes as data
    model.fill(5 * CLUSTER + 100, 1000, 0);
    let e = dev
        .write_zeroes(
            7 * CLUSTER + 1,
            CLUSTER,
            ZeroFlags {
                fast_only: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotSupported);

    assert_eq!(read_all(&dev).await, model.0);
    let backing_hole = |len| Extent {
        len,
        hole: true,
        zero: false,
    };
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap().0,
        vec![
            Extent::zero(2 * CLUSTER),
            backing_hole(CLUSTER),
            Extent::zero(CLUSTER),
            backing_hole(CLUSTER),
            Extent::data(CLUSTER),
            backing_hole(MIB - 6 * CLUSTER),
        ]
    );
    dev.flush().await.unwrap();
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap(),
        qemu_map(&overlay, true)
    );
    dev.close().await.unwrap();
    assert_qemu_check(&overlay);
    assert_eq!(qemu_bytes(&overlay), model.0);
}

#[tokio::test]
async fn v2_image_writes_zeroes_as_data_and_refuses_fast_zero() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v2.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            s(&img),
            "1M",
        ],
    );
    let dev = open(&img);
    assert!(!dev.info().fast_zero);
    let mut model = Model(vec![0; MIB as usize]);
    write(&dev, &mut model, 0, vec![0x22; 3 * CLUSTER as usize]).await;

    let e = dev
        .write_zeroes(
            0,
            CLUSTER,
            ZeroFlags {
                fast_only: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotSupported);
    dev.write_zeroes(
        10,
        CLUSTER,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    model.fill(10, CLUSTER, 0);
    dev.discard(2 * CLUSTER, CLUSTER).await.unwrap(); // discard-to-backing works on v2
    model.fill(2 * CLUSTER, CLUSTER, 0);

    assert_eq!(read_all(&dev).await, model.0);
    assert_eq!(
        dev.block_status(0, MIB).await.unwrap().0,
        vec![Extent::data(2 * CLUSTER), Extent::hole(MIB - 2 * CLUSTER)]
    );
    dev.close().await.unwrap();
    assert_qemu_check(&img);
    assert_eq!(qemu_bytes(&img), model.0);
}

#[test]
fn dropping_without_close_still_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dropped.qcow2");
    create(&img, MIB);
    let data = pattern(11, 3 * CLUSTER as usize);

    // Dropped inside a runtime: the flush runs on a blocking thread, which the runtime's own
    // drop waits for.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dev = open(&img);
        dev.write(
            CLUSTER / 2,
            Bytes::from(data.clone()),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        drop(dev);
    });
    drop(rt);

    assert_qemu_check(&img);
    let mut expect = vec![0u8; MIB as usize];
    expect[CLUSTER as usize / 2..][..data.len()].copy_from_slice(&data);
    assert_eq!(qemu_bytes(&img), expect);
}

// ---------------------------------------------------------------------------------------------
// Access rules and concurrency

#[tokio::test]
async fn read_only_image_refuses_changes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.qcow2");
    create(&img, MIB);
    let dev = Qcow2::open(
        &img,
        Qcow2Options {
            read_only: true,
            ..Default::default()
        },
        IoPool::default(),
    )
    .unwrap();
    let info = dev.info();
    assert!(info.read_only && !info.can_discard && !info.fast_zero);
    assert_eq!(info.preferred_block, CLUSTER as u32);
    assert_eq!(info.min_block, 1);
    let ro = |r: blockdev::Result<()>| assert_eq!(r.unwrap_err().kind, ErrorKind::ReadOnly);
    ro(dev
        .write(0, Bytes::from_static(b"x"), WriteFlags::default())
        .await);
    ro(dev.write_zeroes(0, CLUSTER, ZeroFlags::default()).await);
    ro(dev.discard(0, CLUSTER).await);
    ro(dev.make_empty().await.map(|_| ()));
    assert_eq!(dev.read(MIB - 1, 1).await.unwrap()[..], [0]);
    assert_eq!(
        dev.read(MIB, 1).await.unwrap_err().kind,
        ErrorKind::OutOfRange
    );
    assert_eq!(
        dev.block_status(MIB - 1, 2).await.unwrap_err().kind,
        ErrorKind::OutOfRange
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_into_shared_clusters_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, overlay) = base_and_overlay(dir.path(), 4 * MIB, 0x11);
    let dev = Arc::new(Qcow2::open(&overlay, Qcow2Options::default(), IoPool::new(16)).unwrap());
    let mut model = Model(vec![0x11; 4 * MIB as usize]);

    // 96 writes of 3000 bytes, 8 per cluster over 12 clusters spread across the disk: many race
    // to allocate (and copy up from the base) the same cluster.
    let mut tasks = Vec::new();
    for i in 0..96u64 {
        let offset = (i % 12) * 5 * CLUSTER + (i / 12) * 8000 + 7;
        let data = pattern(100 + i, 3000);
        model.put(offset, &data);
        let dev = dev.clone();
        tasks.push(tokio::spawn(async move {
            dev.write(offset, Bytes::from(data), WriteFlags::default())
                .await
                .unwrap();
            dev.read(offset, 3000).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    assert_eq!(read_all(&dev).await, model.0);
    Arc::into_inner(dev).unwrap().close().await.unwrap();
    assert_qemu_check(&overlay);
    assert_eq!(qemu_bytes(&overlay), model.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_waits_for_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let half = 2 * MIB;
    let (_base, overlay) = base_and_overlay(dir.path(), 2 * half, 0x11);
    let dev = Arc::new(open(&overlay));

    // Writes to the first half race with discards of the second half; neither may disturb the
    // other's clusters.
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let dev = dev.clone();
        tasks.push(tokio::spawn(async move {
            let offset = i * CLUSTER;
            dev.write(offset, Bytes::from(vec![0x22; 4096]), WriteFlags::default())
                .await
                .unwrap();
            dev.write(
                half + offset,
                Bytes::from(vec![0x33; 4096]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            dev.discard(half + offset, CLUSTER).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let mut model = Model(vec![0x11; 2 * half as usize]);
    for i in 0..32u64 {
        model.fill(i * CLUSTER, 4096, 0x22);
    }
    assert_eq!(read_all(&dev).await, model.0);
    Arc::into_inner(dev).unwrap().close().await.unwrap();
    assert_qemu_check(&overlay);
    assert_eq!(qemu_bytes(&overlay), model.0);
}

// ---------------------------------------------------------------------------------------------
// Cost proportional to allocation, not to disk size

const TIB: u64 = 1024 * 1024 * MIB;

#[tokio::test]
async fn zeroing_a_terabyte_image_touches_only_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    create(&img, TIB);
    let dev = open(&img);
    let size_before = std::fs::metadata(&img).unwrap().len();

    dev.write_zeroes(0, TIB, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(
        dev.block_status(0, TIB).await.unwrap().0,
        vec![Extent::hole(TIB)]
    );
    dev.flush().await.unwrap();
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        size_before,
        "metadata was allocated"
    );

    let far = 300 * 1024 * MIB;
    dev.write(far, Bytes::from(vec![9u8; 100]), WriteFlags::default())
        .await
        .unwrap();
    dev.write_zeroes(0, TIB, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(&dev.read(far, 100).await.unwrap()[..], &[0u8; 100][..]);
    let expect = vec![
        Extent::hole(far),
        Extent::zero(CLUSTER),
        Extent::hole(TIB - far - CLUSTER),
    ];
    assert_eq!(dev.block_status(0, TIB).await.unwrap().0, expect);
    dev.close().await.unwrap();
    assert_eq!(qemu_map(&img, false).0, expect);
    assert_qemu_check(&img);
}

#[tokio::test]
async fn make_empty_of_a_terabyte_overlay_touches_only_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::File::create(&base).unwrap().set_len(TIB).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    let backing = Some((base.clone(), ImageFormat::Raw));
    Qcow2::create(
        &overlay,
        TIB,
        Qcow2CreateOptions {
            backing,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = open(&overlay);
    for offset in [0, 300 * 1024 * MIB + 5, TIB - CLUSTER] {
        dev.write(offset, Bytes::from(vec![7u8; 10]), WriteFlags::default())
            .await
            .unwrap();
    }

    let started = std::time::Instant::now();
    assert_eq!(dev.make_empty().await.unwrap(), 3 * CLUSTER);
    let all_backing = vec![Extent {
        len: TIB,
        hole: true,
        zero: false,
    }];
    assert_eq!(dev.block_status(0, TIB).await.unwrap().0, all_backing);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        &dev.read(300 * 1024 * MIB, 64).await.unwrap()[..],
        &[0u8; 64][..]
    );
    dev.close().await.unwrap();
    assert_eq!(qemu_map(&overlay, true).0, all_backing);
    assert_qemu_check(&overlay);
}

#[tokio::test]
async fn direct_io_round_trips_unaligned_requests() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("direct.qcow2");
    create(&img, MIB);
    let opts = Qcow2Options {
        direct: true,
        ..Default::default()
    };
    let dev = match Qcow2::open(&img, opts, IoPool::default()) {
        Ok(dev) => dev,
        // tmpfs refuses O_DIRECT; nothing to test there.
        Err(e) if e.kind == ErrorKind::Io(Some(22)) => return,
        Err(e) => panic!("{e}"),
    };
    assert!(dev.info().min_block >= 512, "{:?}", dev.info());
    let mut model = Model(vec![0; MIB as usize]);
    write(&dev, &mut model, 1000, pattern(9, 100_000)).await;
    assert_eq!(read_all(&dev).await, model.0);
    dev.close().await.unwrap();
    assert_qemu_check(&img);
    assert_eq!(qemu_bytes(&img), model.0);
}

//! A failover merge cut short by the death of the process, resumed from its record.
//!
//! A "crash" here: every request to the disk hangs from one moment on, and the runtime that
//! ran the node is shut down (its tasks are dropped mid-await, as a killed process's are).
//! The files stay: the raw disk, the overlays' store files, the merge record. A new node then
//! resumes from them on a fresh runtime. VM writes acknowledged before the crash must survive
//! the resumed merge byte for byte, and the disk must end as the view the VM saw.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blockdev::{BlockDev, IoPool, RawFile, RawOptions, WriteFlags};
use bytes::Bytes;
use common::{Backend, Faulty, MIB, config, pattern};
use replication::secondary::SecondaryNode;
use replication::{Mode, Stage};

const K: u64 = 64 * 1024;
const LEN: u64 = 8 * MIB;

fn raw(path: &Path) -> Arc<dyn BlockDev> {
    Arc::new(RawFile::open(path, RawOptions::default(), IoPool::default()).unwrap())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Bytes `seed`-distinct per call, so that every write is told apart from every other.
fn data(len: u64, seed: u64) -> Bytes {
    testutil::pattern(seed, len as usize)
}

/// Writes `d` at `off` through `dev` and into `model`.
async fn write(dev: &dyn BlockDev, model: &mut [u8], off: u64, d: Bytes) {
    model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    dev.write(off, d, WriteFlags::default()).await.unwrap();
}

/// What the crash leaves, and what the disk must end as.
struct Crashed {
    dir: tempfile::TempDir,
    /// The view the VM was promised: its view at failover plus its writes since.
    expected: Vec<u8>,
    /// The merge was still running when the crash came.
    mid_merge: bool,
}

/// The state directory (the merge record's home) inside the test's directory.
fn state(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("state")
}

/// Runs a node to a failover and crashes it once the merge has done `fraction` of its bytes
/// (`None`: after the merge is done, before anything else), with VM writes during the merge:
/// to a cluster no overlay holds, to one still held, and to one already merged.
fn crash_during_merge(fraction: Option<f64>) -> Crashed {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secondary.raw");
    RawFile::create(&path, LEN).unwrap();
    std::fs::create_dir(state(&dir)).unwrap();
    let rt = runtime();
    let (expected, mid_merge) = rt.block_on(async {
        let disk = Arc::new(Faulty::new(raw(&path)));
        let node = SecondaryNode::new(disk.clone(), config(Backend::Raw, &dir, K)).unwrap();
        node.keep_merge_record_in(state(&dir));
        let mut model = vec![0u8; LEN as usize];
        write(&*disk, &mut model, 0, pattern(LEN, 0xAA)).await;
        node.start(Mode::Secondary).await.unwrap();
        let (replica, top) = (node.replica(), node.top());
        // The primary changes every third cluster (copy-before-write keeps the old content in
        // the hidden overlay: the view keeps 0xAA there); the VM writes every second cluster,
        // partly (a block and a half, so one block is read-modify-written).
        let mut primary = model.clone();
        for c in (0..LEN / K).step_by(3) {
            write(&replica, &mut primary, c * K, data(K, 1000 + c)).await;
        }
        for c in (0..LEN / K).step_by(2) {
            write(&top, &mut model, c * K + 512, data(768, 2000 + c)).await;
        }
        assert_eq!(
            &top.read(0, LEN as usize).await.unwrap()[..],
            &model[..],
            "the view before failover"
        );
        // A slow disk: the merge takes a while, so the crash lands inside it.
        disk.delay_us.store(3000, Ordering::Relaxed);
        node.stop(true).await.unwrap();
        assert!(
            SecondaryNode::has_merge_record(&state(&dir)),
            "the record is written before the merge touches the disk"
        );
        let total = node.failover_progress().total;
        assert!(total > 0);
        match fraction {
            Some(f) => {
                while (node.failover_progress().done as f64) < f * total as f64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // Cluster 1: neither the primary nor the VM wrote it (held by no overlay).
                // Cluster 3: written by the primary only; the merge runs in disk order, so
                // the last dirty cluster is still held unless the merge is nearly done.
                // Cluster 0: the first merged (when anything is).
                let last = LEN / K - 2;
                for (c, seed) in [(1, 1), (last, 2), (0, 3), (3, 4)] {
                    write(&top, &mut model, c * K + 4096, data(8192, 3000 + seed)).await;
                }
            }
            None => node.wait_failover().await.unwrap(),
        }
        // The crash: the disk answers nothing more, the runtime's tasks are dropped.
        Faulty::set(&disk.hang, true);
        tokio::time::sleep(Duration::from_millis(50)).await;
        (model, node.stage() == Stage::Failover)
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    Crashed {
        dir,
        expected,
        mid_merge,
    }
}

/// Resumes the crashed merge on a fresh runtime; returns the disk once it is done.
fn resume(c: &Crashed) -> Vec<u8> {
    let rt = runtime();
    rt.block_on(async {
        let disk = raw(&c.dir.path().join("secondary.raw"));
        let boot = replication::state::boot_id();
        let node = SecondaryNode::resume(
            disk.clone(),
            IoPool::default(),
            &state(&c.dir),
            boot.as_deref(),
        )
        .unwrap()
        .expect("a record to resume from");
        assert!(node.status().resumed);
        // The VM's view while the merge resumes is the promised one.
        assert_eq!(
            first_difference(
                &node.top().read(0, LEN as usize).await.unwrap(),
                &c.expected
            ),
            None,
            "the view during the resumed merge"
        );
        node.wait_failover().await.unwrap();
        assert_eq!(node.stage(), Stage::Done);
        let p = node.failover_progress();
        assert_eq!(p.done, p.total, "{p:?}");
        SecondaryNode::discard_merge_record(&state(&c.dir)).unwrap();
        disk.read(0, LEN as usize).await.unwrap().to_vec()
    })
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Store files named for the merge left in the buffer directory.
fn kept_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("coloblk-merge"))
        .collect()
}

#[test]
fn a_merge_crashed_at_any_point_resumes_and_keeps_every_acknowledged_vm_write() {
    let mut mid = 0;
    for fraction in [Some(0.0), Some(0.3), Some(0.7), None] {
        let c = crash_during_merge(fraction);
        mid += usize::from(c.mid_merge);
        if c.mid_merge {
            assert_eq!(
                kept_files(c.dir.path()).len(),
                2,
                "the overlays' store files are named until the merge is done ({fraction:?})"
            );
        }
        let disk = resume(&c);
        assert_eq!(
            first_difference(&disk, &c.expected),
            None,
            "crash at {fraction:?}: the disk is not the VM's view with its writes"
        );
        assert!(kept_files(c.dir.path()).is_empty(), "{fraction:?}");
        assert!(!SecondaryNode::has_merge_record(&state(&c.dir)));
    }
    assert!(mid >= 2, "only {mid} crashes landed inside the merge");
}

#[test]
fn a_merge_recorded_in_another_boot_of_the_host_is_refused_not_resumed() {
    let c = crash_during_merge(Some(0.3));
    let rt = runtime();
    let e = rt.block_on(async {
        let disk = raw(&c.dir.path().join("secondary.raw"));
        SecondaryNode::resume(
            disk,
            IoPool::default(),
            &state(&c.dir),
            Some("00000000-another-boot"),
        )
        .expect_err("refused")
        .to_string()
    });
    assert!(e.contains("another boot of this host"), "{e}");
    assert!(e.contains("cannot be trusted"), "{e}");
    // Nothing was touched: the record is still there for the operator's decision.
    assert!(SecondaryNode::has_merge_record(&state(&c.dir)));
}

#[tokio::test]
async fn memory_overlays_leave_no_record_and_the_merge_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::setup(Backend::Memory, LEN, K);
    s.node.keep_merge_record_in(dir.path().to_path_buf());
    s.node.start(Mode::Secondary).await.unwrap();
    s.node
        .top()
        .write(0, pattern(K, 0x11), WriteFlags::default())
        .await
        .unwrap();
    s.node.stop(true).await.unwrap();
    assert!(!SecondaryNode::has_merge_record(dir.path()));
    s.node.wait_failover().await.unwrap();
    common::expect(&*s.disk, 0, K, 0x11).await;
}

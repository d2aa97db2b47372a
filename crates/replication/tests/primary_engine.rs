//! The primary node against in-process secondaries (a memory disk behind a fault-injecting
//! wrapper): ordering, drain, errors, timeouts, dirty tracking, queue bounds, stage machine.
//! The same node against real NBD peers is in `primary_peers.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockdev::{BlockDev, MemoryDev, WriteFlags, ZeroFlags};
use bytes::Bytes;
use replication::primary::{
    ForwardMode, PrimaryConfig, PrimaryError, PrimaryEvent, PrimaryNode, QueueLimits,
};
use replication::{Mode, Stage};
use testutil::FaultyDev;

const DISK: u64 = 8 << 20;

struct Rig {
    local: Arc<MemoryDev>,
    remote: Arc<MemoryDev>,
    link: Arc<FaultyDev>,
    node: PrimaryNode,
}

fn rig(config: PrimaryConfig) -> Rig {
    let local = Arc::new(MemoryDev::new(DISK));
    let remote = Arc::new(MemoryDev::new(DISK));
    let link = Arc::new(FaultyDev::new(remote.clone()));
    let node = PrimaryNode::new(local.clone(), config);
    node.set_link(link.clone()).unwrap();
    Rig {
        local,
        remote,
        link,
        node,
    }
}

fn started(config: PrimaryConfig) -> Rig {
    let r = rig(config);
    r.node.start(Mode::Primary).unwrap();
    r
}

fn fill(seed: u64, len: usize) -> Bytes {
    testutil::pattern(seed, len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_drain_the_secondary_equals_the_primary_in_both_modes() {
    for mode in [ForwardMode::Async, ForwardMode::Sync] {
        let r = started(PrimaryConfig {
            mode,
            ..Default::default()
        });
        r.link.delay_us.store(300, Ordering::Relaxed);
        r.link.jitter.store(true, Ordering::Relaxed);
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let node = r.node.clone();
            tasks.push(tokio::spawn(async move {
                let off = (i * 37 % 120) * 65536 + (i % 7) * 512;
                node.write(
                    off,
                    fill(i, 8192 + (i as usize % 5) * 4096),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
                if i % 5 == 0 {
                    node.write_zeroes(
                        off + 1024,
                        3000,
                        ZeroFlags {
                            may_unmap: true,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                }
                if i % 9 == 0 {
                    node.discard((i % 16) * 65536, 65536).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        r.node.drain(true, false).await.unwrap();
        assert!(
            r.local.snapshot() == r.remote.snapshot(),
            "{mode:?}: secondary differs after drain"
        );
        let st = r.node.status();
        assert_eq!(st.forward_errors, 0);
        assert_eq!(st.queued_requests, 0);
        assert_eq!(st.dirty_clusters, 0);
        assert!(st.forwarded_writes >= 64);
    }
}

/// Many racing writes to the same few blocks, with a secondary that completes requests in
/// random order: the final content on both sides is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_reach_the_secondary_in_local_order() {
    for mode in [ForwardMode::Async, ForwardMode::Sync] {
        let r = started(PrimaryConfig {
            mode,
            ..Default::default()
        });
        r.link.delay_us.store(2000, Ordering::Relaxed);
        r.link.jitter.store(true, Ordering::Relaxed);
        let mut tasks = Vec::new();
        for i in 0..400u64 {
            let node = r.node.clone();
            tasks.push(tokio::spawn(async move {
                // Four hot blocks, writes of 1 to 3 blocks straddling them.
                let off = (i % 4) * 4096 + (i % 3) * 1000;
                node.write(
                    off,
                    fill(1000 + i, 4096 * (1 + i as usize % 3)),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        r.node.drain(false, false).await.unwrap();
        let (l, s) = (r.local.snapshot(), r.remote.snapshot());
        assert!(
            l[..32768] == s[..32768],
            "{mode:?}: hot blocks differ between primary and secondary"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_completes_only_when_the_secondary_has_the_write() {
    let r = started(PrimaryConfig {
        mode: ForwardMode::Sync,
        ..Default::default()
    });
    r.link.delay_us.store(20_000, Ordering::Relaxed);
    for i in 0..5u64 {
        let data = fill(i, 4096);
        r.node
            .write(i * 4096, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(r.remote.read(i * 4096, 4096).await.unwrap(), data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_acknowledges_before_the_secondary_and_drain_waits_for_it() {
    let r = started(PrimaryConfig::default());
    r.link.delay_us.store(200_000, Ordering::Relaxed);
    let data = fill(5, 65536);
    let t = Instant::now();
    r.node
        .write(0, data.clone(), WriteFlags::default())
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(150),
        "async write waited for the secondary"
    );
    assert_eq!(
        r.remote.read(0, 65536).await.unwrap(),
        Bytes::from(vec![0u8; 65536])
    );
    r.node.drain(false, false).await.unwrap();
    assert_eq!(
        r.remote.read(0, 65536).await.unwrap(),
        data,
        "drain returned before the ack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_errors_are_sticky_evented_dirty_and_fail_the_next_drain() {
    let r = started(PrimaryConfig::default());
    let mut events = r.node.events();
    r.node
        .write(0, fill(1, 4096), WriteFlags::default())
        .await
        .unwrap();
    r.node.drain(false, false).await.unwrap();
    r.node.get_error().unwrap();

    r.link.fail_writes.store(true, Ordering::Relaxed);
    let data = fill(2, 4096);
    // The VM's write still succeeds, and lands locally.
    r.node
        .write(3 * 65536 + 100, data.clone(), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(r.local.read(3 * 65536 + 100, 4096).await.unwrap(), data);
    let e = r.node.drain(false, false).await.unwrap_err();
    assert!(matches!(e, PrimaryError::DrainFailed(_)), "{e}");
    assert_eq!(
        r.node.get_error().unwrap_err().to_string(),
        "I/O error occurred"
    );
    assert_eq!(r.node.dirty().ranges(), vec![(3 * 65536, 65536)]);
    match tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap()
    {
        PrimaryEvent::ForwardFailed { offset, len, error } => {
            assert_eq!((offset, len), (3 * 65536 + 100, 4096));
            assert!(error.contains("injected fault"), "{error}");
        }
        other => panic!("unexpected event {other:?}"),
    }
    assert_eq!(r.node.status().forward_errors, 1);
    // Still failing after the link recovers, until told to go on.
    r.link.fail_writes.store(false, Ordering::Relaxed);
    assert!(r.node.drain(false, false).await.is_err());
    r.node.drain(false, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_secondary_is_dropped_after_the_timeout_and_writes_go_on_at_local_speed() {
    let r = started(PrimaryConfig {
        link_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    });
    let mut events = r.node.events();
    r.link.hang.store(true, Ordering::Relaxed);
    r.node
        .write(0, fill(1, 4096), WriteFlags::default())
        .await
        .unwrap();
    let t = Instant::now();
    assert!(r.node.drain(false, false).await.is_err());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drain waited {:?} on a hung secondary",
        t.elapsed()
    );
    let mut lost = false;
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
        lost |= matches!(ev, PrimaryEvent::LinkLost { .. });
    }
    assert!(lost, "no LinkLost event");
    assert!(!r.node.status().link_up);
    // Now writes complete without touching the link, and are recorded as dirty.
    let t = Instant::now();
    for i in 1..50u64 {
        r.node
            .write(i * 65536, fill(i, 4096), WriteFlags::default())
            .await
            .unwrap();
    }
    r.node.drain(false, true).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "writes waited for a dead link"
    );
    assert_eq!(r.node.dirty().ranges(), vec![(0, 50 * 65536)]);
}

/// Waits until the resync has emptied the bitmap (bounded, so a broken resync fails the test).
async fn wait_clean(node: &PrimaryNode) {
    let t = Instant::now();
    while node.dirty().dirty_clusters() > 0 || node.resync_status().active {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "resync did not finish: {:?}",
            node.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_before_start_are_dirty_and_the_resync_sends_them_after_start() {
    let r = rig(PrimaryConfig {
        dirty_granularity: 4096,
        ..Default::default()
    });
    r.node
        .write(8192, fill(1, 100), WriteFlags::default())
        .await
        .unwrap();
    r.node
        .write_zeroes(65536, 3 * 4096, ZeroFlags::default())
        .await
        .unwrap();
    r.node.discard(DISK - 4096, 4096).await.unwrap();
    assert_eq!(r.link.writes_seen.load(Ordering::Relaxed), 0);
    assert_eq!(
        r.node.dirty().ranges(),
        vec![(8192, 4096), (65536, 3 * 4096), (DISK - 4096, 4096)]
    );
    assert_eq!(r.node.status().dirty_bytes, 5 * 4096);
    // A checkpoint before start is refused (QEMU's primary says yes in any stage).
    assert_eq!(
        r.node.checkpoint(false).await.unwrap_err(),
        PrimaryError::NotStarted(Stage::None)
    );
    // After start, new writes are forwarded and the resync copies the old dirty ranges.
    r.node.start(Mode::Primary).unwrap();
    r.node
        .write(0, fill(2, 4096), WriteFlags::default())
        .await
        .unwrap();
    wait_clean(&r.node).await;
    r.node.checkpoint(false).await.unwrap();
    assert!(r.local.snapshot() == r.remote.snapshot());
    let resync = r.node.resync_status();
    assert_eq!(resync.done_bytes, 5 * 4096);
    assert_eq!(resync.total_bytes, 5 * 4096);
    // The one data cluster is sent as payload; the zeroed ones as write-zeroes.
    assert_eq!(resync.sent_bytes, 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_error_reaches_the_vm_and_is_not_forwarded() {
    let local = Arc::new(FaultyDev::new(Arc::new(MemoryDev::new(DISK))));
    let remote = Arc::new(MemoryDev::new(DISK));
    let node = PrimaryNode::new(local.clone(), PrimaryConfig::default());
    node.set_link(remote.clone()).unwrap();
    node.start(Mode::Primary).unwrap();
    local.fail_writes.store(true, Ordering::Relaxed);
    assert!(
        node.write(0, fill(1, 4096), WriteFlags::default())
            .await
            .is_err()
    );
    node.drain(false, false).await.unwrap();
    assert_eq!(remote.allocated_bytes(), 0);
    node.get_error().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bound_holds_under_a_slow_secondary() {
    let limits = QueueLimits {
        max_bytes: 1 << 20,
        max_requests: 64,
        max_in_flight: 8,
    };
    let r = started(PrimaryConfig {
        queue: limits,
        ..Default::default()
    });
    r.link.delay_us.store(5000, Ordering::Relaxed);
    let node = r.node.clone();
    let writer = tokio::spawn(async move {
        for i in 0..200u64 {
            node.write((i % 100) * 65536, fill(i, 65536), WriteFlags::default())
                .await
                .unwrap();
        }
    });
    let mut peak = (0, 0);
    while !writer.is_finished() {
        let st = r.node.status();
        peak = (peak.0.max(st.queued_bytes), peak.1.max(st.queued_requests));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    writer.await.unwrap();
    assert!(peak.0 <= 1 << 20, "queued bytes peaked at {}", peak.0);
    assert!(
        peak.0 >= 512 << 10,
        "the queue never filled (peak {}), the test proves nothing",
        peak.0
    );
    assert!(peak.1 <= 64);
    r.node.drain(false, false).await.unwrap();
    assert!(r.local.snapshot() == r.remote.snapshot());
}

#[tokio::test]
async fn stage_machine_matches_qemu_for_a_primary_but_never_checkpoints_falsely() {
    let r = rig(PrimaryConfig::default());
    assert_eq!(r.node.stage(), Stage::None);
    assert_eq!(
        r.node.get_error().unwrap_err().to_string(),
        "Block replication is not running"
    );
    assert_eq!(
        r.node.checkpoint(false).await.unwrap_err().to_string(),
        "checkpoint refused: replication is not running (stage none); start it first"
    );
    assert_eq!(
        r.node.stop(true).await.unwrap_err().to_string(),
        "Block replication is not running"
    );
    assert_eq!(
        r.node.start(Mode::Secondary).unwrap_err().to_string(),
        "The parameter mode's value is invalid, needs 0, but got 1"
    );
    assert_eq!(r.node.stage(), Stage::None);
    r.node.start(Mode::Primary).unwrap();
    assert_eq!(r.node.stage(), Stage::Running);
    assert_eq!(
        r.node.start(Mode::Primary).unwrap_err().to_string(),
        "Block replication is running or done"
    );
    r.node.get_error().unwrap();
    r.node.checkpoint(false).await.unwrap();
    r.node.stop(true).await.unwrap();
    assert_eq!(r.node.stage(), Stage::Done);
    // After DONE a checkpoint is refused and a start really starts (QEMU ignores both, and
    // its checkpoint then says yes while writes are only recorded as dirty).
    assert_eq!(
        r.node.checkpoint(false).await.unwrap_err(),
        PrimaryError::NotStarted(Stage::Done)
    );
    r.node.stop(false).await.unwrap();
    r.node.get_error().unwrap();
    assert_eq!(r.node.stage(), Stage::Done);
    r.node.start(Mode::Primary).unwrap();
    assert_eq!(r.node.stage(), Stage::Running);
    r.node.checkpoint(false).await.unwrap();
}

#[tokio::test]
async fn a_secondary_of_another_length_is_refused() {
    let node = PrimaryNode::new(Arc::new(MemoryDev::new(DISK)), PrimaryConfig::default());
    let e = node
        .set_link(Arc::new(MemoryDev::new(DISK + 512)))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "disk lengths differ: the primary disk has {DISK} bytes, the secondary {}",
            DISK + 512
        )
    );
}

/// A primary starts without a link (degraded): the VM writes at local speed, every write is
/// dirty, checkpoints say the link is down; once a link is set the resync sends it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_starts_degraded_and_syncs_when_a_link_comes() {
    let local = Arc::new(MemoryDev::new(DISK));
    let node = PrimaryNode::new(local.clone(), PrimaryConfig::default());
    node.start(Mode::Primary).unwrap();
    node.write(65536, fill(3, 8192), WriteFlags::default())
        .await
        .unwrap();
    node.drain(false, true).await.unwrap();
    assert_eq!(node.dirty().ranges(), vec![(65536, 65536)]);
    assert_eq!(
        node.checkpoint(false).await.unwrap_err(),
        PrimaryError::LinkDown
    );
    let remote = Arc::new(MemoryDev::new(DISK));
    node.set_link(remote.clone()).unwrap();
    wait_clean(&node).await;
    node.checkpoint(false).await.unwrap();
    assert!(local.snapshot() == remote.snapshot());
}

/// A fenced primary (its secondary took over) refuses VM writes, and only writes.
#[tokio::test]
async fn a_fenced_primary_refuses_writes_and_serves_reads() {
    let r = started(PrimaryConfig::default());
    r.node
        .write(0, fill(4, 4096), WriteFlags::default())
        .await
        .unwrap();
    r.node.fence();
    let e = r
        .node
        .write(0, fill(5, 4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, blockdev::ErrorKind::ReadOnly);
    assert!(
        r.node
            .write_zeroes(0, 4096, ZeroFlags::default())
            .await
            .is_err()
    );
    assert!(r.node.discard(0, 4096).await.is_err());
    assert_eq!(r.node.read(0, 4096).await.unwrap(), fill(4, 4096));
}

/// Digests of another device, as a secondary's control socket would give them.
struct DevDigests(Arc<MemoryDev>, std::sync::atomic::AtomicU64);

#[async_trait::async_trait]
impl replication::primary::RemoteDigests for DevDigests {
    async fn digests(&self, offset: u64, len: u64, block: u64) -> Result<Vec<[u8; 16]>, String> {
        self.1.fetch_add(1, Ordering::Relaxed);
        replication::primary::digest_blocks(self.0.as_ref(), offset, len, block)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A checksum sync marks exactly the blocks that differ, so the resync copies only those: an
/// equal secondary costs digests and no copy, one differing in three places gets three blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_sync_copies_only_the_blocks_that_differ() {
    let r = rig(PrimaryConfig::default());
    for (i, off) in [0u64, 3 << 20, 7 << 20].iter().enumerate() {
        let data = fill(20 + i as u64, 100_000);
        r.local
            .write(*off, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        r.remote
            .write(*off, data, WriteFlags::default())
            .await
            .unwrap();
    }
    r.node.start(Mode::Primary).unwrap();
    let digests = DevDigests(r.remote.clone(), 0.into());
    let report = r.node.checksum_sync(&digests, 65536).await.unwrap();
    assert_eq!(report.compared_bytes, DISK);
    assert_eq!(report.differing_bytes, 0);
    wait_clean(&r.node).await;
    assert_eq!(r.node.resync_status().sent_bytes, 0, "nothing to copy");
    assert_eq!(r.link.writes_seen.load(Ordering::Relaxed), 0);

    // Three changes on the secondary's side only (as after a rolled-back failover).
    for off in [5000u64, (4 << 20) + 70000, DISK - 10] {
        r.remote
            .write(off, fill(off, 10), WriteFlags::default())
            .await
            .unwrap();
    }
    let report = r.node.checksum_sync(&digests, 65536).await.unwrap();
    assert_eq!(report.differing_bytes, 3 * 65536);
    wait_clean(&r.node).await;
    r.node.checkpoint(false).await.unwrap();
    assert!(r.local.snapshot() == r.remote.snapshot());
    assert!(r.node.resync_status().done_bytes == 3 * 65536);
}

/// Sync mode writes locally and forwards side by side: a local failure still reaches the VM,
/// and since the secondary may have taken the write, the range is recorded as dirty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_error_in_sync_mode_reaches_the_vm_and_the_resync_repairs_the_range() {
    let mem = Arc::new(MemoryDev::new(DISK));
    let local = Arc::new(FaultyDev::new(mem.clone()));
    let remote = Arc::new(MemoryDev::new(DISK));
    let node = PrimaryNode::new(
        local.clone(),
        PrimaryConfig {
            mode: ForwardMode::Sync,
            ..Default::default()
        },
    );
    node.set_link(remote.clone()).unwrap();
    node.start(Mode::Primary).unwrap();
    node.write(0, fill(1, 4096), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(node.dirty().dirty_clusters(), 0);
    local.fail_writes.store(true, Ordering::Relaxed);
    assert!(
        node.write(3 * 65536, fill(2, 4096), WriteFlags::default())
            .await
            .is_err()
    );
    node.get_error().unwrap();
    // The range was dirty, so the resync copies the primary's content over the secondary's.
    local.fail_writes.store(false, Ordering::Relaxed);
    wait_clean(&node).await;
    assert_eq!(node.resync_status().done_bytes, 65536);
    node.checkpoint(false).await.unwrap();
    assert!(mem.snapshot() == remote.snapshot());
}

/// A link whose `write_batch` breaks its contract and answers only the first write of a batch.
struct ShortBatch(Arc<MemoryDev>);

#[async_trait::async_trait]
impl BlockDev for ShortBatch {
    fn info(&self) -> blockdev::DevInfo {
        self.0.info()
    }
    async fn read(&self, offset: u64, len: usize) -> blockdev::Result<Bytes> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> blockdev::Result<()> {
        self.0.write(offset, data, flags).await
    }
    async fn write_batch(&self, writes: Vec<blockdev::BatchWrite>) -> Vec<blockdev::Result<()>> {
        let mut results = Vec::new();
        if let Some(w) = writes.into_iter().next() {
            results.push(self.0.write(w.offset, w.data, w.flags).await);
        }
        results
    }
    async fn flush(&self) -> blockdev::Result<()> {
        self.0.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> blockdev::Result<()> {
        self.0.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.0.discard(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> blockdev::Result<blockdev::ExtentList> {
        self.0.block_status(offset, len).await
    }
}

/// A link that answers fewer writes of a batch than it was given loses none of them silently:
/// every write of the batch counts as failed (even the one it did write: the answer cannot be
/// trusted), every range is dirty, and the drain says why.
///
/// A current-thread runtime makes the batch certain: the eight writes complete locally and
/// queue their forwards in one turn of the test task, before the forwarder runs.
#[tokio::test]
async fn a_batch_answered_short_fails_every_write_of_it() {
    let local = Arc::new(MemoryDev::new(DISK));
    let node = PrimaryNode::new(local, PrimaryConfig::default());
    node.set_link(Arc::new(ShortBatch(Arc::new(MemoryDev::new(DISK)))))
        .unwrap();
    node.start(Mode::Primary).unwrap();
    let writes: Vec<_> = (0..8u64)
        .map(|i| node.write(i * 131072, fill(10 + i, 4096), WriteFlags::default()))
        .collect();
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    let e = node.drain(false, false).await.unwrap_err();

    assert!(matches!(e, PrimaryError::DrainFailed(_)), "{e}");
    assert!(
        e.to_string()
            .contains("the link answered 1 of 8 batched writes"),
        "{e}"
    );
    let want: Vec<(u64, u64)> = (0..8u64).map(|i| (i * 131072, 65536)).collect();
    assert_eq!(node.dirty().ranges(), want);
    let status = node.status();
    assert_eq!((status.forward_errors, status.forwarded_writes), (8, 0));
}

/// The resync copies ranges the VM keeps overwriting, over a link that answers out of order:
/// a copy never overtakes a newer write of its range nor is overtaken by an older one, so the
/// disks end equal, in both modes, every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_racing_vm_overwrites_on_a_reordering_link_ends_equal() {
    for round in 0..12u64 {
        let mode = if round % 2 == 0 {
            ForwardMode::Async
        } else {
            ForwardMode::Sync
        };
        let r = rig(PrimaryConfig {
            mode,
            dirty_granularity: 16384,
            ..Default::default()
        });
        r.link.delay_us.store(200, Ordering::Relaxed);
        r.link.jitter.store(true, Ordering::Relaxed);
        // Content the secondary lacks: written before start, so only the resync can send it.
        for i in 0..32u64 {
            r.node
                .write(
                    i * 98304,
                    fill(round * 1000 + i, 70000),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
        }
        // And nothing is known of the rest: the whole disk is copied while the VM writes.
        r.node.mark_all_dirty();
        r.node.start(Mode::Primary).unwrap();
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let node = r.node.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..400u64 {
                    let off = ((t * 7919 + i * 104729 + round) % (DISK - 9000)) & !511;
                    node.write(
                        off,
                        fill(round * 100 + t * 50 + i, 9000),
                        WriteFlags::default(),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        wait_clean(&r.node).await;
        r.node.checkpoint(false).await.unwrap();
        assert!(
            r.local.snapshot() == r.remote.snapshot(),
            "round {round} ({mode:?}): the disks differ after the resync"
        );
    }
}

/// A local disk that fills up: a write reaching past `full_at` lands up to it, then fails with
/// ENOSPC (what a file on a full tmpfs does to an unaligned 1 MiB write).
struct FillsUp {
    mem: Arc<MemoryDev>,
    full_at: u64,
}

#[async_trait::async_trait]
impl BlockDev for FillsUp {
    fn info(&self) -> blockdev::DevInfo {
        self.mem.info()
    }
    async fn read(&self, offset: u64, len: usize) -> blockdev::Result<Bytes> {
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> blockdev::Result<()> {
        let end = offset + data.len() as u64;
        if end <= self.full_at {
            return self.mem.write(offset, data, flags).await;
        }
        if offset < self.full_at {
            let fits = (self.full_at - offset) as usize;
            self.mem.write(offset, data.slice(..fits), flags).await?;
        }
        Err(blockdev::BlockError::new(
            blockdev::ErrorKind::NoSpace,
            blockdev::Op::Write,
            offset.max(self.full_at),
        ))
    }
    async fn flush(&self) -> blockdev::Result<()> {
        self.mem.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> blockdev::Result<()> {
        self.mem.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.mem.discard(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> blockdev::Result<blockdev::ExtentList> {
        self.mem.block_status(offset, len).await
    }
}

/// A local write that fails part-way (ENOSPC) reaches the VM, and its range is dirty in both
/// modes: no checkpoint is accepted until the resync has copied what the primary really holds
/// there, and then the disks are equal. (Before, async mode left it clean and sync mode left
/// the secondary with the whole write: checkpoints said yes over 17 and 65 differing clusters.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_part_way_on_a_full_disk_is_dirty_until_resynced() {
    for mode in [ForwardMode::Async, ForwardMode::Sync] {
        let mem = Arc::new(MemoryDev::new(DISK));
        let full_at = 3 * 65536 + 1000;
        let local = Arc::new(FillsUp {
            mem: mem.clone(),
            full_at,
        });
        let remote = Arc::new(MemoryDev::new(DISK));
        let link = Arc::new(FaultyDev::new(remote.clone()));
        let node = PrimaryNode::new(
            local,
            PrimaryConfig {
                mode,
                ..Default::default()
            },
        );
        node.set_link(link.clone()).unwrap();
        node.start(Mode::Primary).unwrap();
        node.write(0, fill(1, 65536), WriteFlags::default())
            .await
            .unwrap();
        node.checkpoint(false).await.unwrap();
        // A slow link now, so the resync cannot finish while we look (sync mode's VM write
        // waits for it once too).
        link.delay_us.store(400_000, Ordering::SeqCst);
        let e = node
            .write(3 * 65536 - 4096, fill(2, 1 << 20), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind, blockdev::ErrorKind::NoSpace, "{mode:?}");
        let e = node.checkpoint(false).await.unwrap_err();
        assert!(matches!(e, PrimaryError::Unsynced { .. }), "{mode:?}: {e}");
        assert_eq!(
            node.checkpoint(true).await.unwrap_err(),
            e,
            "force cannot skip dirty ranges"
        );
        link.delay_us.store(0, Ordering::SeqCst);
        wait_clean(&node).await;
        node.checkpoint(false).await.unwrap();
        assert!(
            mem.snapshot() == remote.snapshot(),
            "{mode:?}: the disks differ after a checkpoint"
        );
    }
}

/// `resync_rate` caps the resync: 8 MiB at 8 MiB/s cannot end before about 3/4 s (the first
/// piece goes at once), however fast the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resync_keeps_to_its_rate() {
    let r = rig(PrimaryConfig {
        resync_rate: Some(8 << 20),
        ..Default::default()
    });
    r.local
        .write(0, fill(30, 8 << 20), WriteFlags::default())
        .await
        .unwrap();
    r.node.mark_all_dirty();
    let t = Instant::now();
    r.node.start(Mode::Primary).unwrap();
    wait_clean(&r.node).await;
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "8 MiB at 8 MiB/s took {:?}",
        t.elapsed()
    );
    assert!(r.local.snapshot() == r.remote.snapshot());
}

/// A link lost in the middle of a resync: the copies that did not get through stay dirty, and
/// a new link resumes from them; the disks end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_cut_half_way_resumes_on_the_next_link_and_ends_equal() {
    let r = rig(PrimaryConfig {
        link_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    });
    r.local
        .write(0, fill(40, DISK as usize), WriteFlags::default())
        .await
        .unwrap();
    r.node.mark_all_dirty();
    // The link takes a few copies, then its connection is gone (as an NBD client's is).
    r.node
        .set_link(Arc::new(CutAfter {
            inner: r.remote.clone(),
            left: 3.into(),
        }))
        .unwrap();
    r.node.start(Mode::Primary).unwrap();
    let t = Instant::now();
    while r.node.status().link_up || r.node.resync_status().active {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{:?}",
            r.node.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = r.node.dirty().dirty_bytes();
    assert!(
        left > 0 && left < DISK,
        "the cut came half-way: {left} bytes left"
    );
    // A new link (the same secondary, reachable again) finishes the job.
    r.node.set_link(r.remote.clone()).unwrap();
    wait_clean(&r.node).await;
    r.node.checkpoint(false).await.unwrap();
    assert!(r.local.snapshot() == r.remote.snapshot());
}

/// A link whose connection dies after `left` writes: every request after that fails as shut
/// down, as an NBD client's do once its server went away.
struct CutAfter {
    inner: Arc<MemoryDev>,
    left: std::sync::atomic::AtomicI64,
}

impl CutAfter {
    fn gone(&self, op: blockdev::Op, offset: u64) -> blockdev::Result<()> {
        if self.left.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(
                blockdev::BlockError::new(blockdev::ErrorKind::Shutdown, op, offset)
                    .context("connection closed"),
            );
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlockDev for CutAfter {
    fn info(&self) -> blockdev::DevInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: usize) -> blockdev::Result<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> blockdev::Result<()> {
        self.gone(blockdev::Op::Write, offset)?;
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> blockdev::Result<()> {
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> blockdev::Result<()> {
        self.gone(blockdev::Op::WriteZeroes, offset)?;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.discard(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> blockdev::Result<blockdev::ExtentList> {
        self.inner.block_status(offset, len).await
    }
}

/// Digests that fail at once (a verify whose peer went away).
struct FailingDigests;

#[async_trait::async_trait]
impl replication::primary::RemoteDigests for FailingDigests {
    async fn digests(&self, _: u64, _: u64, _: u64) -> Result<Vec<[u8; 16]>, String> {
        Err("the peer went away".into())
    }
}

/// Digests that take their time (a comparison still running).
struct SlowDigests(Arc<MemoryDev>);

#[async_trait::async_trait]
impl replication::primary::RemoteDigests for SlowDigests {
    async fn digests(&self, offset: u64, len: u64, block: u64) -> Result<Vec<[u8; 16]>, String> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        replication::primary::digest_blocks(self.0.as_ref(), offset, len, block)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Two comparisons at once, one failing: the other still holds checkpoints back until it has
/// compared everything. (Before, the failing one reset the shared count and a checkpoint said
/// yes while the other had not found its difference yet.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_comparison_does_not_end_another_one_running() {
    let r = started(PrimaryConfig::default());
    r.remote
        .write(DISK - 4096, fill(50, 10), WriteFlags::default())
        .await
        .unwrap();
    let slow = {
        let node = r.node.clone();
        let remote = r.remote.clone();
        tokio::spawn(async move { node.checksum_sync(&SlowDigests(remote), 65536).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(r.node.checksum_sync(&FailingDigests, 65536).await.is_err());
    assert!(
        matches!(
            r.node.checkpoint(false).await,
            Err(PrimaryError::Comparing { .. })
        ),
        "a checkpoint while a comparison runs"
    );
    slow.await.unwrap().unwrap();
    wait_clean(&r.node).await;
    r.node.checkpoint(false).await.unwrap();
    assert!(r.local.snapshot() == r.remote.snapshot());
}

/// A secondary that refuses a flush may have dropped writes it had acknowledged (its page
/// cache lost them). Without a write log nothing names them, and checkpoints stay refused;
/// with one, the log's ranges (every write since the last checkpoint's flush) are resent and
/// the next checkpoint finds the disks equal again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_flush_is_repaired_from_the_write_log() {
    let dir = tempfile::tempdir().unwrap();
    let r = started(PrimaryConfig::default());
    let log = replication::state::ExtentLog::open(dir.path(), DISK).unwrap();
    r.node.set_write_log(log, || Ok(()));
    let write = |at: u64, seed: u64| {
        r.node
            .write(at, fill(seed, 64 << 10), WriteFlags::default())
    };
    write(0, 1).await.unwrap();
    r.node.checkpoint(false).await.unwrap();
    write(5 << 20, 2).await.unwrap();
    r.node.drain(false, false).await.unwrap();
    // The secondary acknowledged the write, then loses it and refuses the flush.
    r.remote
        .write(
            5 << 20,
            Bytes::from(vec![0; 64 << 10]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    FaultyDev::set(&r.link.fail_writes, true);
    let e = r.node.checkpoint(false).await.unwrap_err();
    assert!(matches!(e, PrimaryError::DrainFailed(_)), "{e}");
    FaultyDev::set(&r.link.fail_writes, false);
    // The log's extents (0 and 1: 8 MiB) are dirty, and the resync sends them.
    wait_clean(&r.node).await;
    r.node.checkpoint(false).await.unwrap();
    assert_eq!(
        r.local.read(0, DISK as usize).await.unwrap(),
        r.remote.read(0, DISK as usize).await.unwrap()
    );
}

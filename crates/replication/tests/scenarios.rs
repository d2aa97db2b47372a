//! Black-box scenarios S5-S30 of docs/qemu-replication.md §4.2 that apply to a secondary node, plus the places where
//! we deliberately differ from QEMU (docs/qemu-replication.md §6.3). One behaviour per test, named for it.
//! S5-S7 (backing links), S10 (top-id) and S14 (op blockers) concern QEMU's node graph and
//! have no counterpart here; S20, S26 and S30 are in `failure.rs`, S21 in `concurrency.rs`.

mod common;

use std::sync::Arc;

use blockdev::{BlockDev, ErrorKind, Extent, MemoryDev, WriteFlags, ZeroFlags};
use common::{Backend, Faulty, MIB, expect, faulty, fill, node_over, pattern, setup, whole};
use replication::secondary::{DevOverlay, MemoryStore, Overlay, SecondaryNode};
use replication::{Mode, ReplicationError, Stage};

const K: u64 = 64 * 1024;
const LEN: u64 = 4 * MIB;

/// A started node over a disk of 0xAA (memory images).
async fn running() -> common::Setup {
    let s = setup(Backend::Memory, LEN, K);
    fill(&*s.disk, 0, LEN, 0xAA).await;
    s.node.start(Mode::Secondary).await.unwrap();
    s
}

fn message(r: Result<(), ReplicationError>) -> String {
    r.unwrap_err().to_string()
}

// ---- setup and the stage machine ----

#[tokio::test]
async fn s08_start_refuses_overlays_of_another_length() {
    let disk: Arc<dyn BlockDev> = Arc::new(MemoryDev::new(LEN));
    let node = SecondaryNode::with_overlays(
        disk,
        K,
        Arc::new(MemoryStore::new(LEN - 512)),
        Arc::new(MemoryStore::new(LEN)),
    )
    .unwrap();
    assert_eq!(
        message(node.start(Mode::Secondary).await),
        "Active disk, hidden disk, secondary disk's length are not the same"
    );
    assert_eq!(node.stage(), Stage::None);
}

#[tokio::test]
async fn s09_start_refuses_overlays_that_cannot_be_emptied() {
    let disk: Arc<dyn BlockDev> = Arc::new(MemoryDev::new(LEN));
    let no_discard = faulty(Arc::new(MemoryDev::new(LEN)));
    Faulty::set(&no_discard.no_discard, true);
    let node = SecondaryNode::with_overlays(
        disk,
        K,
        Arc::new(MemoryStore::new(LEN)),
        Arc::new(DevOverlay::new(no_discard)),
    )
    .unwrap();
    assert_eq!(
        message(node.start(Mode::Secondary).await),
        "Active disk or hidden disk doesn't support make_empty"
    );
    assert_eq!(node.stage(), Stage::None);
}

#[tokio::test]
async fn s11_start_in_primary_mode_is_refused_with_qemus_numbers() {
    let s = setup(Backend::Memory, LEN, K);
    assert_eq!(
        message(s.node.start(Mode::Primary).await),
        "The parameter mode's value is invalid, needs 1, but got 0"
    );
    assert_eq!(s.node.stage(), Stage::None);
}

#[tokio::test]
async fn s12_second_start_is_refused() {
    let s = running().await;
    assert_eq!(
        message(s.node.start(Mode::Secondary).await),
        "Block replication is running or done"
    );
    assert_eq!(s.node.stage(), Stage::Running);
}

#[tokio::test]
async fn s13_start_empties_overlays_whatever_they_held() {
    let disk: Arc<dyn BlockDev> = Arc::new(MemoryDev::with_data(&vec![0xAA; LEN as usize]));
    let (a, h) = (Arc::new(MemoryDev::new(LEN)), Arc::new(MemoryDev::new(LEN)));
    a.write(0, pattern(MIB, 0x55), WriteFlags::default())
        .await
        .unwrap();
    h.write(MIB, pattern(MIB, 0x66), WriteFlags::default())
        .await
        .unwrap();
    let node = SecondaryNode::with_overlays(
        disk.clone(),
        K,
        Arc::new(DevOverlay::new(a.clone())),
        Arc::new(DevOverlay::new(h.clone())),
    )
    .unwrap();
    node.start(Mode::Secondary).await.unwrap();
    assert_eq!((a.allocated_bytes(), h.allocated_bytes()), (0, 0));
    expect(&node.top(), 0, LEN, 0xAA).await;
    let st = node.status();
    assert_eq!((st.active_clusters, st.hidden_clusters), (0, 0));
}

#[tokio::test]
async fn s24_get_error_before_start_is_not_running() {
    let s = setup(Backend::Memory, LEN, K);
    assert_eq!(
        message(s.node.get_error()),
        "Block replication is not running"
    );
}

#[tokio::test]
async fn s24_stop_before_start_is_not_running() {
    let s = setup(Backend::Memory, LEN, K);
    assert_eq!(
        message(s.node.stop(false).await),
        "Block replication is not running"
    );
    assert_eq!(
        message(s.node.stop(true).await),
        "Block replication is not running"
    );
    assert_eq!(s.node.stage(), Stage::None);
}

#[tokio::test]
async fn s25_checkpoint_before_start_reports_backup_cancelled() {
    let s = setup(Backend::Memory, LEN, K);
    assert_eq!(
        message(s.node.checkpoint().await),
        "Backup job was cancelled unexpectedly"
    );
}

#[tokio::test]
async fn get_error_while_running_is_ok() {
    let s = running().await;
    assert_eq!(s.node.get_error(), Ok(()));
}

#[tokio::test]
async fn invalid_cluster_sizes_are_refused() {
    let disk: Arc<dyn BlockDev> = Arc::new(MemoryDev::new(LEN));
    for bad in [0, 256, 3000, 32 << 20] {
        let r = SecondaryNode::with_overlays(
            disk.clone(),
            bad,
            Arc::new(MemoryStore::new(LEN)),
            Arc::new(MemoryStore::new(LEN)),
        );
        assert!(
            matches!(r, Err(ReplicationError::InvalidClusterSize(_))),
            "{bad}"
        );
    }
}

// ---- copy-before-write ----

#[tokio::test]
async fn s15_primary_write_preserves_the_old_cluster_for_the_vm() {
    let s = running().await;
    s.node
        .replica()
        .write(K, pattern(K, 0x01), WriteFlags::default())
        .await
        .unwrap();
    expect(&*s.disk, K, K, 0x01).await;
    expect(&s.node.top(), 0, LEN, 0xAA).await;
    assert_eq!(s.node.status().hidden_clusters, 1);
}

#[tokio::test]
async fn s16_first_old_version_wins_within_an_epoch() {
    let s = running().await;
    let rep = s.node.replica();
    rep.write(K, pattern(K, 0x01), WriteFlags::default())
        .await
        .unwrap();
    rep.write(K, pattern(K, 0x02), WriteFlags::default())
        .await
        .unwrap();
    expect(&*s.disk, K, K, 0x02).await;
    expect(&s.node.top(), K, K, 0xAA).await;
    assert_eq!(s.node.status().hidden_clusters, 1);
}

#[tokio::test]
async fn s17_partial_cluster_write_preserves_the_whole_cluster() {
    let s = running().await;
    s.node
        .replica()
        .write(K + 4096, pattern(4096, 0x01), WriteFlags::default())
        .await
        .unwrap();
    expect(&s.node.top(), K, K, 0xAA).await;
    expect(&*s.disk, K, 4096, 0xAA).await;
    expect(&*s.disk, K + 4096, 4096, 0x01).await;
    expect(&*s.disk, K + 8192, K - 8192, 0xAA).await;
    assert_eq!(s.node.status().hidden_clusters, 1);
}

#[tokio::test]
async fn s17_write_straddling_clusters_preserves_both() {
    let s = running().await;
    s.node
        .replica()
        .write(2 * K - 10, pattern(20, 0x01), WriteFlags::default())
        .await
        .unwrap();
    expect(&s.node.top(), 0, LEN, 0xAA).await;
    assert_eq!(s.node.status().hidden_clusters, 2);
}

#[tokio::test]
async fn s18_vm_write_then_primary_write_vm_keeps_its_data() {
    let s = running().await;
    fill(&s.node.top(), 0, K, 0x5A).await;
    fill(&s.node.replica(), 0, K, 0x01).await;
    expect(&s.node.top(), 0, K, 0x5A).await;
    expect(&*s.disk, 0, K, 0x01).await;
    assert_eq!(s.node.status().hidden_clusters, 1);
    s.node.checkpoint().await.unwrap();
    expect(&s.node.top(), 0, K, 0x01).await;
}

#[tokio::test]
async fn s19_primary_write_then_vm_write_vm_reads_its_data() {
    let s = running().await;
    fill(&s.node.replica(), 0, K, 0x01).await;
    fill(&s.node.top(), 0, K, 0x5A).await;
    expect(&s.node.top(), 0, K, 0x5A).await;
    expect(&s.node.top(), K, LEN - K, 0xAA).await;
}

#[tokio::test]
async fn primary_zeroes_and_discards_are_copied_before_too() {
    let s = running().await;
    let rep = s.node.replica();
    rep.write_zeroes(0, K, ZeroFlags::default()).await.unwrap();
    rep.discard(4 * K, 2 * K).await.unwrap();
    expect(&*s.disk, 0, K, 0).await;
    expect(&*s.disk, 4 * K, 2 * K, 0).await;
    expect(&s.node.top(), 0, LEN, 0xAA).await;
    assert_eq!(s.node.status().hidden_clusters, 3);
}

#[tokio::test]
async fn zero_clusters_are_preserved_as_zero_without_data() {
    let s = setup(Backend::Memory, LEN, K);
    s.node.start(Mode::Secondary).await.unwrap();
    fill(&s.node.replica(), 0, 2 * K, 0x01).await;
    expect(&s.node.top(), 0, 2 * K, 0).await;
    let st = s.node.top().block_status(0, 2 * K).await.unwrap();
    assert_eq!(st.0, vec![Extent::zero(2 * K)]);
}

#[tokio::test]
async fn s22_checkpoint_empties_the_overlays_and_the_view_becomes_the_disk() {
    let s = running().await;
    fill(&s.node.replica(), 0, MIB, 0x01).await;
    fill(&s.node.top(), MIB, MIB, 0x5A).await;
    s.node.checkpoint().await.unwrap();
    let st = s.node.status();
    assert_eq!((st.active_clusters, st.hidden_clusters), (0, 0));
    assert_eq!(whole(&s.node.top()).await, whole(&*s.disk).await);
    // The copy set was reset too: the next primary write is preserved again.
    fill(&s.node.replica(), 0, K, 0x02).await;
    expect(&s.node.top(), 0, K, 0x01).await;
}

#[tokio::test]
async fn checkpoint_with_file_overlays_gives_the_space_back() {
    let s = setup(Backend::Raw, LEN, K);
    fill(&*s.disk, 0, LEN, 0xAA).await;
    s.node.start(Mode::Secondary).await.unwrap();
    fill(&s.node.replica(), 0, MIB, 0x01).await;
    fill(&s.node.top(), 0, MIB, 0x02).await;
    s.node.checkpoint().await.unwrap();
    expect(&s.node.top(), 0, MIB, 0x01).await;
    fill(&s.node.top(), 0, K, 0x03).await;
    expect(&s.node.top(), 0, K, 0x03).await;
    expect(&s.node.top(), K, MIB - K, 0x01).await;
}

// ---- the VM's path ----

#[tokio::test]
async fn vm_writes_of_any_alignment_read_back_exactly() {
    let s = running().await;
    let top = s.node.top();
    top.write(1000, pattern(10, 1), WriteFlags::default())
        .await
        .unwrap();
    top.write(K - 3, pattern(700, 2), WriteFlags::default())
        .await
        .unwrap();
    top.write(LEN - 5, pattern(5, 3), WriteFlags::default())
        .await
        .unwrap();
    let mut want = vec![0xAA; LEN as usize];
    want[1000..1010].fill(1);
    want[(K - 3) as usize..(K + 697) as usize].fill(2);
    want[(LEN - 5) as usize..].fill(3);
    assert!(whole(&top).await == want);
    expect(&*s.disk, 0, LEN, 0xAA).await;
}

#[tokio::test]
async fn vm_zeroes_and_discards_read_as_zero_and_report_zero() {
    let s = running().await;
    let top = s.node.top();
    top.write_zeroes(K, K, ZeroFlags::default()).await.unwrap();
    top.discard(3 * K + 100, K).await.unwrap();
    expect(&top, K, K, 0).await;
    expect(&top, 3 * K + 100, K, 0).await;
    expect(&top, 3 * K, 100, 0xAA).await;
    let st = top.block_status(K, K).await.unwrap();
    assert_eq!(st.0, vec![Extent::zero(K)]);
    expect(&*s.disk, 0, LEN, 0xAA).await;
}

#[tokio::test]
async fn top_block_status_describes_overlays_and_disk() {
    let s = setup(Backend::Memory, LEN, K);
    s.disk
        .write(0, pattern(K, 1), WriteFlags::default())
        .await
        .unwrap();
    s.node.start(Mode::Secondary).await.unwrap();
    let top = s.node.top();
    top.write(2 * K, pattern(512, 2), WriteFlags::default())
        .await
        .unwrap();
    let st = top.block_status(0, 4 * K).await.unwrap();
    // Disk data, then MemoryDev's 4 KiB hole granularity up to the VM's 512-byte write.
    assert_eq!(st.total(), 4 * K);
    assert_eq!(st.0[0], Extent::data(K));
    let mut pos = 0;
    for e in st.iter() {
        if pos == 2 * K {
            assert_eq!(*e, Extent::data(512));
        }
        pos += e.len;
    }
}

#[tokio::test]
async fn replica_path_before_start_writes_straight_through() {
    let s = setup(Backend::Memory, LEN, K);
    fill(&s.node.replica(), 0, MIB, 0x01).await;
    expect(&*s.disk, 0, MIB, 0x01).await;
    s.node.start(Mode::Secondary).await.unwrap();
    expect(&s.node.top(), 0, MIB, 0x01).await;
    assert_eq!(s.node.status().hidden_clusters, 0);
}

#[tokio::test]
async fn replica_path_reads_the_secondary_disk() {
    let s = running().await;
    fill(&s.node.top(), 0, K, 0x5A).await;
    fill(&s.node.replica(), K, K, 0x01).await;
    expect(&s.node.replica(), 0, K, 0xAA).await;
    expect(&s.node.replica(), K, K, 0x01).await;
}

// ---- stop and failover ----

#[tokio::test]
async fn stop_without_failover_discards_the_buffer() {
    let s = running().await;
    fill(&s.node.replica(), 0, MIB, 0x01).await;
    fill(&s.node.top(), MIB, MIB, 0x5A).await;
    s.node.stop(false).await.unwrap();
    assert_eq!(s.node.stage(), Stage::Done);
    assert_eq!(s.node.get_error(), Ok(()));
    let st = s.node.status();
    assert_eq!((st.active_clusters, st.hidden_clusters), (0, 0));
    assert_eq!(whole(&s.node.top()).await, whole(&*s.disk).await);
    expect(&s.node.top(), 0, MIB, 0x01).await;
    expect(&s.node.top(), MIB, LEN - MIB, 0xAA).await;
}

#[tokio::test]
async fn s27_failover_with_data_only_in_active_writes_it_to_the_disk() {
    let s = running().await;
    fill(&s.node.top(), K, 3 * K, 0x5A).await;
    s.node.stop(true).await.unwrap();
    s.node.wait_failover().await.unwrap();
    expect(&*s.disk, 0, K, 0xAA).await;
    expect(&*s.disk, K, 3 * K, 0x5A).await;
    expect(&*s.disk, 4 * K, LEN - 4 * K, 0xAA).await;
}

#[tokio::test]
async fn s27_failover_rolls_back_the_primarys_writes_since_the_checkpoint() {
    let s = running().await;
    fill(&s.node.replica(), 0, MIB, 0x01).await;
    s.node.checkpoint().await.unwrap();
    fill(&s.node.replica(), 0, 2 * MIB, 0x02).await;
    fill(&s.node.top(), MIB - K, 2 * K, 0x5A).await;
    s.node.stop(true).await.unwrap();
    s.node.wait_failover().await.unwrap();
    expect(&*s.disk, 0, MIB - K, 0x01).await;
    expect(&*s.disk, MIB - K, 2 * K, 0x5A).await;
    expect(&*s.disk, MIB + K, MIB - K, 0xAA).await;
    expect(&*s.disk, 2 * MIB, LEN - 2 * MIB, 0xAA).await;
    let p = s.node.failover_progress();
    assert_eq!(p.done, p.total);
    assert_eq!(p.total, 2 * MIB);
}

#[tokio::test]
async fn s28_vm_io_during_failover_is_consistent_and_kept() {
    const BIG: u64 = 16 * MIB;
    let held = faulty(Arc::new(MemoryDev::new(BIG)));
    let node = node_over(held.clone(), K);
    fill(&*held, 0, BIG, 0xAA).await;
    node.start(Mode::Secondary).await.unwrap();
    fill(&node.replica(), 0, BIG, 0x01).await;
    fill(&node.top(), 0, BIG / 2, 0x5A).await;
    let mut want = vec![0xAA; BIG as usize];
    want[..(BIG / 2) as usize].fill(0x5A);

    // The merge blocks on its first disk write, holding the first batch (4 MiB).
    Faulty::set(&held.hold_writes, true);
    node.stop(true).await.unwrap();
    let top = node.top();
    for i in 0..6u64 {
        let off = 4 * MIB + i * (2 * MIB) + 1000;
        top.write(off, pattern(3000, 0x70 + i as u8), WriteFlags::default())
            .await
            .unwrap();
        want[off as usize..off as usize + 3000].fill(0x70 + i as u8);
        assert_eq!(node.stage(), Stage::Failover);
        assert!(
            whole(&top).await == want,
            "view changed during failover (step {i})"
        );
    }
    assert_eq!(node.failover_progress().total, BIG);
    Faulty::set(&held.hold_writes, false);
    // And into the first batch, once it may have been merged.
    top.write(10, pattern(10, 0x7F), WriteFlags::default())
        .await
        .unwrap();
    want[10..20].fill(0x7F);
    assert!(whole(&top).await == want);
    node.wait_failover().await.unwrap();
    assert!(whole(&*held).await == want);
    assert!(whole(&top).await == want);
    assert_eq!(node.failover_progress().done, BIG);
}

/// The merge reuses its batch buffers and the stores reuse their slots after a checkpoint:
/// blocks a later batch leaves alone (untouched, or zeroed by the VM) keep their own bytes,
/// never an earlier batch's or an earlier epoch's. Memory stores, and store files read in place.
#[tokio::test]
async fn failover_merge_writes_only_each_batchs_own_bytes() {
    const DISK: u64 = 8 * MIB;
    for backend in [Backend::Memory, Backend::Raw] {
        let s = setup(backend, DISK, K);
        fill(&*s.disk, 0, DISK, 0xAA).await;
        s.node.start(Mode::Secondary).await.unwrap();
        // An epoch whose overlays are thrown away at the checkpoint.
        fill(&s.node.top(), 0, DISK, 0x44).await;
        fill(&s.node.replica(), 0, DISK, 0x55).await;
        s.node.checkpoint().await.unwrap();
        expect(&s.node.top(), 0, DISK, 0x55).await;
        // Five whole batches of the VM's data, then a batch with parts of clusters: one 4 KiB
        // block written by the VM, one zeroed by it, a primary write (rolled back).
        fill(&s.node.top(), 0, 5 * MIB, 0x11).await;
        let top = s.node.top();
        let at = 6 * MIB;
        top.write(at + 8192, pattern(4096, 0x22), WriteFlags::default())
            .await
            .unwrap();
        top.write_zeroes(at + K + 4096, 4096, ZeroFlags::default())
            .await
            .unwrap();
        fill(&s.node.replica(), at + 2 * K, K, 0x33).await;
        s.node.stop(true).await.unwrap();
        s.node.wait_failover().await.unwrap();

        let mut want = vec![0x55u8; DISK as usize];
        want[..5 * MIB as usize].fill(0x11);
        let at = at as usize;
        want[at + 8192..at + 12288].fill(0x22);
        want[at + K as usize + 4096..at + K as usize + 8192].fill(0);
        let got = whole(&*s.disk).await;
        let first = (0..got.len()).find(|&i| got[i] != want[i]);
        assert_eq!(first, None, "{backend:?}: the disk differs at this byte");
    }
}

/// A flush started while the merge goes on may be the one the kernel reports a write-back
/// error to (it reports it once): its error fails the failover although the last flush
/// would succeed.
#[tokio::test]
async fn failover_fails_when_a_flush_during_the_merge_fails() {
    const BIG: u64 = 40 * MIB;
    let dev = faulty(Arc::new(MemoryDev::new(BIG)));
    let node = node_over(dev.clone(), K);
    node.start(Mode::Secondary).await.unwrap();
    fill(&node.top(), 0, BIG, 0x5A).await;
    dev.fail_flushes
        .store(1, std::sync::atomic::Ordering::SeqCst);
    node.stop(true).await.unwrap();
    assert_eq!(node.wait_failover().await, Err(ReplicationError::IoError));
    assert_eq!(node.stage(), Stage::FailoverFailed);
    let err = node.last_error().expect("the merge's error").to_string();
    assert!(
        err.contains("flushing the disk during the merge"),
        "not the merge's own flush: {err}"
    );
    // The retry merges nothing more but flushes again, and succeeds.
    node.stop(true).await.unwrap();
    node.wait_failover().await.unwrap();
    assert_eq!(node.stage(), Stage::Done);
    expect(&*dev, 0, BIG, 0x5A).await;
}

#[tokio::test]
async fn s29_after_done_control_is_a_noop_and_io_goes_to_the_disk() {
    let s = running().await;
    fill(&s.node.top(), 0, K, 0x5A).await;
    s.node.stop(true).await.unwrap();
    s.node.wait_failover().await.unwrap();
    for mode in [Mode::Primary, Mode::Secondary] {
        s.node.start(mode).await.unwrap();
    }
    s.node.checkpoint().await.unwrap();
    s.node.stop(false).await.unwrap();
    s.node.stop(true).await.unwrap();
    assert_eq!(s.node.stage(), Stage::Done);
    fill(&s.node.top(), K, K, 0x5B).await;
    expect(&*s.disk, K, K, 0x5B).await;
    s.node.top().discard(0, K).await.unwrap();
    expect(&*s.disk, 0, K, 0).await;
    let st = s.node.status();
    assert_eq!((st.active_clusters, st.hidden_clusters), (0, 0));
}

#[tokio::test]
async fn replica_path_is_refused_after_failover() {
    let s = running().await;
    s.node.stop(true).await.unwrap();
    let e = s
        .node
        .replica()
        .write(0, pattern(512, 1), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shutdown);
    s.node.wait_failover().await.unwrap();
    let e = s.node.replica().read(0, 512).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shutdown);
    expect(&*s.disk, 0, LEN, 0xAA).await;
}

#[tokio::test]
async fn replica_path_writes_through_after_stop_without_failover() {
    let s = running().await;
    s.node.stop(false).await.unwrap();
    fill(&s.node.replica(), 0, K, 0x01).await;
    expect(&s.node.top(), 0, K, 0x01).await;
}

#[tokio::test]
async fn checkpoint_is_ignored_during_failover() {
    let slow = faulty(Arc::new(MemoryDev::new(LEN)));
    let node = node_over(slow.clone(), K);
    node.start(Mode::Secondary).await.unwrap();
    fill(&node.top(), 0, LEN, 0x5A).await;
    Faulty::set(&slow.hold_writes, true);
    node.stop(true).await.unwrap();
    node.checkpoint().await.unwrap();
    node.start(Mode::Secondary).await.unwrap();
    node.stop(false).await.unwrap();
    assert_eq!(node.stage(), Stage::Failover);
    Faulty::set(&slow.hold_writes, false);
    node.wait_failover().await.unwrap();
    expect(&*slow, 0, LEN, 0x5A).await;
}

#[tokio::test]
async fn device_overlays_hold_clusters_at_their_own_offsets() {
    let disk: Arc<dyn BlockDev> = Arc::new(MemoryDev::with_data(&vec![0xAA; LEN as usize]));
    let (a, h) = (Arc::new(MemoryDev::new(LEN)), Arc::new(MemoryDev::new(LEN)));
    let (ao, ho): (Arc<dyn Overlay>, Arc<dyn Overlay>) = (
        Arc::new(DevOverlay::new(a.clone())),
        Arc::new(DevOverlay::new(h.clone())),
    );
    let node = SecondaryNode::with_overlays(disk.clone(), K, ao, ho).unwrap();
    node.start(Mode::Secondary).await.unwrap();
    fill(&node.top(), 3 * K, K, 0x5A).await;
    fill(&node.replica(), 5 * K, K, 0x01).await;
    expect(&*a, 3 * K, K, 0x5A).await;
    expect(&*h, 5 * K, K, 0xAA).await;
    node.checkpoint().await.unwrap();
    assert_eq!((a.allocated_bytes(), h.allocated_bytes()), (0, 0));
}

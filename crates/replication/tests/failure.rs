//! Failure injection: copy-before-write failures (S20, S26), failed starts, and failover
//! failures with retry (S30). The faults come from a wrapper device that fails on demand.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockdev::{BlockDev, MemoryDev, WriteFlags};
use common::{Faulty, MIB, expect, faulty, fill, node_over, pattern, whole};
use replication::secondary::{DevOverlay, MemoryStore, SecondaryNode};
use replication::{Mode, ReplicationError, Stage};

const K: u64 = 64 * 1024;
const LEN: u64 = 4 * MIB;

/// A started node over a disk of 0xAA whose hidden overlay lives on a device we can break.
async fn node_with_breakable_hidden() -> (SecondaryNode, Arc<dyn BlockDev>, Arc<Faulty>) {
    let disk: Arc<dyn BlockDev> = Arc::new(MemoryDev::with_data(&vec![0xAA; LEN as usize]));
    let hidden = faulty(Arc::new(MemoryDev::new(LEN)));
    let node = SecondaryNode::with_overlays(
        disk.clone(),
        K,
        Arc::new(MemoryStore::new(LEN)),
        Arc::new(DevOverlay::new(hidden.clone())),
    )
    .unwrap();
    node.start(Mode::Secondary).await.unwrap();
    (node, disk, hidden)
}

#[tokio::test]
async fn s20_failed_copy_fails_the_write_and_leaves_the_disk_unchanged() {
    let (node, disk, hidden) = node_with_breakable_hidden().await;
    Faulty::set(&hidden.fail_writes, true);
    let r = node
        .replica()
        .write(K + 100, pattern(2 * K, 0x01), WriteFlags::default())
        .await;
    assert!(r.is_err());
    expect(&*disk, 0, LEN, 0xAA).await;
    expect(&node.top(), 0, LEN, 0xAA).await;
    assert_eq!(node.status().hidden_clusters, 0);
}

#[tokio::test]
async fn s20_failed_read_of_the_old_content_fails_the_write_too() {
    let inner: Arc<dyn BlockDev> = Arc::new(MemoryDev::with_data(&vec![0xAA; LEN as usize]));
    let disk = faulty(inner.clone());
    let node = node_over(disk.clone(), K);
    node.start(Mode::Secondary).await.unwrap();
    Faulty::set(&disk.fail_reads, true);
    assert!(
        node.replica()
            .write(0, pattern(K, 0x01), WriteFlags::default())
            .await
            .is_err()
    );
    Faulty::set(&disk.fail_reads, false);
    expect(&*inner, 0, LEN, 0xAA).await;
    assert_eq!(node.get_error(), Err(ReplicationError::IoError));
}

#[tokio::test]
async fn s26_copy_failure_is_sticky_and_refuses_the_checkpoint() {
    let (node, _disk, hidden) = node_with_breakable_hidden().await;
    Faulty::set(&hidden.fail_writes, true);
    assert!(
        node.replica()
            .write(0, pattern(K, 0x01), WriteFlags::default())
            .await
            .is_err()
    );
    Faulty::set(&hidden.fail_writes, false);
    // Later writes succeed, but the error stays.
    fill(&node.replica(), K, K, 0x02).await;
    assert_eq!(
        node.get_error().unwrap_err().to_string(),
        "I/O error occurred"
    );
    assert!(node.last_error().is_some());
    assert_eq!(
        node.checkpoint().await.unwrap_err().to_string(),
        "I/O error occurred"
    );
    assert_eq!(node.validate_checkpoint(), Err(ReplicationError::IoError));
    // The VM's view is intact, and the operator can clear the error after a resync.
    expect(&node.top(), 0, LEN, 0xAA).await;
    node.clear_error();
    node.checkpoint().await.unwrap();
    assert_eq!(node.get_error(), Ok(()));
    expect(&node.top(), K, K, 0x02).await;
}

#[tokio::test]
async fn failed_start_leaves_the_node_startable() {
    let disk: Arc<dyn BlockDev> = Arc::new(MemoryDev::new(LEN));
    let active = faulty(Arc::new(MemoryDev::new(LEN)));
    let node = SecondaryNode::with_overlays(
        disk,
        K,
        Arc::new(DevOverlay::new(active.clone())),
        Arc::new(MemoryStore::new(LEN)),
    )
    .unwrap();
    Faulty::set(&active.fail_writes, true);
    let e = node.start(Mode::Secondary).await.unwrap_err();
    assert_eq!(e.to_string(), "Cannot make active disk empty");
    assert_eq!(node.stage(), Stage::None);
    assert_eq!(node.get_error(), Err(ReplicationError::NotRunning));
    Faulty::set(&active.fail_writes, false);
    node.start(Mode::Secondary).await.unwrap();
    assert_eq!(node.stage(), Stage::Running);
}

/// A started node over a breakable disk of 0xAA, with primary writes (0x01) over the first
/// half and VM writes (0x5A) over [1M, 1M + 256K).
async fn dirty_node() -> (SecondaryNode, Arc<Faulty>, Vec<u8>) {
    let disk = faulty(Arc::new(MemoryDev::with_data(&vec![0xAA; LEN as usize])));
    let node = node_over(disk.clone(), K);
    node.start(Mode::Secondary).await.unwrap();
    fill(&node.replica(), 0, LEN / 2, 0x01).await;
    fill(&node.top(), MIB, 4 * K, 0x5A).await;
    let mut view = vec![0xAA; LEN as usize];
    view[MIB as usize..(MIB + 4 * K) as usize].fill(0x5A);
    (node, disk, view)
}

#[tokio::test]
async fn s30_failed_failover_is_sticky_and_routes_writes_like_qemu() {
    let (node, disk, mut view) = dirty_node().await;
    Faulty::set(&disk.fail_writes, true);
    node.stop(true).await.unwrap();
    assert_eq!(node.wait_failover().await, Err(ReplicationError::IoError));
    assert_eq!(node.stage(), Stage::FailoverFailed);
    assert_eq!(
        node.get_error().unwrap_err().to_string(),
        "I/O error occurred"
    );
    assert_eq!(
        node.stop(false).await.unwrap_err().to_string(),
        "Block replication is not running"
    );
    assert_eq!(
        node.checkpoint().await.unwrap_err().to_string(),
        "Backup job was cancelled unexpectedly"
    );
    assert!(
        whole(&node.top()).await == view,
        "reads still see the VM's view"
    );

    // A cluster held by an overlay: the write goes to the active overlay (the disk is broken,
    // yet the write succeeds).
    let top = node.top();
    top.write(100, pattern(10, 0x61), WriteFlags::default())
        .await
        .unwrap();
    view[100..110].fill(0x61);
    // A cluster held by no overlay: straight to the disk, which fails now...
    assert!(
        top.write(3 * MIB, pattern(10, 0x62), WriteFlags::default())
            .await
            .is_err()
    );
    Faulty::set(&disk.fail_writes, false);
    // ...and lands on it directly once it works.
    top.write(3 * MIB, pattern(10, 0x62), WriteFlags::default())
        .await
        .unwrap();
    view[(3 * MIB) as usize..(3 * MIB + 10) as usize].fill(0x62);
    expect(&*disk, 3 * MIB, 10, 0x62).await;
    expect(&*disk, 100, 10, 0x01).await;
    assert!(whole(&top).await == view);

    // Retry.
    node.stop(true).await.unwrap();
    node.wait_failover().await.unwrap();
    assert_eq!(node.stage(), Stage::Done);
    assert_eq!(node.get_error(), Ok(()));
    assert!(whole(&*disk).await == view);
    assert!(whole(&top).await == view);
}

#[tokio::test]
async fn failover_that_fails_midway_resumes_where_it_stopped() {
    const BIG: u64 = 16 * MIB;
    let disk = faulty(Arc::new(MemoryDev::with_data(&vec![0xAA; BIG as usize])));
    let node = node_over(disk.clone(), K);
    node.start(Mode::Secondary).await.unwrap();
    fill(&node.replica(), 0, 12 * MIB, 0x01).await;
    fill(&node.top(), 5 * MIB, MIB, 0x5A).await;
    let mut view = vec![0xAA; BIG as usize];
    view[(5 * MIB) as usize..(6 * MIB) as usize].fill(0x5A);
    // Let the first batch (4 MiB, one write) through, then fail.
    disk.fail_writes_after.store(1, Ordering::SeqCst);
    node.stop(true).await.unwrap();
    assert!(node.wait_failover().await.is_err());
    let p = node.failover_progress();
    assert_eq!((p.done, p.total), (4 * MIB, 12 * MIB));
    disk.fail_writes_after.store(-1, Ordering::SeqCst);
    assert!(whole(&node.top()).await == view);
    node.stop(true).await.unwrap();
    node.wait_failover().await.unwrap();
    assert_eq!(
        node.failover_progress(),
        replication::secondary::FailoverProgress {
            done: 8 * MIB,
            total: 8 * MIB
        }
    );
    assert!(whole(&*disk).await == view);
}

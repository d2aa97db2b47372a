//! Replication groups: all-or-nothing start and checkpoint, stop reaching every member.

mod common;

use std::sync::Arc;

use blockdev::{BlockDev, MemoryDev, WriteFlags};
use common::{Faulty, MIB, expect, faulty, fill, node_over, pattern};
use replication::secondary::{DevOverlay, MemoryStore, SecondaryNode};
use replication::{Mode, ReplicationGroup, Stage};

const K: u64 = 64 * 1024;
const LEN: u64 = MIB;

fn plain() -> SecondaryNode {
    node_over(Arc::new(MemoryDev::with_data(&vec![0xAA; LEN as usize])), K)
}

fn group(nodes: &[SecondaryNode]) -> ReplicationGroup {
    let mut g = ReplicationGroup::new();
    for (i, n) in nodes.iter().enumerate() {
        g.add(format!("disk{i}"), Arc::new(n.clone()));
    }
    g
}

#[tokio::test]
async fn group_start_validates_every_member_before_starting_any() {
    let bad = SecondaryNode::with_overlays(
        Arc::new(MemoryDev::new(LEN)),
        K,
        Arc::new(MemoryStore::new(LEN / 2)),
        Arc::new(MemoryStore::new(LEN)),
    )
    .unwrap();
    let nodes = [plain(), plain(), bad];
    let e = group(&nodes).start(Mode::Secondary).await.unwrap_err();
    assert_eq!(e.member, "disk2");
    assert_eq!(
        e.to_string(),
        "Active disk, hidden disk, secondary disk's length are not the same"
    );
    assert!(nodes.iter().all(|n| n.stage() == Stage::None));
}

#[tokio::test]
async fn group_start_rolls_back_members_started_before_a_failure() {
    // Passes validation (the device can discard) but fails to empty at start.
    let broken = faulty(Arc::new(MemoryDev::new(LEN)));
    let bad = SecondaryNode::with_overlays(
        Arc::new(MemoryDev::new(LEN)),
        K,
        Arc::new(MemoryStore::new(LEN)),
        Arc::new(DevOverlay::new(broken.clone())),
    )
    .unwrap();
    let nodes = [plain(), plain(), bad];
    let g = group(&nodes);
    Faulty::set(&broken.fail_writes, true);
    let e = g.start(Mode::Secondary).await.unwrap_err();
    assert_eq!(
        (e.member.as_str(), e.to_string().as_str()),
        ("disk2", "Cannot make hidden disk empty")
    );
    assert!(
        nodes.iter().all(|n| n.stage() == Stage::None),
        "all back to NONE"
    );
    Faulty::set(&broken.fail_writes, false);
    g.start(Mode::Secondary).await.unwrap();
    assert!(nodes.iter().all(|n| n.stage() == Stage::Running));
}

#[tokio::test]
async fn group_checkpoint_validates_every_member_before_emptying_any() {
    let disk = faulty(Arc::new(MemoryDev::with_data(&vec![0xAA; LEN as usize])));
    let sick = node_over(disk.clone(), K);
    let nodes = [plain(), sick];
    let g = group(&nodes);
    g.start(Mode::Secondary).await.unwrap();
    fill(&nodes[0].replica(), 0, K, 0x01).await;
    Faulty::set(&disk.fail_reads, true);
    assert!(
        nodes[1]
            .replica()
            .write(0, pattern(K, 1), WriteFlags::default())
            .await
            .is_err()
    );
    Faulty::set(&disk.fail_reads, false);

    assert_eq!(g.get_error().unwrap_err().member, "disk1");
    let e = g.checkpoint(false).await.unwrap_err();
    assert_eq!(
        (e.member.as_str(), e.to_string().as_str()),
        ("disk1", "I/O error occurred")
    );
    // disk0 was not checkpointed: its VM still sees the old data.
    expect(&nodes[0].top(), 0, K, 0xAA).await;
    assert_eq!(nodes[0].status().hidden_clusters, 1);
}

#[tokio::test]
async fn group_checkpoint_and_get_error_when_healthy() {
    let nodes = [plain(), plain()];
    let g = group(&nodes);
    assert_eq!(
        g.get_error().unwrap_err().to_string(),
        "Block replication is not running"
    );
    assert_eq!(
        g.checkpoint(false).await.unwrap_err().to_string(),
        "Backup job was cancelled unexpectedly"
    );
    g.start(Mode::Secondary).await.unwrap();
    for n in &nodes {
        fill(&n.replica(), 0, K, 0x01).await;
    }
    g.get_error().unwrap();
    g.checkpoint(false).await.unwrap();
    for n in &nodes {
        expect(&n.top(), 0, K, 0x01).await;
    }
}

#[tokio::test]
async fn group_failover_reaches_every_member_and_then_ignores_control() {
    let nodes = [plain(), plain(), plain()];
    let g = group(&nodes);
    g.start(Mode::Secondary).await.unwrap();
    // disk1 is already done: its stop is ignored; the others fail over.
    nodes[1].stop(false).await.unwrap();
    for n in &nodes {
        fill(&n.top(), K, K, 0x5A).await;
    }
    g.stop(true).await.unwrap();
    for n in &nodes {
        n.wait_failover().await.unwrap();
        assert_eq!(n.stage(), Stage::Done);
        expect(&**n.disk(), K, K, 0x5A).await;
    }
    // Continuous replication: everything is a no-op now.
    g.start(Mode::Primary).await.unwrap();
    g.checkpoint(false).await.unwrap();
    g.stop(true).await.unwrap();
}

#[tokio::test]
async fn group_stop_reports_the_first_error_but_stops_the_rest() {
    let never_started = plain();
    let nodes = [never_started, plain()];
    nodes[1].start(Mode::Secondary).await.unwrap();
    let e = group(&nodes).stop(false).await.unwrap_err();
    assert_eq!(
        (e.member.as_str(), e.to_string().as_str()),
        ("disk0", "Block replication is not running")
    );
    assert_eq!(nodes[1].stage(), Stage::Done);
}

#[tokio::test]
async fn group_membership_is_ordered_and_removable() {
    let mut g = group(&[plain(), plain()]);
    assert_eq!(g.names().collect::<Vec<_>>(), vec!["disk0", "disk1"]);
    assert!(g.remove("disk0"));
    assert!(!g.remove("disk0"));
    assert_eq!(g.len(), 1);
    assert!(!g.is_empty());
}

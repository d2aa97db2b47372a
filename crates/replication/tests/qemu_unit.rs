//! The secondary cases of QEMU's `tests/unit/test-replication.c` (docs/qemu-replication.md §4.1, T7-T13), with the
//! corrected values: exact comparisons of whole ranges, fresh images per test, and 0x11 (not
//! 0x22) in [32M, 64M) after a failover (T10, T11; verified against QEMU 7.2, Appendix B).
//!
//! "local" in QEMU's test is the secondary disk's own BlockBackend, which after start sits
//! under the copy-before-write filter: the replica path here. Every test runs on in-memory
//! images and on raw files with file-backed overlays.

mod common;

use blockdev::{BlockDev, ErrorKind, WriteFlags};
use common::{Backend, MIB, Setup, expect, fill, setup};
use replication::{Mode, ReplicationError, Stage};

const IMG_SIZE: u64 = 64 * MIB;
const HALF: u64 = IMG_SIZE / 2;

/// QEMU's `start_secondary`: a fresh secondary disk holding 0x11 everywhere.
async fn start_secondary(backend: Backend) -> Setup {
    let s = setup(backend, IMG_SIZE, 64 * 1024);
    fill(&*s.disk, 0, IMG_SIZE, 0x11).await;
    s
}

macro_rules! on_both_backends {
    ($($name:ident => $body:ident;)*) => {
        mod memory {
            $(#[tokio::test]
            async fn $name() { super::$body(super::Backend::Memory).await })*
        }
        mod raw {
            $(#[tokio::test]
            async fn $name() { super::$body(super::Backend::Raw).await })*
        }
    };
}

on_both_backends! {
    t07_secondary_read_before_start_fails => t07;
    t08_secondary_write_before_start_fails => t08;
    t09_secondary_start_reads_old_data_under_primary_writes => t09;
    t10_secondary_stop_failover_keeps_the_vm_view => t10;
    t11_secondary_continuous_replication_ignores_later_calls => t11;
    t12_secondary_do_checkpoint_shows_primary_data => t12;
    t13_secondary_get_error_all_reports_nothing => t13;
}

async fn t07(backend: Backend) {
    let s = start_secondary(backend).await;
    let e = s.node.top().read(0, IMG_SIZE as usize).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io(None));
    assert_eq!(e.kind.errno(), 5, "EIO");
}

async fn t08(backend: Backend) {
    let s = start_secondary(backend).await;
    let zeroes = common::pattern(IMG_SIZE, 0);
    let e = s
        .node
        .top()
        .write(0, zeroes, WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind.errno(), 5, "EIO");
    expect(&*s.disk, 0, IMG_SIZE, 0x11).await;
}

async fn t09(backend: Backend) {
    let s = start_secondary(backend).await;
    let (top, local) = (s.node.top(), s.node.replica());
    s.node.start(Mode::Secondary).await.unwrap();
    expect(&top, 0, IMG_SIZE, 0x11).await;

    fill(&local, HALF, HALF, 0x22).await;
    expect(&top, HALF, HALF, 0x11).await;
    expect(&*s.disk, HALF, HALF, 0x22).await;

    fill(&top, 0, HALF, 0x33).await;
    expect(&top, 0, HALF, 0x33).await;
    expect(&top, HALF, HALF, 0x11).await;
    expect(&*s.disk, 0, HALF, 0x11).await;

    s.node.stop(true).await.unwrap();
    s.node.wait_failover().await.unwrap();
    assert_eq!(s.node.stage(), Stage::Done);
}

/// The common part of T10 and T11, up to and including `stop_all(true)`.
async fn failover_after_writes(s: &Setup) {
    let (top, local) = (s.node.top(), s.node.replica());
    s.node.start(Mode::Secondary).await.unwrap();
    fill(&local, HALF, HALF, 0x22).await;
    expect(&top, HALF, HALF, 0x11).await;
    fill(&top, 0, HALF, 0x33).await;
    s.node.stop(true).await.unwrap();
}

/// T10/T11's reads, strict: the VM's view survives the failover, so the primary's 0x22 is
/// rolled back.
async fn expect_vm_view(s: &Setup) {
    let top = s.node.top();
    expect(&top, 0, HALF, 0x33).await;
    expect(&top, HALF, HALF, 0x11).await;
}

async fn t10(backend: Backend) {
    let s = start_secondary(backend).await;
    failover_after_writes(&s).await;
    // QEMU reads right after stop_all, while the commit may still run.
    expect_vm_view(&s).await;
    s.node.wait_failover().await.unwrap();
    assert_eq!(s.node.stage(), Stage::Done);
    expect_vm_view(&s).await;
    expect(&*s.disk, 0, HALF, 0x33).await;
    expect(&*s.disk, HALF, HALF, 0x11).await;
}

async fn t11(backend: Backend) {
    let s = start_secondary(backend).await;
    failover_after_writes(&s).await;
    // In FAILOVER (or already DONE): the promoted secondary may start a primary.
    s.node.start(Mode::Primary).await.unwrap();
    s.node.checkpoint().await.unwrap();
    s.node.stop(true).await.unwrap();
    expect_vm_view(&s).await;
    s.node.wait_failover().await.unwrap();
    // And in DONE.
    s.node.start(Mode::Primary).await.unwrap();
    s.node.checkpoint().await.unwrap();
    s.node.stop(true).await.unwrap();
    assert_eq!(s.node.stage(), Stage::Done);
    expect_vm_view(&s).await;
    expect(&*s.disk, 0, HALF, 0x33).await;
    expect(&*s.disk, HALF, HALF, 0x11).await;
}

async fn t12(backend: Backend) {
    let s = start_secondary(backend).await;
    let (top, local) = (s.node.top(), s.node.replica());
    s.node.start(Mode::Secondary).await.unwrap();
    fill(&local, HALF, HALF, 0x22).await;
    expect(&top, HALF, HALF, 0x11).await;
    s.node.checkpoint().await.unwrap();
    expect(&top, HALF, HALF, 0x22).await;
    expect(&top, 0, HALF, 0x11).await;
    let st = s.node.status();
    assert_eq!((st.active_clusters, st.hidden_clusters), (0, 0));
    s.node.stop(true).await.unwrap();
    s.node.wait_failover().await.unwrap();
    expect(&*s.disk, HALF, HALF, 0x22).await;
}

async fn t13(backend: Backend) {
    let s = start_secondary(backend).await;
    s.node.start(Mode::Secondary).await.unwrap();
    assert_eq!(s.node.get_error(), Ok(()));
    s.node.stop(true).await.unwrap();
    s.node.wait_failover().await.unwrap();
    assert_eq!(s.node.get_error(), Ok::<(), ReplicationError>(()));
}

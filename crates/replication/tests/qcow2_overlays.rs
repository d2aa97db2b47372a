//! User-named qcow2 images as the active and hidden overlays (QEMU-style setups), through
//! `DevOverlay`: the node tracks allocation itself, the images only hold bytes, and emptying
//! discards what was written. The images must stay valid for `qemu-img check`.

mod common;

use std::path::Path;
use std::sync::Arc;

use blockdev::{
    BlockDev, IoPool, MemoryDev, Qcow2, Qcow2Backing, Qcow2CreateOptions, Qcow2Options, WriteFlags,
};
use common::{MIB, expect, fill, pattern, whole};
use replication::Mode;
use replication::secondary::{DevOverlay, SecondaryNode};

const K: u64 = 64 * 1024;
const LEN: u64 = 8 * MIB;

fn qcow2(path: &Path) -> Arc<Qcow2> {
    Qcow2::create(path, LEN, Qcow2CreateOptions::default()).unwrap();
    let opts = Qcow2Options {
        backing: Qcow2Backing::None,
        ..Default::default()
    };
    Arc::new(Qcow2::open(path, opts, IoPool::default()).unwrap())
}

/// Runs `qemu-img check` when qemu-img is installed.
fn qemu_img_check(path: &Path) {
    match std::process::Command::new("qemu-img")
        .arg("check")
        .arg(path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "qemu-img check {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!("qemu-img not found; skipping the image check"),
    }
}

#[tokio::test]
async fn qcow2_overlays_replicate_checkpoint_and_fail_over() {
    let dir = tempfile::tempdir().unwrap();
    let (ap, hp) = (
        dir.path().join("active.qcow2"),
        dir.path().join("hidden.qcow2"),
    );
    let (active, hidden) = (qcow2(&ap), qcow2(&hp));
    let disk: Arc<dyn BlockDev> = Arc::new(MemoryDev::with_data(&vec![0xAA; LEN as usize]));
    let node = SecondaryNode::with_overlays(
        disk.clone(),
        K,
        Arc::new(DevOverlay::new(active.clone())),
        Arc::new(DevOverlay::new(hidden.clone())),
    )
    .unwrap();
    node.start(Mode::Secondary).await.unwrap();

    fill(&node.replica(), 0, 2 * MIB, 0x01).await;
    fill(&node.top(), MIB, 2 * MIB, 0x5A).await;
    node.top()
        .write(5 * MIB + 3, pattern(1000, 0x5B), WriteFlags::default())
        .await
        .unwrap();
    expect(&node.top(), 0, MIB, 0xAA).await;
    expect(&node.top(), MIB, 2 * MIB, 0x5A).await;
    expect(&*hidden, 0, 2 * MIB, 0xAA).await;

    node.checkpoint().await.unwrap();
    assert_eq!(whole(&node.top()).await, whole(&*disk).await);
    let st = hidden.block_status(0, LEN).await.unwrap();
    assert!(st.iter().all(|e| e.zero), "hidden image emptied: {st:?}");

    fill(&node.replica(), 4 * MIB, MIB, 0x02).await;
    fill(&node.top(), 4 * MIB + K, K, 0x5C).await;
    let mut view = whole(&*disk).await;
    view[(4 * MIB) as usize..(5 * MIB) as usize].fill(0xAA);
    view[(4 * MIB + K) as usize..(4 * MIB + 2 * K) as usize].fill(0x5C);
    active.flush().await.unwrap();
    hidden.flush().await.unwrap();
    qemu_img_check(&ap);
    qemu_img_check(&hp);

    node.stop(true).await.unwrap();
    node.wait_failover().await.unwrap();
    assert!(whole(&*disk).await == view);
    active.flush().await.unwrap();
    hidden.flush().await.unwrap();
    qemu_img_check(&ap);
    qemu_img_check(&hp);
}

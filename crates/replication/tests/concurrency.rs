//! Concurrency under copy-before-write (S21): many tasks on a multi-thread runtime race
//! primary writes against VM reads of the same clusters, on a disk that delays requests and
//! tears writes in two. Every VM read must return exactly the content from before the epoch.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockdev::{BlockDev, MemoryDev, WriteFlags};
use bytes::Bytes;
use common::{Faulty, MIB, faulty, node_over, whole};
use replication::Mode;
use testutil::Rng;

const K: u64 = 64 * 1024;
const LEN: u64 = 8 * MIB;

/// Pre-epoch content: varies per 512-byte sector, always below 200.
fn old_byte(x: u64) -> u8 {
    ((x / 512) % 199) as u8
}

fn old_range(off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(old_byte).collect()
}

/// A random range of the disk, from a generator seeded per task.
trait RandomRange {
    fn range(&mut self, max_len: u64) -> (u64, u64);
}

impl RandomRange for Rng {
    fn range(&mut self, max_len: u64) -> (u64, u64) {
        let off = self.next() % LEN;
        let len = 1 + self.next() % max_len.min(LEN - off);
        (off, len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s21_vm_reads_racing_primary_writes_always_see_the_old_data() {
    let disk = faulty(Arc::new(MemoryDev::with_data(&old_range(0, LEN))));
    let node = node_over(disk.clone(), K);
    node.start(Mode::Secondary).await.unwrap();
    disk.delay_us.store(300, Ordering::Relaxed);
    Faulty::set(&disk.split_writes, true);

    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let rep = node.replica();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x9E37_79B9 + t * 7919);
            for _ in 0..40 {
                let (off, len) = rng.range(3 * K);
                let data = Bytes::from(vec![200 + t as u8; len as usize]);
                rep.write(off, data, WriteFlags::default()).await.unwrap();
            }
        }));
    }
    for t in 0..8u64 {
        let top = node.top();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x1234_5678 + t * 104_729);
            for _ in 0..60 {
                let (off, len) = rng.range(4 * K);
                let got = top.read(off, len as usize).await.unwrap();
                assert!(
                    got[..] == old_range(off, len)[..],
                    "torn or new data at {off}+{len}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    disk.delay_us.store(0, Ordering::Relaxed);
    assert!(
        whole(&node.top()).await == old_range(0, LEN),
        "view changed"
    );
    node.checkpoint().await.unwrap();
    assert!(whole(&node.top()).await == whole(&*disk).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sub_block_vm_writes_never_lose_each_others_bytes() {
    let disk = faulty(Arc::new(MemoryDev::with_data(&old_range(0, LEN))));
    let node = node_over(disk.clone(), K);
    node.start(Mode::Secondary).await.unwrap();
    disk.delay_us.store(200, Ordering::Relaxed);

    // 16 tasks each own 32 bytes of every 512-byte block in the first two clusters (and a
    // block straddling them), and rewrite their bytes while the primary writes there too.
    let base = K - 2048;
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let top = node.top();
        tasks.push(tokio::spawn(async move {
            for round in 0..10u8 {
                for block in 0..8u64 {
                    let off = base + block * 512 + t * 32;
                    let data = Bytes::from(vec![round * 16 + t as u8; 32]);
                    top.write(off, data, WriteFlags::default()).await.unwrap();
                }
            }
        }));
    }
    let rep = node.replica();
    tasks.push(tokio::spawn(async move {
        for i in 0..20u64 {
            let data = Bytes::from(vec![250; 4096]);
            rep.write(base + (i % 4) * 1024, data, WriteFlags::default())
                .await
                .unwrap();
        }
    }));
    for t in tasks {
        t.await.unwrap();
    }
    let got = node.top().read(base, 8 * 512).await.unwrap();
    for block in 0..8usize {
        for t in 0..16usize {
            let at = block * 512 + t * 32;
            assert!(
                got[at..at + 32].iter().all(|&b| b == 9 * 16 + t as u8),
                "task {t}'s bytes in block {block} were lost"
            );
        }
    }
}

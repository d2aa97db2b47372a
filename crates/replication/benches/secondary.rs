//! Secondary node benchmarks:
//!
//! - `checkpoint/<dirty>`: one checkpoint with that much dirty data (half preserved by
//!   copy-before-write in the hidden overlay, half written by the VM into the active one) on a
//!   64 GiB sparse raw disk; the re-dirtying between checkpoints is not timed.
//! - `replica_write_64k/{copies,copies_zero_cluster,already_copied}`: one 64 KiB primary write
//!   whose cluster must be copied first (old data / a hole), or was copied already.
//! - `failover_256m/{merge,plain_copy}`: merging 256 MiB of overlays into the disk, against a
//!   plain sequential copy of the same amount between two raw files in 4 MiB requests.
//!
//! Files live in /dev/shm when it exists (the recommended place for the overlays; the disk is
//! put there too so that the numbers measure the engine, not this machine's disk).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::{BlockDev, IoPool, RawFile, RawOptions, WriteFlags};
use bytes::Bytes;
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use replication::Mode;
use replication::secondary::{OverlayStore, SecondaryConfig, SecondaryNode};
use tokio::runtime::Runtime;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const DISK: u64 = 64 * GIB;
const K: u64 = 64 * 1024;
const CHUNK: u64 = 4 * MIB;

fn scratch() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn raw(dir: &tempfile::TempDir, name: &str, len: u64) -> Arc<RawFile> {
    let p = dir.path().join(name);
    RawFile::create(&p, len).unwrap();
    Arc::new(RawFile::open(&p, RawOptions::default(), IoPool::default()).unwrap())
}

fn node(dir: &tempfile::TempDir, disk: Arc<dyn BlockDev>) -> SecondaryNode {
    let config = SecondaryConfig {
        cluster_size: K,
        store: OverlayStore::BufferDir(dir.path().to_path_buf()),
        pool: IoPool::default(),
    };
    SecondaryNode::new(disk, config).unwrap()
}

async fn fill(dev: &dyn BlockDev, offset: u64, len: u64, byte: u8) {
    let buf = Bytes::from(vec![byte; CHUNK as usize]);
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(CHUNK);
        dev.write(pos, buf.slice(..n as usize), WriteFlags::default())
            .await
            .unwrap();
        pos += n;
    }
}

fn checkpoint(c: &mut Criterion) {
    let rt = runtime();
    let dir = scratch();
    let disk = raw(&dir, "disk.raw", DISK);
    let node = node(&dir, disk.clone());
    rt.block_on(async {
        // Data under the region the primary rewrites, so that CBW copies real bytes.
        fill(&*disk, 0, GIB / 2, 0xAA).await;
        node.start(Mode::Secondary).await.unwrap();
    });
    let mut g = c.benchmark_group("checkpoint");
    g.sampling_mode(SamplingMode::Flat);
    for (label, dirty) in [
        ("0", 0),
        ("1MiB", MIB),
        ("64MiB", 64 * MIB),
        ("512MiB", 512 * MIB),
        ("1GiB", GIB),
    ] {
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut t = Duration::ZERO;
                    for i in 0..iters {
                        fill(&node.replica(), 0, dirty / 2, i as u8).await;
                        fill(&node.top(), DISK / 2, dirty / 2, 0x5A).await;
                        let start = Instant::now();
                        node.checkpoint().await.unwrap();
                        t += start.elapsed();
                    }
                    t
                })
            })
        });
    }
    g.finish();
}

fn replica_write(c: &mut Criterion) {
    let rt = runtime();
    let dir = scratch();
    let disk = raw(&dir, "disk.raw", DISK);
    let node = node(&dir, disk.clone());
    const REGION: u64 = 256 * MIB;
    rt.block_on(async {
        fill(&*disk, 0, REGION, 0xAA).await;
        node.start(Mode::Secondary).await.unwrap();
    });
    let data = Bytes::from(vec![0x01; K as usize]);
    let mut g = c.benchmark_group("replica_write_64k");
    g.throughput(Throughput::Bytes(K));
    // Each write to the next cluster of a region; a checkpoint (not timed) when it is used up.
    for (label, base) in [("copies", 0), ("copies_zero_cluster", DISK / 2)] {
        let mut next = 0u64;
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        if next == REGION / K {
                            node.checkpoint().await.unwrap();
                            next = 0;
                        }
                        let rep = node.replica();
                        let start = Instant::now();
                        rep.write(base + next * K, data.clone(), WriteFlags::default())
                            .await
                            .unwrap();
                        t += start.elapsed();
                        next += 1;
                    }
                    t
                })
            })
        });
    }
    g.bench_function("already_copied", |b| {
        let rep = node.replica();
        rt.block_on(rep.write(0, data.clone(), WriteFlags::default()))
            .unwrap();
        b.iter(|| {
            rt.block_on(rep.write(0, data.clone(), WriteFlags::default()))
                .unwrap()
        })
    });
    g.finish();
}

fn failover(c: &mut Criterion) {
    const AMOUNT: u64 = 256 * MIB;
    let rt = runtime();
    let dir = scratch();
    let disk = raw(&dir, "disk.raw", DISK);
    let source = raw(&dir, "source.raw", AMOUNT);
    rt.block_on(async {
        fill(&*disk, 0, AMOUNT / 2, 0xAA).await;
        fill(&*source, 0, AMOUNT, 0xBB).await;
    });
    let mut g = c.benchmark_group("failover_256m");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(AMOUNT));
    g.bench_function("merge", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let node = node(&dir, disk.clone());
                    node.start(Mode::Secondary).await.unwrap();
                    fill(&node.replica(), 0, AMOUNT / 2, 0x01).await;
                    fill(&node.top(), AMOUNT / 2, AMOUNT / 2, 0x5A).await;
                    let start = Instant::now();
                    node.stop(true).await.unwrap();
                    node.wait_failover().await.unwrap();
                    t += start.elapsed();
                    assert_eq!(node.failover_progress().done, AMOUNT);
                }
                t
            })
        })
    });
    g.bench_function("plain_copy", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut pos = 0;
                    while pos < AMOUNT {
                        let data = source.read(pos, CHUNK as usize).await.unwrap();
                        disk.write(pos, data, WriteFlags::default()).await.unwrap();
                        pos += CHUNK;
                    }
                    disk.flush().await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = checkpoint, replica_write, failover
}
criterion_main!(benches);

//! The primary node forwarding over real NBD to real secondaries: qemu-nbd, nbdkit's memory
//! plugin (with its error and delay filters for faults), and our own server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::{BlockDev, IoPool, MemoryDev, RawFile, RawOptions, WriteFlags, ZeroFlags};
use bytes::Bytes;
use nbd::client::{ClientConfig, NbdClient};
use replication::Mode;
use replication::primary::{PrimaryConfig, PrimaryNode, QueueLimits};

const DISK: u64 = 32 << 20;

/// A peer process, killed on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "{tool} is missing: run scripts/test, which installs the test peers"
    );
}

fn spawn(cmd: &mut Command, sock: &Path) -> Peer {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut peer = Peer(child);
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            peer.0.try_wait().unwrap().is_none(),
            "peer {cmd:?} exited early"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "peer never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    peer
}

fn qemu_nbd(dir: &Path) -> (Peer, PathBuf, PathBuf) {
    require("qemu-nbd");
    let img = dir.join("secondary.raw");
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    let sock = dir.join("qemu-nbd.sock");
    let p = serve_qemu_nbd(&img, &sock);
    (p, sock, img)
}

/// qemu-nbd serving the existing raw image `img` as export "d" on `sock`.
fn serve_qemu_nbd(img: &Path, sock: &Path) -> Peer {
    spawn(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-x", "d", "-k"])
            .arg(sock)
            .arg(img),
        sock,
    )
}

/// nbdkit's memory plugin behind the given filters and their parameters.
fn nbdkit(dir: &Path, filters: &[&str], params: &[String]) -> (Peer, PathBuf) {
    require("nbdkit");
    let sock = dir.join("nbdkit.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-U"]).arg(&sock);
    for f in filters {
        cmd.arg(format!("--filter={f}"));
    }
    cmd.arg("memory").arg(format!("size={DISK}"));
    cmd.args(params);
    let p = spawn(&mut cmd, &sock);
    (p, sock)
}

async fn link(sock: &Path, export: &str, timeout: Duration) -> Arc<NbdClient> {
    let cfg = ClientConfig {
        request_timeout: Some(timeout),
        ..Default::default()
    };
    Arc::new(
        NbdClient::connect(&nbd::addr::SocketAddr::Unix(sock.into()), export, cfg)
            .await
            .unwrap(),
    )
}

fn data(seed: u64, len: usize) -> Bytes {
    testutil::pattern(seed, len)
}

/// A mixed workload of concurrent writes, zeroes and discards, many of them overlapping.
async fn workload(node: &PrimaryNode, n: u64) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let off = (i * 7919 % 400) * 65536 + (i % 16) * 512;
            node.write(
                off,
                data(i, 4096 * (1 + (i as usize % 8))),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            if i % 6 == 0 {
                node.write_zeroes(
                    off,
                    8192,
                    ZeroFlags {
                        may_unmap: i % 12 == 0,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            }
            if i % 10 == 0 {
                node.discard((i % 50) * 65536, 65536).await.unwrap();
            }
            // A hot spot every task overwrites.
            node.write(4096, data(10_000 + i, 4096), WriteFlags::default())
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn local_disk(dir: &Path) -> (Arc<RawFile>, PathBuf) {
    let p = dir.join("primary.raw");
    std::fs::File::create(&p).unwrap().set_len(DISK).unwrap();
    (
        Arc::new(RawFile::open(&p, RawOptions::default(), IoPool::default()).unwrap()),
        p,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_reaches_qemu_nbd_equals_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let (_peer, sock, img) = qemu_nbd(dir.path());
    let (local, local_path) = local_disk(dir.path());
    let node = PrimaryNode::new(local, PrimaryConfig::default());
    node.set_link(link(&sock, "d", Duration::from_secs(10)).await)
        .unwrap();
    node.start(Mode::Primary).unwrap();
    workload(&node, 300).await;
    node.drain(true, false).await.unwrap();
    assert!(
        std::fs::read(&local_path).unwrap() == std::fs::read(&img).unwrap(),
        "qemu-nbd's image differs"
    );
    assert_eq!(node.status().dirty_clusters, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_reaches_our_own_server_equals_what_was_written_in_sync_mode() {
    use nbd::server::{Export, ExportSet, Listener, Server, ServerConfig};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ours.sock");
    let remote = Arc::new(MemoryDev::new(DISK));
    let set = ExportSet::new();
    set.add(Export::new("d", remote.clone()));
    let server = Server::new(set, ServerConfig::default());
    let l = Listener::bind(&nbd::addr::SocketAddr::Unix(sock.clone()))
        .await
        .unwrap();
    tokio::spawn(async move { server.serve(l).await });
    let local = Arc::new(MemoryDev::new(DISK));
    let cfg = PrimaryConfig {
        mode: replication::primary::ForwardMode::Sync,
        ..Default::default()
    };
    let node = PrimaryNode::new(local.clone(), cfg);
    node.set_link(link(&sock, "d", Duration::from_secs(10)).await)
        .unwrap();
    node.start(Mode::Primary).unwrap();
    workload(&node, 300).await;
    // Sync mode: everything is on the secondary before any drain.
    assert!(
        local.snapshot() == remote.snapshot(),
        "our server's disk differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_error_filter_failures_are_captured_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-now");
    let (_peer, sock) = nbdkit(
        dir.path(),
        &["error"],
        &[
            "error-pwrite=EIO".into(),
            "error-pwrite-rate=100%".into(),
            format!("error-file={}", trigger.display()),
        ],
    );
    let local = Arc::new(MemoryDev::new(DISK));
    let node = PrimaryNode::new(local.clone(), PrimaryConfig::default());
    node.set_link(link(&sock, "", Duration::from_secs(10)).await)
        .unwrap();
    node.start(Mode::Primary).unwrap();
    node.write(0, data(1, 65536), WriteFlags::default())
        .await
        .unwrap();
    node.drain(false, false).await.unwrap();
    std::fs::write(&trigger, b"").unwrap();
    let d = data(2, 8192);
    node.write(5 * 65536 + 512, d.clone(), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        local.read(5 * 65536 + 512, 8192).await.unwrap(),
        d,
        "the VM's write landed locally"
    );
    let e = node.drain(false, false).await.unwrap_err();
    assert!(e.to_string().contains("checkpoint refused"), "{e}");
    assert_eq!(
        node.get_error().unwrap_err().to_string(),
        "I/O error occurred"
    );
    let detail = node.error_detail().unwrap();
    assert!(
        detail.contains("errno 5") || detail.contains("I/O error"),
        "{detail}"
    );
    assert_eq!(node.dirty().ranges(), vec![(5 * 65536, 65536)]);
    assert_eq!(node.status().forward_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_secondary_leaves_the_vm_writing_and_the_resync_sends_the_bitmap_after_a_reconnect()
 {
    let dir = tempfile::tempdir().unwrap();
    let (mut peer, sock, img) = qemu_nbd(dir.path());
    let (local, local_path) = local_disk(dir.path());
    let cfg = PrimaryConfig {
        link_timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let node = PrimaryNode::new(local, cfg);
    node.set_link(link(&sock, "d", Duration::from_secs(2)).await)
        .unwrap();
    node.start(Mode::Primary).unwrap();
    for i in 0..20u64 {
        node.write(i * 65536, data(i, 65536), WriteFlags::default())
            .await
            .unwrap();
    }
    node.drain(true, false).await.unwrap();
    assert_eq!(node.status().dirty_clusters, 0);
    let _ = peer.0.kill();
    let _ = peer.0.wait();
    // Writes while the secondary is gone: all succeed, each range ends up dirty.
    let t = Instant::now();
    let written: Vec<u64> = (100..140).map(|i| i * 65536 + 4096).collect();
    for (i, off) in written.iter().enumerate() {
        node.write(*off, data(i as u64, 4096), WriteFlags::default())
            .await
            .unwrap();
    }
    assert!(node.drain(false, false).await.is_err());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the VM waited {:?} for a dead secondary",
        t.elapsed()
    );
    assert_eq!(
        node.get_error().unwrap_err().to_string(),
        "I/O error occurred"
    );
    assert!(!node.status().link_up);
    assert_eq!(node.dirty().ranges(), vec![(100 * 65536, 40 * 65536)]);
    assert_eq!(node.status().dirty_bytes, 40 * 65536);

    // The secondary comes back (same image) and the primary reconnects: the bitmap survived,
    // so the resync sends exactly what was missed, and new writes are forwarded again.
    std::fs::remove_file(&sock).ok();
    let _back = serve_qemu_nbd(&img, &sock);
    node.set_link(link(&sock, "d", Duration::from_secs(2)).await)
        .unwrap();
    assert!(node.status().link_up);
    let fresh = data(999, 4096);
    node.write(300 * 65536, fresh.clone(), WriteFlags::default())
        .await
        .unwrap();
    let t = Instant::now();
    while node.dirty().dirty_clusters() > 0 || node.resync_status().active {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", node.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resync = node.resync_status();
    assert_eq!(resync.done_bytes, 40 * 65536);
    assert!(resync.sent_bytes <= resync.done_bytes, "{resync:?}");
    // The failure is repaired: every range it marked is on the secondary now, so a checkpoint
    // needs no force.
    node.get_error().unwrap();
    node.checkpoint(false).await.unwrap();
    let image = std::fs::read(&img).unwrap();
    assert_eq!(&image[300 * 65536..][..4096], &fresh[..]);
    assert!(
        image == std::fs::read(&local_path).unwrap(),
        "the disks differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bound_holds_against_nbdkit_with_a_delay_filter() {
    let dir = tempfile::tempdir().unwrap();
    let (_peer, sock) = nbdkit(dir.path(), &["delay"], &["delay-write=20ms".into()]);
    let local = Arc::new(MemoryDev::new(DISK));
    let limits = QueueLimits {
        max_bytes: 2 << 20,
        max_requests: 1024,
        max_in_flight: 16,
    };
    let node = PrimaryNode::new(
        local.clone(),
        PrimaryConfig {
            queue: limits,
            ..Default::default()
        },
    );
    let remote = link(&sock, "", Duration::from_secs(10)).await;
    node.set_link(remote.clone()).unwrap();
    node.start(Mode::Primary).unwrap();
    let writer = {
        let node = node.clone();
        tokio::spawn(async move {
            for i in 0..96u64 {
                node.write(i * 65536, data(i, 65536), WriteFlags::default())
                    .await
                    .unwrap();
            }
        })
    };
    let mut peak = 0;
    while !writer.is_finished() {
        peak = peak.max(node.status().queued_bytes);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    writer.await.unwrap();
    assert!(peak <= 2 << 20, "queued bytes peaked at {peak}");
    assert!(peak >= 1 << 20, "the queue never filled (peak {peak})");
    node.drain(true, false).await.unwrap();
    let got = remote.read(0, 96 * 65536).await.unwrap();
    assert!(
        got == local.read(0, 96 * 65536).await.unwrap(),
        "nbdkit's content differs"
    );
}

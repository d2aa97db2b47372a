//! The NBD client against real servers: qemu-nbd, nbdkit (memory plugin and its error, delay,
//! nozero and blocksize-policy filters) and coloblk's own server.
//!
//! Every server runs on a unique socket in a temporary directory and is killed by a guard on
//! drop. A missing server binary fails the test (scripts/test installs them all).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::{
    BatchWrite, BlockDev, ErrorKind, Extent, ExtentList, MemoryDev, WriteFlags, ZeroFlags,
};
use bytes::Bytes;
use nbd::addr::SocketAddr;
use nbd::client::{BlockSize, ClientConfig, NbdClient};
use nbd::server::{Export, ExportSet, Listener, Server, ServerConfig};
use testutil::FaultyDev;
use testutil::peer::Peer;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------------------------

/// Fails the test when a peer binary is missing (scripts/test installs every peer).
macro_rules! require {
    ($($tool:expr),+) => { testutil::peer::require(&[$($tool),+]) };
}

/// qemu-nbd serving raw `file` on unix socket `sock` (persistent, several clients, real
/// discard).
async fn qemu_nbd(dir: &Path, file: &Path, sock: &Path, extra: &[&str]) -> Peer {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-f",
        "raw",
        "--persistent",
        "-e",
        "8",
        "--discard=unmap",
        "-k",
    ])
    .arg(sock)
    .args(extra)
    .arg(file);
    let mut peer = Peer::spawn(dir, "qemu-nbd", &mut cmd);
    peer.wait_unix(sock).await;
    peer
}

/// nbdkit in the foreground on unix socket `sock`, with `args` (filters, plugin, parameters).
async fn nbdkit(dir: &Path, sock: &Path, args: &[&str]) -> Peer {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(sock)
        .args(args);
    let mut peer = Peer::spawn(dir, "nbdkit", &mut cmd);
    peer.wait_unix(sock).await;
    peer
}

/// An nbdkit with `args` on a socket in a directory of its own, both gone when it is dropped.
struct Kit {
    peer: Peer,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Kit {
    async fn start(args: &[&str]) -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("k.sock");
        let peer = nbdkit(dir.path(), &sock, args).await;
        Kit {
            peer,
            sock,
            _dir: dir,
        }
    }

    async fn connect(&self) -> NbdClient {
        connect(&self.sock).await
    }

    async fn connect_with(&self, config: ClientConfig) -> NbdClient {
        NbdClient::connect(&unix(&self.sock), "", config)
            .await
            .unwrap()
    }

    fn kill(&mut self) {
        self.peer.kill();
    }
}

fn unix(sock: &Path) -> SocketAddr {
    SocketAddr::Unix(sock.to_path_buf())
}

fn config() -> ClientConfig {
    ClientConfig {
        request_timeout: Some(Duration::from_secs(10)),
        ..ClientConfig::default()
    }
}

async fn connect(sock: &Path) -> NbdClient {
    NbdClient::connect(&unix(sock), "", config()).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------------------------

/// Deterministic bytes that differ for every seed and position, as a vector.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    testutil::pattern(seed, len).to_vec()
}

/// A sparse raw file of `size` bytes with `regions` written.
fn sparse_file(path: &Path, size: u64, regions: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (offset, data) in regions {
        f.write_all_at(data, *offset).unwrap();
    }
    f.sync_all().unwrap();
}

/// Block status of a whole range, asking again until it is covered.
async fn map(dev: &dyn BlockDev, offset: u64, len: u64) -> ExtentList {
    let mut out = ExtentList::new();
    let mut pos = offset;
    while pos < offset + len {
        let part = dev.block_status(pos, offset + len - pos).await.unwrap();
        assert!(part.total() > 0);
        pos += part.total();
        part.iter().for_each(|e| out.push(*e));
    }
    out
}

/// Fails the test if a future runs longer than `limit` (a hang is a bug here).
async fn bounded<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .expect("operation hung")
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {} != {}",
            got[i], want[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// qemu-nbd
// ---------------------------------------------------------------------------------------------

/// The handshake records qemu-nbd's size, flags, block sizes and contexts; the URI form works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_handshake_reports_export_and_capabilities() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let (file, sock) = (dir.path().join("disk.raw"), dir.path().join("q.sock"));
    sparse_file(&file, 16 * MIB, &[]);
    let _q = qemu_nbd(dir.path(), &file, &sock, &[]).await;

    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let c = NbdClient::connect_uri(&uri, config()).await.unwrap();

    let info = c.export_info();
    assert_eq!(info.size, 16 * MIB);
    assert!(info.structured_replies);
    assert!(info.base_allocation.is_some());
    assert!(!info.read_only());
    assert!(info.can_flush() && info.can_fua() && info.can_trim() && info.can_cache());
    assert!(info.can_write_zeroes() && info.can_fast_zero());
    assert_eq!(
        info.block_size,
        BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 * MIB as u32
        }
    );
    assert_eq!(c.info().len, 16 * MIB);
    c.disconnect().await;
    assert!(!c.is_alive());
}

/// Writes of several shapes (unaligned, FUA, split above 32 MiB) read back exactly, and the raw
/// file behind qemu-nbd holds exactly those bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_writes_read_back_and_land_in_the_file_exactly() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let (file, sock) = (dir.path().join("disk.raw"), dir.path().join("q.sock"));
    let size = 48 * MIB;
    sparse_file(&file, size, &[]);
    let _q = qemu_nbd(dir.path(), &file, &sock, &[]).await;
    let c = connect(&sock).await;
    let mut model = vec![0u8; size as usize];
    let writes: [(u64, usize, bool); 4] = [
        (0, 64 * KIB as usize, false),
        (1000, 3000, false),
        (8 * MIB, MIB as usize, true),
        (12 * MIB + 512, 33 * MIB as usize, false),
    ];

    for (i, (offset, len, fua)) in writes.into_iter().enumerate() {
        let data = pattern(i as u64, len);
        c.write(offset, Bytes::from(data.clone()), WriteFlags { fua })
            .await
            .unwrap();
        model[offset as usize..][..len].copy_from_slice(&data);
        let back = c.read(offset, len).await.unwrap();
        assert_same(&back, &data, &format!("write {i} read back"));
    }
    c.flush().await.unwrap();

    let whole = c.read(0, size as usize).await.unwrap();
    assert_same(&whole, &model, "whole export");
    assert_same(&std::fs::read(&file).unwrap(), &model, "raw file");
    c.disconnect().await;
}

/// 256 concurrent 4 KiB writes with distinct patterns from many tasks, then 256 concurrent
/// reads on a second connection limited to 16 requests in flight: every block is exact, and so
/// is the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_serves_256_concurrent_requests_with_distinct_patterns() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let (file, sock) = (dir.path().join("disk.raw"), dir.path().join("q.sock"));
    sparse_file(&file, 4 * MIB, &[]);
    let _q = qemu_nbd(dir.path(), &file, &sock, &[]).await;
    let writer: Arc<dyn BlockDev> = Arc::new(connect(&sock).await);
    let narrow = ClientConfig {
        max_in_flight: 16,
        ..config()
    };
    let reader: Arc<dyn BlockDev> =
        Arc::new(NbdClient::connect(&unix(&sock), "", narrow).await.unwrap());
    let block = |i: u64| (i * 3 * 4096 % (4 * MIB), pattern(1000 + i, 4096));

    let writes: Vec<_> = (0..256)
        .map(|i| {
            let (dev, (offset, data)) = (writer.clone(), block(i));
            tokio::spawn(async move { dev.write(offset, data.into(), WriteFlags::default()).await })
        })
        .collect();
    for w in writes {
        bounded(Duration::from_secs(10), w).await.unwrap().unwrap();
    }
    writer.flush().await.unwrap();
    let reads: Vec<_> = (0..256)
        .map(|i| {
            let (dev, (offset, _)) = (reader.clone(), block(i));
            tokio::spawn(async move { dev.read(offset, 4096).await })
        })
        .collect();

    let mut model = vec![0u8; 4 * MIB as usize];
    for (i, r) in reads.into_iter().enumerate() {
        let (offset, data) = block(i as u64);
        let got = bounded(Duration::from_secs(10), r).await.unwrap().unwrap();
        assert_same(&got, &data, &format!("block {i}"));
        model[offset as usize..][..4096].copy_from_slice(&data);
    }
    assert_same(&std::fs::read(&file).unwrap(), &model, "raw file");
}

/// Block status over a sparse file reports exactly its data and holes, also for sub-ranges
/// and with REQ_ONE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_block_status_matches_the_sparse_file() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let (file, sock) = (dir.path().join("disk.raw"), dir.path().join("q.sock"));
    let (a, b) = (pattern(1, 64 * KIB as usize), pattern(2, 4 * KIB as usize));
    sparse_file(&file, 16 * MIB, &[(MIB, &a), (8 * MIB, &b)]);
    let _q = qemu_nbd(dir.path(), &file, &sock, &[]).await;
    let c = connect(&sock).await;

    let whole = map(&c, 0, 16 * MIB).await;
    let one = c.block_status_with(0, 16 * MIB, true).await.unwrap();
    let inside = c.block_status(MIB + 4096, 8192).await.unwrap();

    let expected = vec![
        Extent::hole(MIB),
        Extent::data(64 * KIB),
        Extent::hole(7 * MIB - 64 * KIB),
        Extent::data(4 * KIB),
        Extent::hole(8 * MIB - 4 * KIB),
    ];
    assert_eq!(whole.0, expected);
    assert_eq!(one.0, vec![Extent::hole(MIB)]);
    assert_eq!(inside.0, vec![Extent::data(8192)]);
}

/// Write-zeroes (with and without unmap) and trim make ranges read as zeroes, punch holes
/// where allowed, and leave exactly the expected bytes in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_write_zeroes_and_trim_change_exactly_their_ranges() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let (file, sock) = (dir.path().join("disk.raw"), dir.path().join("q.sock"));
    let data = pattern(3, 2 * MIB as usize);
    sparse_file(&file, 4 * MIB, &[(0, &data)]);
    let _q = qemu_nbd(dir.path(), &file, &sock, &[]).await;
    let c = connect(&sock).await;
    let unmap = ZeroFlags {
        may_unmap: true,
        ..ZeroFlags::default()
    };

    c.write_zeroes(0, 64 * KIB, ZeroFlags::default())
        .await
        .unwrap();
    c.write_zeroes(64 * KIB, 64 * KIB, unmap).await.unwrap();
    c.discard(MIB, MIB).await.unwrap();
    c.flush().await.unwrap();

    let mut model = vec![0u8; 4 * MIB as usize];
    model[128 * KIB as usize..MIB as usize]
        .copy_from_slice(&data[128 * KIB as usize..MIB as usize]);
    assert_same(
        &c.read(0, 4 * MIB as usize).await.unwrap(),
        &model,
        "export",
    );
    assert_same(&std::fs::read(&file).unwrap(), &model, "raw file");
    let unmapped = c.block_status(64 * KIB, 64 * KIB).await.unwrap();
    assert_eq!(unmapped.0, vec![Extent::hole(64 * KIB)]);
    let trimmed = c.block_status(MIB, MIB).await.unwrap();
    assert_eq!(trimmed.0, vec![Extent::hole(MIB)]);
}

/// TCP with an `nbd://` URI and a named export; an unknown export is refused with the
/// server's reason rather than a hang or a generic error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_over_tcp_by_uri_with_a_named_export() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    sparse_file(&file, 4 * MIB, &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-f",
        "raw",
        "--persistent",
        "-e",
        "8",
        "-b",
        "127.0.0.1",
        "-x",
        "disk",
        "-p",
    ])
    .arg(port.to_string())
    .arg(&file);
    let mut q = Peer::spawn(dir.path(), "qemu-nbd", &mut cmd);
    q.wait_ready(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        .await;

    let c = NbdClient::connect_uri(&format!("nbd://127.0.0.1:{port}/disk"), config())
        .await
        .unwrap();
    c.write(4096, Bytes::from_static(b"over tcp"), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(&c.read(4096, 8).await.unwrap()[..], b"over tcp");
    let err = NbdClient::connect_uri(&format!("nbd://127.0.0.1:{port}/nope"), config())
        .await
        .unwrap_err();

    assert_eq!(err.kind, ErrorKind::InvalidArgument, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("'nope'") && text.contains("NBD_REP_ERR_UNKNOWN"),
        "{text}"
    );
}

/// A URI that cannot name an export fails at once with the reason.
#[tokio::test]
async fn bad_uris_fail_with_the_reason() {
    for (uri, why) in [
        ("nbds://h/e", "TLS"),
        ("nbd+unix:///e", "socket"),
        ("http://h", "scheme"),
    ] {
        let err = NbdClient::connect_uri(uri, config()).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        assert!(err.to_string().contains(why), "{err}");
    }
}

/// Connecting to a socket nobody serves fails at once, naming the address.
#[tokio::test]
async fn connecting_to_a_missing_socket_names_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");

    let err = NbdClient::connect(&unix(&sock), "disk", config())
        .await
        .unwrap_err();

    assert_eq!(err.kind, ErrorKind::Io(Some(2)), "{err}");
    assert!(
        err.to_string().contains(&sock.display().to_string()),
        "{err}"
    );
}

/// A peer that accepts but never greets does not hold the client past the handshake timeout.
#[tokio::test]
async fn a_silent_peer_fails_the_handshake_with_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let config = ClientConfig {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..config()
    };

    let err = bounded(
        Duration::from_secs(2),
        NbdClient::connect(&unix(&sock), "", config),
    )
    .await
    .unwrap_err();

    assert_eq!(err.kind, ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains("handshake"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// nbdkit
// ---------------------------------------------------------------------------------------------

/// The basics against nbdkit's memory plugin: default block sizes, write/read, cache, zeroes,
/// trim, flush and block status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_memory_round_trips_every_command() {
    require!("nbdkit");
    let k = Kit::start(&["memory", "size=64M"]).await;
    let c = k.connect().await;
    let data = pattern(4, 256 * KIB as usize);

    assert_eq!(c.export_info().size, 64 * MIB);
    c.write(MIB, Bytes::from(data.clone()), WriteFlags { fua: true })
        .await
        .unwrap();
    c.cache(MIB, 256 * KIB).await.unwrap();
    assert_same(&c.read(MIB, data.len()).await.unwrap(), &data, "read back");
    c.write_zeroes(MIB, 64 * KIB, ZeroFlags::default())
        .await
        .unwrap();
    c.discard(MIB + 128 * KIB, 128 * KIB).await.unwrap();
    c.flush().await.unwrap();

    let mut want = data.clone();
    want[..64 * KIB as usize].fill(0);
    want[128 * KIB as usize..].fill(0);
    assert_same(
        &c.read(MIB, data.len()).await.unwrap(),
        &want,
        "after zero and trim",
    );
    let extents = map(&c, 0, 64 * MIB).await;
    assert_eq!(extents.total(), 64 * MIB);
    let data_at = |off: u64| {
        let mut pos = 0;
        extents.iter().find(|e| {
            pos += e.len;
            pos > off
        })
    };
    assert!(!data_at(MIB + 64 * KIB).unwrap().hole, "{extents:?}");
    assert!(
        data_at(0).unwrap().hole && data_at(32 * MIB).unwrap().hole,
        "{extents:?}"
    );
    c.disconnect().await;
}

/// Error replies from nbdkit's error filter come back as EIO errors (no hang, no dead
/// connection), and the same connection works once errors stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_error_filter_replies_eio_and_the_connection_survives() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let (sock, trigger) = (dir.path().join("k.sock"), dir.path().join("inject"));
    std::fs::write(&trigger, b"").unwrap();
    let error_file = format!("error-file={}", trigger.display());
    let args = [
        "--filter=error",
        "memory",
        "size=64M",
        "error-rate=100%",
        &error_file,
    ];
    let _k = nbdkit(dir.path(), &sock, &args).await;
    let c = connect(&sock).await;

    let read = bounded(Duration::from_secs(5), c.read(0, 4096))
        .await
        .unwrap_err();
    let write = c
        .write(0, Bytes::from_static(b"x"), WriteFlags::default())
        .await
        .unwrap_err();
    std::fs::remove_file(&trigger).unwrap();
    let after = c.read(0, 4096).await;

    assert_eq!(read.kind, ErrorKind::Io(Some(5)), "{read}");
    assert!(read.to_string().contains("EIO"), "{read}");
    assert_eq!(write.kind, ErrorKind::Io(Some(5)), "{write}");
    assert_eq!(after.unwrap().len(), 4096);
    assert!(c.is_alive());
}

/// ENOSPC from the server is the block layer's NoSpace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_enospc_maps_to_no_space() {
    require!("nbdkit");
    let args = [
        "--filter=error",
        "memory",
        "size=64M",
        "error=ENOSPC",
        "error-pwrite-rate=100%",
    ];
    let k = Kit::start(&args).await;
    let c = k.connect().await;

    let err = c
        .write(0, Bytes::from_static(b"x"), WriteFlags::default())
        .await
        .unwrap_err();

    assert_eq!(err.kind, ErrorKind::NoSpace, "{err}");
    assert_eq!(c.read(0, 1).await.unwrap().len(), 1);
}

/// Killing the server while requests are in flight fails all of them with Shutdown within a
/// bounded time, and later requests fail at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_server_fails_pending_requests_promptly() {
    require!("nbdkit");
    let args = ["--filter=delay", "memory", "size=64M", "delay-read=3"];
    let mut k = Kit::start(&args).await;
    let c = Arc::new(k.connect().await);
    let reads: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed = Instant::now();
    k.kill();
    for r in reads {
        let err = bounded(Duration::from_secs(2), r)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Shutdown, "{err}");
    }
    assert!(killed.elapsed() < Duration::from_secs(2));
    assert!(!c.is_alive());
    let err = bounded(Duration::from_millis(500), c.flush())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Shutdown);
}

/// A reply slower than the request timeout fails that request with TimedOut and closes the
/// connection, so the next request fails at once instead of queueing behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_slower_than_the_timeout_fails_with_timed_out() {
    require!("nbdkit");
    let args = ["--filter=delay", "memory", "size=64M", "delay-read=5"];
    let k = Kit::start(&args).await;
    let config = ClientConfig {
        request_timeout: Some(Duration::from_millis(500)),
        ..config()
    };
    let c = k.connect_with(config).await;

    let started = Instant::now();
    let err = c.read(0, 4096).await.unwrap_err();
    let took = started.elapsed();
    let next = bounded(
        Duration::from_millis(500),
        c.write(0, Bytes::from_static(b"x"), WriteFlags::default()),
    )
    .await
    .unwrap_err();

    assert_eq!(err.kind, ErrorKind::TimedOut, "{err}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(next.kind, ErrorKind::Shutdown, "{next}");
    assert!(next.to_string().contains("no reply within"), "{next}");
}

/// Without NBD_CMD_WRITE_ZEROES (nozero filter) write-zeroes still zeroes, by writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_falls_back_to_writes_when_the_server_lacks_it() {
    require!("nbdkit");
    let k = Kit::start(&["--filter=nozero", "memory", "size=64M"]).await;
    let c = k.connect().await;
    let data = pattern(5, 3 * MIB as usize);

    assert!(!c.export_info().can_write_zeroes());
    c.write(0, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    c.write_zeroes(4096, 2 * MIB + 100, ZeroFlags::default())
        .await
        .unwrap();

    let mut want = data;
    want[4096..(4096 + 2 * MIB + 100) as usize].fill(0);
    assert_same(
        &c.read(0, want.len()).await.unwrap(),
        &want,
        "after fallback zeroing",
    );
    let fast = ZeroFlags {
        fast_only: true,
        ..ZeroFlags::default()
    };
    assert_eq!(
        c.write_zeroes(0, 4096, fast).await.unwrap_err().kind,
        ErrorKind::NotSupported
    );
}

/// A server that rejects reads and writes above 64 KiB (blocksize-policy with the error
/// policy) still takes megabyte requests: the client splits them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_above_the_maximum_block_size_are_split() {
    require!("nbdkit");
    let args = [
        "--filter=blocksize-policy",
        "memory",
        "size=64M",
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=64K",
        "blocksize-error-policy=error",
    ];
    let k = Kit::start(&args).await;
    let c = k.connect().await;
    let data = pattern(6, MIB as usize + 4096);

    assert_eq!(
        c.export_info().block_size,
        BlockSize {
            min: 512,
            preferred: 4096,
            max: 65536
        }
    );
    c.write(512, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    assert_same(&c.read(512, data.len()).await.unwrap(), &data, "split read");
}

// ---------------------------------------------------------------------------------------------
// coloblk's own server
// ---------------------------------------------------------------------------------------------

/// Client and server of this crate agree over TCP: concurrent writes, zeroes, trim and block
/// status end in exactly the expected device content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coloblk_server_round_trip_over_tcp() {
    let dev = Arc::new(MemoryDev::new(8 * MIB));
    let exports = ExportSet::new();
    exports.add(Export::new("disk", dev.clone()));
    let server = Server::new(exports, ServerConfig::default());
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener).await })
    };
    let c = Arc::new(NbdClient::connect(&addr, "disk", config()).await.unwrap());
    let writes: Vec<_> = (0..64u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                c.write(i * 64 * KIB, pattern(i, 4096).into(), WriteFlags::default())
                    .await
            })
        })
        .collect();
    for w in writes {
        w.await.unwrap().unwrap();
    }

    c.write_zeroes(0, 4096, ZeroFlags::default()).await.unwrap();
    c.discard(64 * KIB, 4096).await.unwrap();
    c.flush().await.unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    for i in 2..64u64 {
        model[(i * 64 * KIB) as usize..][..4096].copy_from_slice(&pattern(i, 4096));
    }
    assert_same(&c.read(0, model.len()).await.unwrap(), &model, "export");
    assert_same(&dev.snapshot(), &model, "memory device");
    let status = c.block_status(2 * 64 * KIB, 64 * KIB).await.unwrap();
    assert_eq!(status.0, vec![Extent::data(4096), Extent::hole(60 * KIB)]);
    c.disconnect().await;
    server.shutdown();
    serving.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Batches (BlockDev::write_batch)
// ---------------------------------------------------------------------------------------------

fn batch_write(offset: u64, data: Vec<u8>, fua: bool) -> BatchWrite {
    BatchWrite {
        offset,
        data: Bytes::from(data),
        flags: WriteFlags { fua },
    }
}

/// A batch larger than the connection's slots (it goes in several runs), with a FUA write and
/// one write past the end: every write in range lands exactly in qemu-nbd's file, the one past
/// the end alone fails, in its place in the results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_batch_lands_every_write_and_fails_only_the_bad_one() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let (file, sock) = (dir.path().join("d.raw"), dir.path().join("q.sock"));
    sparse_file(&file, 16 * MIB, &[]);
    let _q = qemu_nbd(dir.path(), &file, &sock, &[]).await;
    let cfg = ClientConfig {
        max_in_flight: 8,
        ..config()
    };
    let c = NbdClient::connect(&unix(&sock), "", cfg).await.unwrap();
    let mut model = vec![0u8; 16 * MIB as usize];
    let mut batch = Vec::new();
    for i in 0..50u64 {
        let (offset, data) = (
            i * 96 * KIB + 512,
            pattern(100 + i, 4096 + 512 * i as usize),
        );
        model[offset as usize..][..data.len()].copy_from_slice(&data);
        batch.push(batch_write(offset, data, i == 7));
    }
    batch.insert(20, batch_write(16 * MIB - 100, pattern(1, 4096), false));

    let results = bounded(Duration::from_secs(10), c.write_batch(batch)).await;

    assert_eq!(results.len(), 51);
    for (i, r) in results.iter().enumerate() {
        match i {
            20 => assert_eq!(r.as_ref().unwrap_err().kind, ErrorKind::OutOfRange, "{r:?}"),
            _ => assert!(r.is_ok(), "write {i}: {r:?}"),
        }
    }
    c.flush().await.unwrap();
    assert_same(&std::fs::read(&file).unwrap(), &model, "qemu-nbd's file");
    assert!(c.is_alive());
}

/// Against a server that refuses requests above 64 KiB, a batch's megabyte write is split
/// and its small writes still go as one run: all land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_splits_writes_above_the_servers_maximum() {
    require!("nbdkit");
    let args = [
        "--filter=blocksize-policy",
        "memory",
        "size=64M",
        "blocksize-maximum=64K",
        "blocksize-error-policy=error",
    ];
    let k = Kit::start(&args).await;
    let c = k.connect().await;
    let big = pattern(7, MIB as usize + 4096);
    let small: Vec<Vec<u8>> = (0..16).map(|i| pattern(200 + i, 4096)).collect();
    let mut batch = vec![batch_write(4 * MIB, big.clone(), false)];
    for (i, d) in small.iter().enumerate() {
        batch.push(batch_write(i as u64 * 8 * KIB, d.clone(), false));
    }

    let results = bounded(Duration::from_secs(10), c.write_batch(batch)).await;

    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_same(
        &c.read(4 * MIB, big.len()).await.unwrap(),
        &big,
        "split write",
    );
    for (i, d) in small.iter().enumerate() {
        let got = c.read(i as u64 * 8 * KIB, 4096).await.unwrap();
        assert_same(&got, d, &format!("small write {i}"));
    }
}

/// Our server fails one write of a batch with EIO: that write, and only it, reports the
/// server's error; the others land and the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_fails_only_its_write_of_the_batch() {
    let mem = Arc::new(MemoryDev::new(MIB));
    let dev = Arc::new(FaultyDev::new(mem.clone()));
    dev.fail_writes_at
        .store(5 * 8 * KIB + 100, std::sync::atomic::Ordering::SeqCst);
    let exports = ExportSet::new();
    exports.add(Export::new("disk", dev));
    let server = Server::new(exports, ServerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let listener = Listener::bind(&unix(&sock)).await.unwrap();
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener).await })
    };
    let c = NbdClient::connect(&unix(&sock), "disk", config())
        .await
        .unwrap();
    let batch: Vec<_> = (0..12u64)
        .map(|i| batch_write(i * 8 * KIB, pattern(300 + i, 4096), false))
        .collect();

    let results = bounded(Duration::from_secs(10), c.write_batch(batch)).await;

    let mut model = vec![0u8; MIB as usize];
    for (i, r) in results.iter().enumerate() {
        if i == 5 {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.kind, ErrorKind::Io(Some(5)), "{e}");
            assert!(e.to_string().contains("EIO"), "{e}");
        } else {
            assert!(r.is_ok(), "write {i}: {r:?}");
            model[i * 8 * KIB as usize..][..4096].copy_from_slice(&pattern(300 + i as u64, 4096));
        }
    }
    assert!(c.is_alive());
    assert_same(&mem.snapshot(), &model, "the served device");
    c.disconnect().await;
    server.shutdown();
    serving.await.unwrap().unwrap();
}

/// A batch waiting on a server that is killed fails whole and promptly with Shutdown, also
/// when the client has no request timeout (nothing but the connection's end wakes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_server_fails_a_pending_batch_promptly() {
    require!("nbdkit");
    for timeout in [Some(Duration::from_secs(10)), None] {
        let args = ["--filter=delay", "memory", "size=64M", "delay-write=3"];
        let mut k = Kit::start(&args).await;
        let cfg = ClientConfig {
            request_timeout: timeout,
            ..config()
        };
        let c = Arc::new(k.connect_with(cfg).await);
        let batch: Vec<_> = (0..8u64)
            .map(|i| batch_write(i * 4096, pattern(i, 4096), false))
            .collect();
        let pending = {
            let c = c.clone();
            tokio::spawn(async move { c.write_batch(batch).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;

        k.kill();
        let results = bounded(Duration::from_secs(2), pending).await.unwrap();

        assert_eq!(results.len(), 8);
        for r in results {
            assert_eq!(
                r.unwrap_err().kind,
                ErrorKind::Shutdown,
                "timeout {timeout:?}"
            );
        }
        assert!(!c.is_alive());
    }
}

/// A batch whose replies come later than the request timeout fails with TimedOut, every
/// write of it, and closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_slower_than_the_timeout_fails_with_timed_out() {
    require!("nbdkit");
    let args = ["--filter=delay", "memory", "size=64M", "delay-write=5"];
    let k = Kit::start(&args).await;
    let cfg = ClientConfig {
        request_timeout: Some(Duration::from_millis(500)),
        ..config()
    };
    let c = k.connect_with(cfg).await;
    let batch: Vec<_> = (0..4u64)
        .map(|i| batch_write(i * 4096, pattern(i, 4096), false))
        .collect();

    let started = Instant::now();
    let results = c.write_batch(batch).await;
    let took = started.elapsed();

    for r in &results {
        let e = r.as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("no reply within"), "{e}");
    }
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(!c.is_alive());
}

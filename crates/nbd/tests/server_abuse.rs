//! Malformed and hostile NBD traffic against our server: every case gets the protocol's error
//! reply or a clean disconnect of that one client, and afterwards the server still serves the
//! right bytes to a well-behaved client that stayed connected throughout. Clients that hold
//! resources (connection slots, payload memory) without using them get them taken back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, MemoryDev, WriteFlags};
use bytes::{BufMut, Bytes, BytesMut};
use nbd::addr::SocketAddr;
use nbd::proto::*;
use nbd::server::{Export, ExportSet, Listener, Server, ServerConfig};
use testutil::pattern;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SIZE: u64 = 128 << 20;

/// Tests that make the server hold much memory run one at a time, so that each measures its
/// own.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Fixture {
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    dev: Arc<MemoryDev>,
    server: Arc<Server>,
}

async fn start() -> Fixture {
    start_with(ServerConfig::default()).await
}

async fn start_with(config: ServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let dev = Arc::new(MemoryDev::new(SIZE));
    let set = ExportSet::new();
    set.add(Export::new("disk", dev.clone()));
    let mut ro = Export::new("ro", Arc::new(MemoryDev::new(1 << 20)));
    ro.read_only = true;
    set.add(ro);
    let server = Server::new(set, config);
    let l = Listener::bind(&SocketAddr::Unix(sock.clone()))
        .await
        .unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(l).await });
    Fixture {
        _dir: dir,
        sock,
        dev,
        server,
    }
}

async fn greet(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).await.unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello[..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&hello[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([hello[16], hello[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    s
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(opt);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.to_vec()
}

fn flags() -> Vec<u8> {
    (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec()
}

/// Greets and selects `name` with NBD_OPT_EXPORT_NAME (simple replies).
async fn attach(sock: &Path, name: &str) -> UnixStream {
    let mut s = greet(sock).await;
    s.write_all(&flags()).await.unwrap();
    s.write_all(&option(OPT_EXPORT_NAME, name.as_bytes()))
        .await
        .unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).await.unwrap();
    s
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut b = BytesMut::new();
    Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    }
    .encode(&mut b);
    b.to_vec()
}

/// Reads until the server closes; fails if it does not close in time.
async fn expect_closed(s: &mut UnixStream) {
    assert!(
        closed_within(s, Duration::from_secs(5)).await,
        "server did not close the connection"
    );
}

/// Reads until the server closes; whether it did within `within`.
async fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    let mut buf = [0u8; 65536];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

async fn expect_simple_reply(s: &mut UnixStream, errno: u32, cookie: u64) {
    let mut r = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut r))
        .await
        .unwrap()
        .unwrap();
    let mut want = BytesMut::new();
    simple_reply(&mut want, errno, cookie);
    assert_eq!(
        &r[..],
        &want[..],
        "expected errno {errno} for cookie {cookie}"
    );
}

async fn expect_option_reply(s: &mut UnixStream, opt: u32, kind: u32) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
    assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        kind,
        "reply type"
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
}

/// Cases of the handshake phase after which the server must close the connection.
fn closing_handshakes() -> Vec<(&'static str, Vec<u8>)> {
    let huge_option = [
        flags(),
        IHAVEOPT.to_be_bytes().to_vec(),
        7u32.to_be_bytes().to_vec(),
        u32::MAX.to_be_bytes().to_vec(),
    ];
    vec![
        ("unknown client flags", u32::MAX.to_be_bytes().to_vec()),
        ("bad option magic", [flags(), vec![0x11; 16]].concat()),
        ("option length 4 GiB", huge_option.concat()),
        (
            "unknown export by name",
            [flags(), option(OPT_EXPORT_NAME, b"nope")].concat(),
        ),
        (
            "export name not UTF-8",
            [flags(), option(OPT_EXPORT_NAME, &[0xff, 0xfe])].concat(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_and_requests_leave_the_server_serving_correct_data() {
    let _heavy = HEAVY.lock().await;
    let f = start().await;
    let good_data = Bytes::from(
        (0..65536u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    );
    f.dev
        .write(1 << 20, good_data.clone(), WriteFlags::default())
        .await
        .unwrap();
    // A well-behaved client that stays connected through all the abuse.
    let mut bystander = attach(&f.sock, "disk").await;

    for (what, bytes) in closing_handshakes() {
        let mut s = greet(&f.sock).await;
        s.write_all(&bytes).await.unwrap();
        expect_closed(&mut s).await;
        eprintln!("ok: {what}");
    }

    // Truncated traffic from clients that vanish.
    for cut in [1usize, 3, 9, 15] {
        let mut s = greet(&f.sock).await;
        let bytes = [flags(), option(OPT_GO, b"\0\0\0\x04disk\0\0")].concat();
        s.write_all(&bytes[..cut]).await.unwrap();
        drop(s);
    }

    // Handshake phase: cases answered with an error, after which the session goes on.
    let mut s = greet(&f.sock).await;
    s.write_all(&flags()).await.unwrap();
    for (opt, data, reply) in [
        (OPT_INFO, &b"\0\0\x10\0disk"[..], REP_ERR_INVALID),
        (99, b"xyz", REP_ERR_UNSUP),
        (OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID),
        (OPT_STARTTLS, b"", REP_ERR_POLICY),
        (OPT_LIST, b"x", REP_ERR_INVALID),
        (
            OPT_SET_META_CONTEXT,
            b"\0\0\0\x04disk\0\0\0\0",
            REP_ERR_INVALID,
        ),
        (OPT_GO, b"\0\0\0\x04nope\0\0", REP_ERR_UNKNOWN),
        (OPT_ABORT, b"", REP_ACK),
    ] {
        s.write_all(&option(opt, data)).await.unwrap();
        expect_option_reply(&mut s, opt, reply).await;
    }
    expect_closed(&mut s).await;

    // Transmission phase: error replies, session continues.
    let mut s = attach(&f.sock, "disk").await;
    let answered: Vec<(&str, Vec<u8>, u64, u32)> = vec![
        (
            "read past the end",
            request(CMD_READ, 0, 1, SIZE - 10, 20),
            1,
            EINVAL,
        ),
        (
            "read at u64::MAX",
            request(CMD_READ, 0, 2, u64::MAX, 512),
            2,
            EINVAL,
        ),
        (
            "read of 64 MiB",
            request(CMD_READ, 0, 3, 0, 64 << 20),
            3,
            EINVAL,
        ),
        ("unknown command", request(99, 0, 4, 0, 0), 4, EINVAL),
        (
            "FUA on a read",
            request(CMD_READ, CMD_FLAG_FUA, 5, 0, 512),
            5,
            EINVAL,
        ),
        (
            "block status without a context",
            request(CMD_BLOCK_STATUS, 0, 6, 0, 512),
            6,
            EINVAL,
        ),
        (
            "trim past the end",
            request(CMD_TRIM, 0, 7, SIZE, 1),
            7,
            ENOSPC,
        ),
        (
            "zeroes past the end",
            request(CMD_WRITE_ZEROES, 0, 8, SIZE - 1, 2),
            8,
            ENOSPC,
        ),
        (
            "write past the end",
            [request(CMD_WRITE, 0, 9, SIZE - 2, 4), vec![1, 2, 3, 4]].concat(),
            9,
            ENOSPC,
        ),
    ];
    for (what, bytes, cookie, errno) in answered {
        s.write_all(&bytes).await.unwrap();
        expect_simple_reply(&mut s, errno, cookie).await;
        eprintln!("ok: {what}");
    }
    // The same session still reads correctly.
    s.write_all(&request(CMD_READ, 0, 10, 1 << 20, 65536))
        .await
        .unwrap();
    expect_simple_reply(&mut s, 0, 10).await;
    let mut got = vec![0u8; 65536];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, good_data);

    // Writes to a read-only export: EPERM, payload consumed, session continues.
    let mut s = attach(&f.sock, "ro").await;
    s.write_all(&[request(CMD_WRITE, 0, 11, 0, 4), vec![9; 4]].concat())
        .await
        .unwrap();
    expect_simple_reply(&mut s, EPERM, 11).await;
    s.write_all(&request(CMD_WRITE_ZEROES, 0, 12, 0, 4096))
        .await
        .unwrap();
    expect_simple_reply(&mut s, EPERM, 12).await;
    s.write_all(&request(CMD_FLUSH, 0, 13, 0, 0)).await.unwrap();
    expect_simple_reply(&mut s, 0, 13).await;

    // Transmission phase: cases that end the session.
    for (what, bytes) in [
        ("bad request magic", vec![0xAB; 28]),
        ("write of 4 GiB", request(CMD_WRITE, 0, 20, 0, u32::MAX)),
    ] {
        let mut s = attach(&f.sock, "disk").await;
        s.write_all(&bytes).await.unwrap();
        expect_closed(&mut s).await;
        eprintln!("ok: {what}");
    }
    // A client that vanishes in the middle of a write payload.
    let mut s = attach(&f.sock, "disk").await;
    s.write_all(&[request(CMD_WRITE, 0, 30, 1 << 20, 65536), vec![0xEE; 1000]].concat())
        .await
        .unwrap();
    drop(s);
    // A client that sends many large reads, never reads a reply, and vanishes.
    let mut s = attach(&f.sock, "disk").await;
    for i in 0..64 {
        s.write_all(&request(CMD_READ, 0, 100 + i, 0, 1 << 20))
            .await
            .unwrap();
    }
    drop(s);

    // The bystander still gets exactly the right bytes, and nothing was written.
    bystander
        .write_all(&request(CMD_READ, 0, 77, 1 << 20, 65536))
        .await
        .unwrap();
    expect_simple_reply(&mut bystander, 0, 77).await;
    let mut got = vec![0u8; 65536];
    bystander.read_exact(&mut got).await.unwrap();
    assert_eq!(got, good_data);
    assert_eq!(
        f.dev.allocated_bytes(),
        65536,
        "no abusive request changed the disk"
    );
}

/// Many pipelined writes on one connection: each gets exactly one reply with its own cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_each_get_their_own_reply() {
    let f = start().await;
    let mut s = attach(&f.sock, "disk").await;
    let n = 200u64;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend(request(CMD_WRITE, 0, i, i * 4096, 4096));
        batch.extend(vec![i as u8; 4096]);
    }
    s.write_all(&batch).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let mut r = [0u8; 16];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
        assert!(seen.insert(u64::from_be_bytes(r[8..16].try_into().unwrap())));
    }
    assert_eq!(seen.len() as u64, n);
    let snap = f.dev.snapshot();
    for i in 0..n as usize {
        assert!(
            snap[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            "block {i}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Connection slots
// ---------------------------------------------------------------------------------------------

/// Whether the server greets a new connection within `within`.
async fn greeted_within(s: &mut UnixStream, within: Duration) -> bool {
    let mut hello = [0u8; 18];
    matches!(
        tokio::time::timeout(within, s.read_exact(&mut hello)).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_connects_and_says_nothing_is_closed_after_the_handshake_timeout() {
    let f = start_with(ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut silent = greet(&f.sock).await;

    let started = tokio::time::Instant::now();
    expect_closed(&mut silent).await;

    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_bound_a_client_waits_until_a_slot_frees() {
    let f = start_with(ServerConfig {
        max_connections: 4,
        ..ServerConfig::default()
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(attach(&f.sock, "disk").await);
    }
    let mut waiting = UnixStream::connect(&f.sock).await.unwrap();
    assert!(!greeted_within(&mut waiting, Duration::from_millis(300)).await);

    drop(open.pop());

    assert!(greeted_within(&mut waiting, Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_at_the_bound_give_their_slots_back_after_the_handshake_timeout() {
    let f = start_with(ServerConfig {
        max_connections: 8,
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(greet(&f.sock).await);
    }

    let mut s = UnixStream::connect(&f.sock).await.unwrap();

    assert!(greeted_within(&mut s, Duration::from_secs(5)).await);
}

// ---------------------------------------------------------------------------------------------
// Payload memory
// ---------------------------------------------------------------------------------------------

const MIB: usize = 1 << 20;
/// Where the abusive clients read (filled with data, so replies are real memory) or write.
const ABUSED: u64 = 0;
/// Where the well-behaved client works.
const GOOD: u64 = 96 << 20;
const ABUSERS: usize = 40;

/// This process's resident memory.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Samples this process's resident memory until dropped; `peak()` is the most seen.
struct RssWatch {
    peak: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RssWatch {
    fn start() -> Self {
        use std::sync::atomic::Ordering;
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(rss()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssWatch { peak, stop }
    }

    fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A client that writes 64 KiB and reads it back, `rounds` times, checking every byte; returns
/// each request's latency.
async fn well_behaved(sock: &Path, rounds: u64) -> Vec<Duration> {
    let mut s = attach(sock, "disk").await;
    let mut latencies = Vec::new();
    for i in 0..rounds {
        let offset = GOOD + (i % 16) * 65536;
        let data = pattern(i, 65536);
        let t = tokio::time::Instant::now();
        s.write_all(&[request(CMD_WRITE, 0, i, offset, 65536), data.to_vec()].concat())
            .await
            .unwrap();
        expect_simple_reply(&mut s, 0, i).await;
        latencies.push(t.elapsed());
        let t = tokio::time::Instant::now();
        s.write_all(&request(CMD_READ, 0, i, offset, 65536))
            .await
            .unwrap();
        expect_simple_reply(&mut s, 0, i).await;
        let mut got = vec![0u8; 65536];
        s.read_exact(&mut got).await.unwrap();
        latencies.push(t.elapsed());
        assert!(got == data, "round {i}: read back other bytes");
    }
    latencies
}

fn report(what: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{what}: {} requests, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// The server's payload budget, and what the abusers may hold beyond it: buffers, the
/// allocator's slack.
const BUDGET: usize = 256 * MIB;
const SLACK: usize = 64 * MIB;

async fn start_abused() -> Fixture {
    let f = start_with(ServerConfig {
        payload_budget: nbd::server::PayloadBudget::new(BUDGET),
        ..ServerConfig::default()
    })
    .await;
    f.dev
        .write(ABUSED, pattern(99, 64 * MIB), WriteFlags::default())
        .await
        .unwrap();
    f
}

/// Starts a server with data to read, lets `abuse` loose on it, then runs a well-behaved
/// client beside the abusers. Reports the memory and the client's latencies; fails if the
/// server held more than its budget or the process grew past the budget and the slack.
async fn beside_abuse<A, Fut, T>(what: &str, abuse: A) -> (Fixture, T)
where
    A: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let f = start_abused().await;
    let baseline = rss();
    let watch = RssWatch::start();
    let abusers = abuse(f.sock.clone()).await;
    settle().await;

    let latencies = well_behaved(&f.sock, 200).await;

    let grown = watch.peak().saturating_sub(baseline);
    let held = f.server.payload_budget().peak();
    eprintln!(
        "{what}: RSS grew {} MiB, payload held at most {} MiB",
        grown / MIB,
        held / MIB
    );
    report(&format!("well-behaved client beside {what}"), latencies);
    assert!(held <= BUDGET);
    assert!(grown <= BUDGET + SLACK, "RSS grew by {} MiB", grown / MIB);
    (f, abusers)
}

/// Gives the abusers time to take what they can.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_clients_that_never_read_replies_stay_within_the_payload_budget() {
    let _heavy = HEAVY.lock().await;

    let (_f, abusers) = beside_abuse("40 clients that never read", |sock| async move {
        let mut abusers = Vec::new();
        for a in 0..ABUSERS as u64 {
            let mut s = attach(&sock, "disk").await;
            let reads: Vec<u8> = (0..64)
                .flat_map(|i| {
                    let offset = ABUSED + (a + i) % 64 * MIB as u64;
                    request(CMD_READ, 0, i, offset, MIB as u32)
                })
                .collect();
            s.write_all(&reads).await.unwrap();
            abusers.push(s);
        }
        abusers
    })
    .await;

    drop(abusers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_half_sent_large_writes_stay_within_the_payload_budget_and_change_nothing() {
    let _heavy = HEAVY.lock().await;

    let (f, abusers) = beside_abuse("40 half-sent 32 MiB writes", |sock| async move {
        let half = Bytes::from(vec![0xEE; 16 * MIB]);
        let mut abusers = Vec::new();
        for a in 0..ABUSERS as u64 {
            let mut s = attach(&sock, "disk").await;
            let half = half.clone();
            abusers.push(tokio::spawn(async move {
                let header = request(CMD_WRITE, 0, a, 64 * MIB as u64, 32 * MIB as u32);
                // The server may close the connection before it has taken all of it.
                if s.write_all(&header).await.is_ok() {
                    let _ = s.write_all(&half).await;
                }
                s
            }));
        }
        abusers
    })
    .await;

    let target = f.dev.read(64 * MIB as u64, 32 * MIB).await.unwrap();
    assert!(target.iter().all(|&b| b == 0), "a half-sent write landed");
    for a in abusers {
        a.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_sit_on_the_shared_budget_are_closed_when_another_client_needs_it() {
    let _heavy = HEAVY.lock().await;
    let f = start_with(ServerConfig {
        payload_budget: nbd::server::PayloadBudget::new(nbd::server::PayloadBudget::MIN_BYTES),
        stall_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    // Two clients that never read take the whole shared part (48 MiB of the 64), and nobody
    // waits yet.
    let mut abusers = Vec::new();
    for a in 0..2u64 {
        let mut s = attach(&f.sock, "disk").await;
        for i in 0..24 {
            s.write_all(&request(
                CMD_READ,
                0,
                i,
                (a * 32 + i) * MIB as u64 % SIZE,
                MIB as u32,
            ))
            .await
            .unwrap();
        }
        abusers.push(s);
    }
    settle().await;
    assert_eq!(f.server.payload_budget().in_use(), 48 * MIB);
    let mut good = attach(&f.sock, "disk").await;

    // More than its allowance: it must wait for the shared part.
    good.write_all(&request(CMD_READ, 0, 1, GOOD, 4 * MIB as u32))
        .await
        .unwrap();

    expect_simple_reply(&mut good, 0, 1).await;
    let mut got = vec![0u8; 4 * MIB];
    good.read_exact(&mut got).await.unwrap();
    assert!(
        f.server.payload_budget().in_use() <= 24 * MIB,
        "a closed client's budget was not given back"
    );
    // Closing one was enough; the other may stay, as nobody waits any more.
    let mut closed = 0;
    for s in &mut abusers {
        closed += closed_within(s, Duration::from_secs(2)).await as usize;
    }
    assert!(closed >= 1, "no client that sat on the budget was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_client_that_reads_no_replies() {
    let f = start_with(ServerConfig {
        stall_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .await;
    let mut s = attach(&f.sock, "disk").await;
    for i in 0..64 {
        s.write_all(&request(CMD_READ, 0, i, 0, MIB as u32))
            .await
            .unwrap();
    }
    settle().await;

    f.server.shutdown();
    let finished = tokio::time::timeout(Duration::from_secs(5), f.server.finish()).await;

    assert!(
        matches!(finished, Ok(Ok(()))),
        "shutdown waited for the client"
    );
    assert_eq!(f.server.payload_budget().in_use(), 0);
}

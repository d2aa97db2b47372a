//! A flood of idle connections on the control socket must not lock the VM out of its disk: the
//! control socket's accept loop stops at its bound, so the descriptors the NBD export needs stay
//! free however many clients pile up.
//!
//! The flood comes from a child process (this test binary again, running `flood_helper`), so
//! that its own descriptors do not count against the server's.

use std::io::{BufRead, BufReader as StdBufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use blockdev::MemoryDev;
use bytes::{BufMut, BytesMut};
use nbd::addr::SocketAddr;
use nbd::proto::*;
use nbd::server::{Export, ExportSet, Listener, Server, ServerConfig};
use net::Acceptor;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const FLOOD_SOCKET: &str = "COLOBLK_TEST_FLOOD_SOCKET";
const FLOOD_COUNT: &str = "COLOBLK_TEST_FLOOD_COUNT";
/// The server's descriptors: a daemon at the usual soft limit, scaled down with the flood.
const SERVER_FDS: u64 = 256;
const FLOOD: usize = 400;
const CONTROL_BOUND: usize = 64;

/// Not a test on its own: opens `COLOBLK_TEST_FLOOD_COUNT` connections to
/// `COLOBLK_TEST_FLOOD_SOCKET`, says how many connected, and holds them until stdin closes.
#[test]
#[ignore = "the flood for a_flood_of_idle_control_connections_leaves_the_vm_export_reachable"]
fn flood_helper() {
    let Ok(path) = std::env::var(FLOOD_SOCKET) else {
        return;
    };
    let count: usize = std::env::var(FLOOD_COUNT).unwrap().parse().unwrap();
    net::raise_fd_limit().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..count {
            // A full listen queue refuses at once (EAGAIN) rather than blocking.
            let connect = UnixStream::connect(&path);
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(100), connect).await {
                held.push(s);
            }
        }
        held
    });
    println!("connected {}", held.len());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(held);
}

/// Lowers this process's soft limit on open files.
fn limit_fds(soft: u64) {
    let old = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: old.maximum,
        },
    )
    .unwrap();
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Attaches to `export` (simple replies), writes 64 KiB and reads them back.
async fn write_and_read_back(sock: &std::path::Path) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    let mut opt = BytesMut::new();
    opt.put_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    opt.put_u64(IHAVEOPT);
    opt.put_u32(OPT_EXPORT_NAME);
    opt.put_u32(4);
    opt.put_slice(b"disk");
    s.write_all(&opt).await.unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).await.unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    for (kind, cookie) in [(CMD_WRITE, 1u64), (CMD_READ, 2)] {
        let mut req = BytesMut::new();
        Request {
            flags: 0,
            kind,
            cookie,
            offset: 4096,
            length: 65536,
        }
        .encode(&mut req);
        if kind == CMD_WRITE {
            req.put_slice(&data);
        }
        s.write_all(&req).await.unwrap();
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).await.unwrap();
        let mut want = BytesMut::new();
        simple_reply(&mut want, 0, cookie);
        assert_eq!(&reply[..], &want[..]);
    }
    let mut got = vec![0u8; 65536];
    s.read_exact(&mut got).await.unwrap();
    assert!(got == data, "read back other bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_control_connections_leaves_the_vm_export_reachable() {
    limit_fds(SERVER_FDS);
    let dir = tempfile::tempdir().unwrap();
    let nbd_sock = dir.path().join("vm.sock");
    let control_sock = dir.path().join("control.sock");
    let exports = ExportSet::new();
    exports.add(Export::new("disk", Arc::new(MemoryDev::new(1 << 20))));
    let server = Server::new(exports, ServerConfig::default());
    let l = Listener::bind(&SocketAddr::Unix(nbd_sock.clone()))
        .await
        .unwrap();
    tokio::spawn(async move { server.serve(l).await });
    let control = Listener::bind(&SocketAddr::Unix(control_sock.clone()))
        .await
        .unwrap();
    tokio::spawn(async move {
        Acceptor::new("control", CONTROL_BOUND)
            .run(&control, |c| async move {
                // An idle client: it holds its connection and says nothing.
                let mut s = c.stream;
                let _ = s.read(&mut [0u8; 1]).await;
            })
            .await
    });
    let fds_before = open_fds();

    let mut flood = Command::new(std::env::current_exe().unwrap())
        .args([
            "flood_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FLOOD_SOCKET, &control_sock)
        .env(FLOOD_COUNT, FLOOD.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = StdBufReader::new(flood.stdout.take().unwrap());
    let connected = tokio::task::spawn_blocking(move || {
        stdout
            .lines()
            .map_while(Result::ok)
            // libtest prints "test flood_helper ... " before the helper's own line.
            .find_map(|l| {
                l.rsplit_once("connected ")
                    .map(|(_, n)| n.parse::<usize>().unwrap())
            })
    })
    .await
    .unwrap()
    .expect("the flood did not report");
    eprintln!("flood: {connected} of {FLOOD} connections made");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let reached =
        tokio::time::timeout(Duration::from_secs(5), write_and_read_back(&nbd_sock)).await;

    let held = open_fds() - fds_before;
    let _ = flood.kill();
    let _ = flood.wait();
    assert!(reached.is_ok(), "the VM's export did not answer");
    assert!(
        held <= CONTROL_BOUND + 8,
        "the control socket holds {held} descriptors"
    );
}

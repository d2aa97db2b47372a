//! NBD over TLS with mutual x509 authentication, against real peers: our client against
//! qemu-nbd (`--tls-creds`, `--tls-authz`) and nbdkit (`--tls=require`), our server against
//! qemu-io, qemu-img and nbdinfo, and both of ours together. Every refusal (a plain client, a wrong CA,
//! an expired certificate, no client certificate, a name not in the authz list) must give a clear
//! error and write nothing: the exports' bytes are compared exactly afterwards.
//!
//! Certificates are made at test time (testutil::tls) in QEMU's directory layout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, MemoryDev, WriteFlags};
use bytes::Bytes;
use nbd::addr::SocketAddr;
use nbd::client::{ClientConfig, NbdClient};
use nbd::proto::*;
use nbd::server::{Export, ExportSet, Listener, Server, ServerConfig, TlsPolicy};
use net::{Authz, TlsClient, TlsCreds, TlsServer};
use testutil::peer::{Peer, require};
use testutil::tls::{Leaf, TestCa, Validity, dn, write_creds};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DISK: u64 = 1 << 20;

/// A test directory with a CA and a credentials directory `creds/` (server `CN=server`,
/// client `CN=client`).
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
    creds: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("coloblk test CA");
        let creds = ca.creds(&dir.path().join("creds"), "server", "client");
        Pki { dir, ca, creds }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A credentials directory that trusts our CA and presents `client` (or no certificate).
    fn client_dir(&self, name: &str, client: Option<&Leaf>) -> PathBuf {
        write_creds(&self.path(name), &self.ca.cert_pem, None, client)
    }

    fn server_tls(&self, authz: &[&str]) -> Arc<TlsServer> {
        let creds = TlsCreds::load(&self.creds).unwrap();
        let authz = Authz::new(authz.iter().map(|s| s.to_string()).collect());
        Arc::new(TlsServer::new(&creds, authz).unwrap())
    }
}

fn client_config(creds: &Path, authz: &[&str]) -> ClientConfig {
    let creds = TlsCreds::load(creds).unwrap();
    let authz = Authz::new(authz.iter().map(|s| s.to_string()).collect());
    ClientConfig {
        tls: Some(Arc::new(TlsClient::new(&creds, authz).unwrap())),
        handshake_timeout: Some(Duration::from_secs(5)),
        request_timeout: Some(Duration::from_secs(10)),
        ..ClientConfig::default()
    }
}

/// Our server with one export "disk" (1 MiB of pattern 7) on `addr`, with `tls`.
async fn our_server(
    addr: &str,
    tls: TlsPolicy,
    config: ServerConfig,
) -> (Arc<MemoryDev>, SocketAddr, Arc<Server>) {
    serve_disk(addr, tls, config, false).await
}

/// [`our_server`], the export single-writer or not.
async fn serve_disk(
    addr: &str,
    tls: TlsPolicy,
    config: ServerConfig,
    single_writer: bool,
) -> (Arc<MemoryDev>, SocketAddr, Arc<Server>) {
    let dev = Arc::new(MemoryDev::new(DISK));
    dev.write(0, Bytes::from(original()), WriteFlags::default())
        .await
        .unwrap();
    let exports = ExportSet::new();
    let mut export = Export::new("disk", dev.clone());
    export.single_writer = single_writer;
    exports.add(export);
    let server = Server::new(exports, config);
    let listener = Listener::bind(&addr.parse().unwrap()).await.unwrap();
    let bound = listener.local_addr().unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.serve_with(listener, tls).await });
    (dev, bound, server)
}

fn original() -> Vec<u8> {
    testutil::pattern(7, DISK as usize).to_vec()
}

async fn contents(dev: &MemoryDev) -> Vec<u8> {
    dev.read(0, DISK as usize).await.unwrap().to_vec()
}

fn uri(scheme: &str, addr: &SocketAddr, export: &str) -> String {
    match addr {
        SocketAddr::Tcp { host, port } => format!("{scheme}://{host}:{port}/{export}"),
        SocketAddr::Unix(p) => format!("{scheme}+unix:///{export}?socket={}", p.display()),
    }
}

/// Writes 64 KiB of pattern `seed` at 128 KiB and reads it back through `c`.
async fn write_and_read_back(c: &NbdClient, seed: u64) -> Vec<u8> {
    let data = testutil::pattern(seed, 65536);
    c.write(131072, data.clone(), WriteFlags::default())
        .await
        .unwrap();
    c.flush().await.unwrap();
    let back = c.read(131072, 65536).await.unwrap();
    assert_eq!(back, data, "read back over TLS");
    data.to_vec()
}

fn expected_after_write(seed: u64) -> Vec<u8> {
    let mut want = original();
    want[131072..196608].copy_from_slice(&testutil::pattern(seed, 65536));
    want
}

#[tokio::test]
async fn our_client_and_server_over_tcp_check_the_host_name_and_move_exact_bytes() {
    let pki = Pki::new();
    let (dev, addr, server) = our_server(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(&[&dn("client")])),
        ServerConfig::default(),
    )
    .await;

    let c = NbdClient::connect_uri(&uri("nbds", &addr, "disk"), client_config(&pki.creds, &[]))
        .await
        .unwrap();
    write_and_read_back(&c, 11).await;
    c.disconnect().await;

    assert_eq!(contents(&dev).await, expected_after_write(11));
    server.shutdown();
}

#[tokio::test]
async fn our_client_over_unix_checks_the_chain_and_the_servers_name_in_the_authz_list() {
    let pki = Pki::new();
    let sock = pki.path("s.sock");
    let (dev, addr, _server) = our_server(
        &format!("unix:{}", sock.display()),
        TlsPolicy::Required(pki.server_tls(&[])),
        ServerConfig::default(),
    )
    .await;
    let good = client_config(&pki.creds, &[&dn("server")]);
    let wrong = client_config(&pki.creds, &["CN=someone else,O=coloblk test"]);

    let refused = NbdClient::connect_uri(&uri("nbds", &addr, "disk"), wrong)
        .await
        .unwrap_err();
    let c = NbdClient::connect_uri(&uri("nbds", &addr, "disk"), good)
        .await
        .unwrap();
    write_and_read_back(&c, 12).await;

    let text = refused.to_string();
    assert!(
        text.contains("server 'CN=server,O=coloblk test' is not in the TLS authz list"),
        "{text}"
    );
    assert_eq!(contents(&dev).await, expected_after_write(12));
}

/// Our server requiring TLS on a unix socket and our client connected to it, with a 5 s
/// request timeout so that a frame held back anywhere shows as a failed request.
async fn tls_over_unix(pki: &Pki) -> (Arc<MemoryDev>, Arc<NbdClient>, Arc<Server>) {
    let sock = pki.path("tls.sock");
    let (dev, addr, server) = our_server(
        &format!("unix:{}", sock.display()),
        TlsPolicy::Required(pki.server_tls(&[])),
        ServerConfig::default(),
    )
    .await;
    let config = ClientConfig {
        request_timeout: Some(Duration::from_secs(5)),
        ..client_config(&pki.creds, &[])
    };
    let c = NbdClient::connect_uri(&uri("nbds", &addr, "disk"), config)
        .await
        .unwrap();
    (dev, Arc::new(c), server)
}

/// A whole disk of pipelined writes over TLS lands exactly. (Under load TLS holds records the
/// socket would not take; the client's writer flushes every batch, which
/// `client::writer::tests` checks deterministically.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_writes_over_tls_all_complete() {
    let pki = Pki::new();
    let (dev, c, _server) = tls_over_unix(&pki).await;
    let data = testutil::pattern(51, DISK as usize);

    let writes = (0..DISK / 4096).map(|i| {
        let (c, chunk) = (
            c.clone(),
            data.slice(i as usize * 4096..(i as usize + 1) * 4096),
        );
        async move { c.write(i * 4096, chunk, WriteFlags::default()).await }
    });
    let results = futures::future::join_all(writes).await;

    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    assert_eq!(contents(&dev).await, data.to_vec());
}

/// A burst of writes of every size, from 1 byte to several TLS records, followed by a flush and
/// one read of the whole disk (a 1 MiB reply, 64 records): every frame must arrive (a frame held back in a buffer shows as a
/// request timing out) and the bytes must be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_small_and_large_writes_then_a_flush_all_arrive_over_tls() {
    let pki = Pki::new();
    let (dev, c, _server) = tls_over_unix(&pki).await;
    let data = testutil::pattern(61, DISK as usize);
    // Small writes over the first half, sizes cycling through odd ones; two 256 KiB writes
    // (16 records each) over the second half.
    let mut pieces = Vec::new();
    let mut at = 0;
    for size in [1, 27, 511, 4096, 5000, 16384, 16411, 9000].iter().cycle() {
        let end = (at + size).min(DISK as usize / 2);
        pieces.push(at..end);
        at = end;
        if at == DISK as usize / 2 {
            break;
        }
    }
    pieces.push(at..at + (256 << 10));
    pieces.push(at + (256 << 10)..DISK as usize);
    let requests = pieces
        .iter()
        .map(|r| {
            let (c, chunk, offset) = (c.clone(), data.slice(r.clone()), r.start as u64);
            tokio::spawn(async move { c.write(offset, chunk, WriteFlags::default()).await })
        })
        .collect::<Vec<_>>();
    let flush = {
        let c = c.clone();
        tokio::spawn(async move { c.flush().await })
    };

    for (r, t) in pieces.iter().zip(requests) {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("write of {r:?}: {e}"));
    }
    flush.await.unwrap().expect("the flush after the burst");
    let back = c
        .read(0, DISK as usize)
        .await
        .expect("one read of the whole disk");
    assert_eq!(back, data, "read back over TLS");
    assert_eq!(contents(&dev).await, data.to_vec());
}

/// The payload's encryption is most of what TLS costs the replica link, so every link uses TLS
/// 1.3's AES-128-GCM: our client asks for it first, and our server picks it even from a client
/// that lists AES-256 first (rustls's default order; QEMU's and nbdkit's gnutls may too).
#[tokio::test]
async fn tls_links_use_aes_128_gcm_whatever_the_client_lists_first() {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let pki = Pki::new();
    let server = pki.server_tls(&[]);
    let serve = |stream: tokio::io::DuplexStream| {
        let server = server.clone();
        tokio::spawn(async move {
            let (s, _) = server.accept(stream).await.expect("our server's handshake");
            s.cipher_suite()
        })
    };

    let ours = TlsClient::new(&TlsCreds::load(&pki.creds).unwrap(), Authz::default()).unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let accepted = serve(b);
    let (s, _) = ours.connect(None, a).await.expect("our client's handshake");
    let chosen = s.cipher_suite();
    assert_eq!(
        (chosen, accepted.await.unwrap()),
        (TLS13_AES_128_GCM_SHA256, TLS13_AES_128_GCM_SHA256)
    );

    let provider = rustls::crypto::aws_lc_rs::default_provider();
    assert_eq!(
        provider.cipher_suites[0].suite(),
        TLS13_AES_256_GCM_SHA384,
        "the other client must list AES-256 first for this test to mean anything"
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = CertificateDer::pem_file_iter(pki.creds.join("client-cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.creds.join("client-key.pem")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let accepted = serve(b);
    let name = ServerName::try_from("localhost").unwrap();
    let s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, a)
        .await
        .expect("an AES-256-first client's handshake");
    let chosen = s.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(
        (chosen, accepted.await.unwrap()),
        (TLS13_AES_128_GCM_SHA256, TLS13_AES_128_GCM_SHA256)
    );
}

#[tokio::test]
async fn a_host_name_not_in_the_certificate_is_refused() {
    let pki = Pki::new();
    let (dev, addr, _server) = our_server(
        "tcp:127.0.0.2:0",
        TlsPolicy::Required(pki.server_tls(&[])),
        ServerConfig::default(),
    )
    .await;

    let err = NbdClient::connect_uri(&uri("nbds", &addr, "disk"), client_config(&pki.creds, &[]))
        .await
        .unwrap_err();

    let text = err.to_string();
    assert!(
        text.contains("TLS handshake with the server failed"),
        "{text}"
    );
    assert!(text.contains("not valid for name"), "{text}");
    assert_eq!(contents(&dev).await, original());
}

/// Connects with `config` to our TLS-required server and returns the error.
async fn refused_by_our_server(pki: &Pki, config: ClientConfig) -> String {
    let (dev, addr, _server) = our_server(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(&[&dn("client")])),
        ServerConfig::default(),
    )
    .await;
    let result = match NbdClient::connect_uri(&uri("nbds", &addr, "disk"), config).await {
        // TLS 1.3: the client may finish its side before the server refuses its certificate;
        // then the first request fails instead.
        Ok(c) => c
            .write(0, testutil::pattern(1, 4096), WriteFlags::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(contents(&dev).await, original(), "something was written");
    result.expect_err("the server let the client in")
}

/// The error our TLS-required server (authz: `CN=client`) gives a client presenting `leaf`.
async fn refused_leaf(pki: &Pki, name: &str, leaf: Leaf) -> String {
    let dir = pki.client_dir(name, Some(&leaf));
    refused_by_our_server(pki, client_config(&dir, &[])).await
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_and_writes_nothing() {
    let pki = Pki::new();
    let other = TestCa::new("another CA").leaf("client", Validity::Valid);

    let err = refused_leaf(&pki, "other", other).await;

    assert!(err.contains("fatal alert: UnknownCA"), "{err}");
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused_and_writes_nothing() {
    let pki = Pki::new();
    let expired = pki.ca.leaf("client", Validity::Expired);

    let err = refused_leaf(&pki, "expired", expired).await;

    assert!(err.contains("fatal alert: CertificateExpired"), "{err}");
}

#[tokio::test]
async fn a_client_not_in_the_authz_list_is_told_why_and_writes_nothing() {
    let pki = Pki::new();
    let intruder = pki.ca.leaf("intruder", Validity::Valid);

    let err = refused_leaf(&pki, "intruder", intruder).await;

    assert!(
        err.contains(
            "server refused NBD_OPT_GO with NBD_REP_ERR_POLICY: client 'CN=intruder,O=coloblk test' \
             is not in the TLS authz list (CN=client,O=coloblk test)"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_plain_client_gets_tls_reqd_and_writes_nothing() {
    let pki = Pki::new();
    let (dev, addr, _server) = our_server(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(&[])),
        ServerConfig::default(),
    )
    .await;

    let err = NbdClient::connect_uri(&uri("nbd", &addr, "disk"), ClientConfig::default())
        .await
        .unwrap_err();

    let text = err.to_string();
    assert!(text.contains("NBD_REP_ERR_TLS_REQD"), "{text}");
    assert!(text.contains("send NBD_OPT_STARTTLS first"), "{text}");
    assert_eq!(contents(&dev).await, original());
}

#[tokio::test]
async fn tls_allowed_serves_plain_and_tls_clients() {
    let pki = Pki::new();
    let sock = pki.path("a.sock");
    let (dev, addr, _server) = our_server(
        &format!("unix:{}", sock.display()),
        TlsPolicy::Allowed(pki.server_tls(&[])),
        ServerConfig::default(),
    )
    .await;

    let plain = NbdClient::connect_uri(&uri("nbd", &addr, "disk"), ClientConfig::default())
        .await
        .unwrap();
    let tls = NbdClient::connect_uri(&uri("nbds", &addr, "disk"), client_config(&pki.creds, &[]))
        .await
        .unwrap();
    let a = plain.read(0, 4096).await.unwrap();
    write_and_read_back(&tls, 13).await;

    assert_eq!(&a[..], &original()[..4096]);
    assert_eq!(contents(&dev).await, expected_after_write(13));
}

#[tokio::test]
async fn a_single_writer_export_refuses_a_second_primary_and_takes_the_same_one_back() {
    let pki = Pki::new();
    let (a, b) = (dn("primary-a"), dn("primary-b"));
    let (dev, addr, _server) = serve_disk(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(&[&a, &b])),
        ServerConfig::default(),
        true,
    )
    .await;
    let dir_a = pki.client_dir("a", Some(&pki.ca.leaf("primary-a", Validity::Valid)));
    let dir_b = pki.client_dir("b", Some(&pki.ca.leaf("primary-b", Validity::Valid)));
    let target = uri("nbds", &addr, "disk");
    let first = NbdClient::connect_uri(&target, client_config(&dir_a, &[]))
        .await
        .unwrap();
    write_and_read_back(&first, 41).await;

    let second = NbdClient::connect_uri(&target, client_config(&dir_b, &[]))
        .await
        .unwrap_err()
        .to_string();
    // The same primary again while its old connection is still open (it died unseen).
    let again = NbdClient::connect_uri(&target, client_config(&dir_a, &[]))
        .await
        .unwrap();
    write_and_read_back(&again, 42).await;
    let old = first
        .write(0, testutil::pattern(43, 4096), WriteFlags::default())
        .await;

    assert!(
        second.contains(
            "server refused NBD_OPT_GO with NBD_REP_ERR_POLICY: export 'disk' takes one writer \
             (one primary) and 'CN=primary-a,O=coloblk test' at 127.0.0.1:"
        ),
        "{second}"
    );
    assert!(old.is_err(), "the replaced connection still wrote");
    assert_eq!(contents(&dev).await, expected_after_write(42));
    again.disconnect().await;
    drop(first);
    let b_later = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match NbdClient::connect_uri(&target, client_config(&dir_b, &[])).await {
                Ok(c) => return c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("primary-b never got the export after primary-a left");
    assert!(b_later.is_alive());
}

/// Sends the client flags and NBD_OPT_STARTTLS on a raw connection; returns the stream after
/// the server's reply, which must be an ACK.
async fn raw_starttls(addr: &SocketAddr) -> nbd::addr::Stream {
    let mut s = addr.connect().await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).await.unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[12..16], &REP_ACK.to_be_bytes(), "STARTTLS not acked");
    s
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_dropped_at_the_handshake_timeout() {
    let pki = Pki::new();
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let (_dev, addr, _server) = our_server(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(&[])),
        config,
    )
    .await;
    let mut s = raw_starttls(&addr).await;

    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;

    assert!(matches!(closed, Ok(Ok(0))), "not closed: {closed:?}");
}

#[tokio::test]
async fn clear_bytes_sent_after_starttls_before_the_tls_handshake_end_the_connection() {
    let pki = Pki::new();
    let (_dev, addr, _server) = our_server(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(&[])),
        ServerConfig::default(),
    )
    .await;
    let mut s = addr.connect().await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    // Flags, STARTTLS and an injected NBD_OPT_GO in one write, before the server's ACK.
    let mut out = Vec::new();
    out.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    for option in [OPT_STARTTLS, OPT_LIST] {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
    }
    s.write_all(&out).await.unwrap();

    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;

    assert!(matches!(read, Ok(Ok(_))), "not closed: {read:?}");
    assert_eq!(rest.len(), 20, "only the STARTTLS ACK: {rest:?}");
}

// ---------------------------------------------------------------------------------------------
// Our client against qemu-nbd and nbdkit
// ---------------------------------------------------------------------------------------------

/// A raw file of 1 MiB of pattern 7.
fn image(pki: &Pki) -> PathBuf {
    let path = pki.path("disk.raw");
    std::fs::write(&path, original()).unwrap();
    path
}

/// qemu-nbd with TLS required on a unix socket, `authz` (an identity) given to --tls-authz.
async fn qemu_nbd_tls(pki: &Pki, file: &Path, authz: Option<&str>) -> (Peer, PathBuf) {
    require(&["qemu-nbd"]);
    let sock = pki.path("q.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--object").arg(format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        pki.creds.display()
    ));
    if let Some(identity) = authz {
        // QemuOpts: a comma inside a value is written twice.
        cmd.arg("--object").arg(format!(
            "authz-simple,id=auth0,identity={}",
            identity.replace(',', ",,")
        ));
        cmd.args(["--tls-authz", "auth0"]);
    }
    cmd.args([
        "--tls-creds",
        "tls0",
        "-f",
        "raw",
        "--persistent",
        "-x",
        "disk",
        "-k",
    ])
    .arg(&sock)
    .arg(file);
    let mut peer = Peer::spawn(pki.dir.path(), "qemu-nbd", &mut cmd);
    peer.wait_unix(&sock).await;
    (peer, sock)
}

#[tokio::test]
async fn our_client_writes_to_qemu_nbd_over_tls_with_our_dn_in_its_authz() {
    let pki = Pki::new();
    let file = image(&pki);
    let (_qemu, sock) = qemu_nbd_tls(&pki, &file, Some(&dn("client"))).await;
    let addr = SocketAddr::Unix(sock);

    let c = NbdClient::connect_uri(&uri("nbds", &addr, "disk"), client_config(&pki.creds, &[]))
        .await
        .unwrap();
    write_and_read_back(&c, 21).await;
    c.disconnect().await;

    assert_eq!(std::fs::read(&file).unwrap(), expected_after_write(21));
}

#[tokio::test]
async fn qemu_nbd_refuses_our_client_when_its_authz_names_another_dn() {
    let pki = Pki::new();
    let file = image(&pki);
    let (_qemu, sock) = qemu_nbd_tls(&pki, &file, Some("CN=primary,O=Elsewhere")).await;
    let addr = SocketAddr::Unix(sock);

    let err = NbdClient::connect_uri(&uri("nbds", &addr, "disk"), client_config(&pki.creds, &[]))
        .await
        .unwrap_err();

    assert!(err.to_string().contains("NBD export 'disk'"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), original());
}

#[tokio::test]
async fn our_plain_client_gets_tls_reqd_from_qemu_nbd() {
    let pki = Pki::new();
    let file = image(&pki);
    let (_qemu, sock) = qemu_nbd_tls(&pki, &file, None).await;
    let addr = SocketAddr::Unix(sock);

    let err = NbdClient::connect_uri(&uri("nbd", &addr, "disk"), ClientConfig::default())
        .await
        .unwrap_err();

    assert!(err.to_string().contains("NBD_REP_ERR_TLS_REQD"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), original());
}

#[tokio::test]
async fn our_client_writes_to_nbdkit_with_tls_required() {
    require(&["nbdkit"]);
    let pki = Pki::new();
    let sock = pki.path("k.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args([
        "-f",
        "--exit-with-parent",
        "--tls=require",
        "--tls-verify-peer",
    ])
    .arg(format!("--tls-certificates={}", pki.creds.display()))
    .arg("-U")
    .arg(&sock)
    .args(["memory", "64M"]);
    let mut kit = Peer::spawn(pki.dir.path(), "nbdkit", &mut cmd);
    kit.wait_unix(&sock).await;
    let addr = SocketAddr::Unix(sock);

    let c = NbdClient::connect_uri(&uri("nbds", &addr, ""), client_config(&pki.creds, &[]))
        .await
        .unwrap();
    let data = write_and_read_back(&c, 31).await;
    c.disconnect().await;
    let again = NbdClient::connect_uri(&uri("nbds", &addr, ""), client_config(&pki.creds, &[]))
        .await
        .unwrap();

    assert_eq!(again.len(), 64 << 20);
    assert_eq!(again.read(131072, 65536).await.unwrap(), data);
}

// ---------------------------------------------------------------------------------------------
// Our server against qemu-io, qemu-img and nbdinfo
// ---------------------------------------------------------------------------------------------

/// qemu-io with TLS credentials `creds` (endpoint client) against our server at `addr`
/// running `command`; returns (success, stdout + stderr).
fn qemu_io(creds: &Path, addr: &SocketAddr, command: &str) -> (bool, String) {
    require(&["qemu-io"]);
    let SocketAddr::Tcp { host, port } = addr else {
        panic!("tcp only")
    };
    let out = Command::new("qemu-io")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export=disk,tls-creds=tls0"
        ))
        .args(["-c", command])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("failed"), text)
}

/// qemu-io with credentials `creds` writes 64 KiB of 0x5a at 128 KiB to our TLS-required
/// server with `authz`; returns whether it succeeded, its output and the export's bytes after.
async fn qemu_io_write(pki: &Pki, authz: &[&str], creds: PathBuf) -> (bool, String, Vec<u8>) {
    let (dev, addr, _server) = our_server(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(authz)),
        ServerConfig::default(),
    )
    .await;
    let (ok, out) =
        tokio::task::spawn_blocking(move || qemu_io(&creds, &addr, "write -P 0x5a 131072 65536"))
            .await
            .unwrap();
    (ok, out, contents(&dev).await)
}

#[tokio::test]
async fn qemu_io_writes_through_our_tls_server_when_its_dn_is_allowed() {
    let pki = Pki::new();

    let (ok, out, bytes) = qemu_io_write(&pki, &[&dn("client")], pki.creds.clone()).await;

    assert!(ok, "{out}");
    let mut want = original();
    want[131072..196608].fill(0x5a);
    assert_eq!(bytes, want);
}

#[tokio::test]
async fn qemu_io_is_refused_by_our_server_when_its_dn_is_not_allowed() {
    let pki = Pki::new();

    let (ok, out, bytes) = qemu_io_write(&pki, &[&dn("primary")], pki.creds.clone()).await;

    assert!(!ok, "{out}");
    assert!(
        out.contains("NBD_REP_ERR_POLICY") || out.contains("not in the TLS authz list"),
        "{out}"
    );
    assert_eq!(bytes, original());
}

#[tokio::test]
async fn qemu_io_without_a_client_certificate_is_refused() {
    let pki = Pki::new();

    let (ok, out, bytes) = qemu_io_write(&pki, &[], pki.client_dir("nocert", None)).await;

    assert!(!ok, "{out}");
    assert_eq!(bytes, original());
}

/// qemu-img, QEMU's other client, copies a whole image into our TLS-required server
/// (`convert -n` to `--target-image-opts` with the credentials object); the export then holds
/// exactly the image's bytes. Without a client certificate it is refused and nothing changes.
#[tokio::test]
async fn qemu_img_converts_an_image_into_our_tls_server() {
    require(&["qemu-img"]);
    let pki = Pki::new();
    let src = pki.path("src.raw");
    let data = testutil::pattern(41, DISK as usize);
    std::fs::write(&src, &data).unwrap();
    let (dev, addr, _server) = our_server(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(&[&dn("client")])),
        ServerConfig::default(),
    )
    .await;
    let SocketAddr::Tcp { host, port } = addr else {
        unreachable!()
    };
    let convert = move |creds: PathBuf| {
        let out = Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw"])
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            ))
            .arg(&src)
            .arg("--target-image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host={host},server.port={port},\
                 export=disk,tls-creds=tls0"
            ))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let nocert = pki.client_dir("nocert", None);
    let conv = convert.clone();
    let (ok, err) = tokio::task::spawn_blocking(move || conv(nocert))
        .await
        .unwrap();
    assert!(!ok, "qemu-img without a client certificate got in");
    assert_eq!(
        contents(&dev).await,
        original(),
        "refused, yet written: {err}"
    );

    let creds = pki.creds.clone();
    let (ok, err) = tokio::task::spawn_blocking(move || convert(creds))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(contents(&dev).await, data.to_vec());
}

#[tokio::test]
async fn nbdinfo_reads_our_tls_server_with_an_nbds_uri() {
    require(&["nbdinfo"]);
    let pki = Pki::new();
    let (_dev, addr, _server) = our_server(
        "tcp:127.0.0.1:0",
        TlsPolicy::Required(pki.server_tls(&[&dn("client")])),
        ServerConfig::default(),
    )
    .await;
    let SocketAddr::Tcp { port, .. } = addr else {
        unreachable!()
    };
    let target = format!(
        "nbds://localhost:{port}/disk?tls-certificates={}",
        pki.creds.display()
    );

    let out = tokio::task::spawn_blocking(move || {
        Command::new("nbdinfo")
            .args(["--size", &target])
            .output()
            .unwrap()
    })
    .await
    .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        DISK.to_string()
    );
}

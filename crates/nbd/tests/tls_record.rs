//! Our TLS 1.3 record layer (net::tls::TlsStream) against rustls's own stream, the reference
//! for the same protocol: bytes of every size both ways, key updates from either end (ours
//! forced every few records, rustls's on request), rustls's session tickets, close_notify, a
//! connection cut without it, and a record altered on the wire.

use std::sync::Arc;
use std::time::Duration;

use net::{Authz, TlsClient, TlsCreds, TlsServer, TlsStream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testutil::tls::TestCa;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

struct Pki {
    _dir: tempfile::TempDir,
    creds: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let creds = TestCa::new("record CA").creds(&dir.path().join("creds"), "server", "client");
        Pki { _dir: dir, creds }
    }

    fn ours(&self) -> (TlsServer, TlsClient) {
        let creds = TlsCreds::load(&self.creds).unwrap();
        (
            TlsServer::new(&creds, Authz::default()).unwrap(),
            TlsClient::new(&creds, Authz::default()).unwrap(),
        )
    }

    fn chain(&self, role: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let chain = CertificateDer::pem_file_iter(self.creds.join(format!("{role}-cert.pem")))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(self.creds.join(format!("{role}-key.pem"))).unwrap();
        (chain, key)
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.creds.join("ca-cert.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        Arc::new(roots)
    }

    /// rustls's server, with its defaults (it sends session tickets after the handshake).
    fn rustls_server(&self) -> tokio_rustls::TlsAcceptor {
        let verifier = rustls::server::WebPkiClientVerifier::builder(self.roots())
            .build()
            .unwrap();
        let (chain, key) = self.chain("server");
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    fn rustls_client(&self) -> tokio_rustls::TlsConnector {
        let (chain, key) = self.chain("client");
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// Bytes no two positions of which repeat within 251, so a lost or moved byte shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// The sizes that cross record boundaries: empty, one byte, one record, one record plus one,
/// and a megabyte plus change (64 records and a partial one).
const SIZES: [usize; 6] = [0, 1, 16383, 16384, 16385, (1 << 20) + 7];

/// Writes every size (plain writes, then the same as a vectored header + body) and reads back
/// what the peer echoes, reading while writing so that neither side's buffer fills.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let (mut r, mut w) = tokio::io::split(s);
    for (i, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, i as u8);
        let write = async {
            w.write_all(&data).await.unwrap();
            w.flush().await.unwrap();
            if len > 4 {
                let (head, body) = data.split_at(4);
                let mut sent = 0;
                while sent < len {
                    let n = if sent < 4 {
                        let parts = [
                            std::io::IoSlice::new(&head[sent..]),
                            std::io::IoSlice::new(body),
                        ];
                        w.write_vectored(&parts).await.unwrap()
                    } else {
                        w.write_vectored(&[std::io::IoSlice::new(&body[sent - 4..])])
                            .await
                            .unwrap()
                    };
                    sent += n;
                }
                w.flush().await.unwrap();
            }
        };
        let read = async {
            let rounds = if len > 4 { 2 } else { 1 };
            for round in 0..rounds {
                let mut back = vec![0; len];
                r.read_exact(&mut back).await.unwrap();
                assert!(
                    back == data,
                    "{len} bytes (round {round}) came back changed"
                );
            }
        };
        tokio::join!(write, read);
    }
}

/// Echoes everything until the peer closes.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0; 100_000];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                s.write_all(&buf[..n]).await.unwrap();
                s.flush().await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn our_client_and_rustls_server_exchange_every_size_with_tickets_and_key_updates() {
    let pki = Pki::new();
    let (_, ours) = pki.ours();
    let (a, b) = tokio::io::duplex(1 << 16);
    let acceptor = pki.rustls_server();
    let server = tokio::spawn(async move { echo(acceptor.accept(b).await.unwrap()).await });
    let (mut s, _) = ours.connect(None, a).await.unwrap();
    // A KeyUpdate of ours every 5 records: rustls would fail to open the next record if ours
    // were wrong.
    s.set_key_update_after(5);
    exchange(&mut s).await;
    s.shutdown().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn rustls_client_and_our_server_exchange_every_size_and_a_key_update_it_asks_for() {
    let pki = Pki::new();
    let (ours, _) = pki.ours();
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let (s, dn) = ours.accept(b).await.unwrap();
        assert_eq!(dn, testutil::tls::dn("client"));
        echo(s).await
    });
    let mut c = pki.rustls_client().connect(localhost(), a).await.unwrap();
    exchange(&mut c).await;
    // rustls asks us to update ours too (update_requested): our next record must be under the
    // new key, announced by our KeyUpdate, or rustls cannot open it.
    for round in 0..3u8 {
        c.get_mut().1.refresh_traffic_keys().unwrap();
        let data = pattern(40_000, round);
        c.write_all(&data).await.unwrap();
        c.flush().await.unwrap();
        let mut back = vec![0; data.len()];
        c.read_exact(&mut back).await.unwrap();
        assert!(back == data, "round {round} came back changed");
    }
    c.shutdown().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn close_notify_ends_the_stream_and_a_bare_close_is_an_error() {
    let pki = Pki::new();
    let (ours, _) = pki.ours();
    let ours = Arc::new(ours);

    // rustls sends 10 bytes and close_notify: we read the 10 bytes, then a clean end.
    let (a, b) = tokio::io::duplex(1 << 16);
    let o = ours.clone();
    let server = tokio::spawn(async move { o.accept(b).await.unwrap().0 });
    let mut c = pki.rustls_client().connect(localhost(), a).await.unwrap();
    let mut s: TlsStream<DuplexStream> = server.await.unwrap();
    c.write_all(b"0123456789").await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"0123456789");
    // And our shutdown sends close_notify: rustls reads a clean end.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());

    // The socket closes without close_notify: a truncation, not an end.
    let (a, b) = tokio::io::duplex(1 << 16);
    let o = ours.clone();
    let server = tokio::spawn(async move { o.accept(b).await.unwrap().0 });
    let c = pki.rustls_client().connect(localhost(), a).await.unwrap();
    let mut s = server.await.unwrap();
    drop(c);
    let e = s.read(&mut [0; 16]).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(
        e.to_string(),
        "the TLS peer closed the connection without close_notify"
    );
}

#[tokio::test]
async fn a_record_altered_on_the_wire_fails_authentication() {
    let pki = Pki::new();
    let (_, ours) = pki.ours();
    // client <-> (a, b) for the handshake; then the server's bytes pass a relay that alters one.
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let acceptor = pki.rustls_server();
    let server = tokio::spawn(async move {
        let mut s = acceptor.accept(server_end).await.unwrap();
        // Read the client's "go" so that the relay is armed before we write.
        let mut go = [0; 2];
        s.read_exact(&mut go).await.unwrap();
        s.write_all(&pattern(5000, 1)).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    // Interpose: our client talks to `mine`; the relay copies client_end's bytes to it.
    let (mine, relay_end) = tokio::io::duplex(1 << 16);
    let (relay_r, relay_w) = tokio::io::split(relay_end);
    let (up_r, up_w) = tokio::io::split(client_end);
    let armed = Arc::new(tokio::sync::Notify::new());
    // Client -> server: a plain copy.
    tokio::spawn(async move {
        let (mut r, mut w) = (relay_r, up_w);
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    // Server -> client: plain during the handshake, one bit flipped after.
    let arm = armed.clone();
    tokio::spawn(async move {
        let (mut r, mut w) = (up_r, relay_w);
        let mut buf = vec![0; 1 << 16];
        let mut tampering = false;
        let mut done = false;
        loop {
            tokio::select! {
                _ = arm.notified(), if !tampering => { tampering = true; continue; }
                n = r.read(&mut buf) => {
                    let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                    if tampering && !done {
                        buf[n / 2] ^= 0x10;
                        done = true;
                    }
                    if w.write_all(&buf[..n]).await.is_err() { return; }
                }
            }
        }
    });
    let (mut s, _) = ours.connect(None, mine).await.unwrap();
    // rustls's session tickets may still be on their way: let them pass unaltered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    armed.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"go").await.unwrap();
    s.flush().await.unwrap();
    let mut got = vec![0; 5000];
    let e = s.read_exact(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(
        e.to_string(),
        "a TLS record failed authentication (bad_record_mac)"
    );
    server.abort();
}

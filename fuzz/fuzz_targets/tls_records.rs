//! Our TLS record layer (net::TlsStream) reading whatever a peer that holds the keys sends:
//! records of any inner content type (application data, alerts, post-handshake handshake
//! messages such as KeyUpdate and NewSessionTicket, unknown types), with padding, mixed with raw
//! bytes outside any record (bad headers, lengths, truncations). The keys come from a real
//! handshake of our client and our server over an in-memory stream (credentials made once).
//!
//! Input: a sequence of items, each `mode, a, len_hi, len_lo, bytes[len]` (at most 16 KiB used):
//!   mode & 3 == 0: a sealed record of inner type `a` with `bytes` and `mode >> 2` zeroes of padding;
//!   mode & 3 == 1: `bytes` written to the socket as they are;
//!   otherwise:     a sealed application-data record carrying `bytes`.
//!
//! Asserts: no panic; the reader ends (error or end of stream) within 10 s of the input ending;
//! and what it read is a prefix of the application data sealed in order (nothing invented, no
//! byte moved), all of it when every item was a well-formed application-data record.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// Only the runtime helper is used here.
#[allow(dead_code)]
#[path = "common/duplex.rs"]
mod duplex;

fn creds() -> net::TlsCreds {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("coloblk-fuzz-records-{}", std::process::id()));
        testutil::tls::TestCa::new("fuzz CA").creds(&dir, "server", "client")
    });
    net::TlsCreds::load(dir).expect("test credentials")
}

fuzz_target!(|data: &[u8]| {
    let creds = creds();
    let server = net::TlsServer::new(&creds, net::Authz::default()).unwrap();
    let client = net::TlsClient::new(&creds, net::Authz::default()).unwrap();
    duplex::run(async move {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (peer, ours) = tokio::join!(server.accept(b), client.connect(None, a));
        let (mut peer, _) = peer.expect("handshake");
        let (mut ours, _) = ours.expect("handshake");

        let mut sent = Vec::new();
        let mut clean = true;
        let mut rest = data;
        while let [mode, a, hi, lo, tail @ ..] = rest {
            let len = (u16::from_be_bytes([*hi, *lo]) as usize).min(tail.len());
            let (bytes, next) = tail.split_at(len);
            rest = next;
            let bytes = &bytes[..bytes.len().min(1 << 14)];
            match mode & 3 {
                0 => {
                    // Inner type 0 cannot be sent: the zeroes would read as padding.
                    let typ = (*a).max(1);
                    if typ == 23 {
                        sent.extend_from_slice(bytes);
                    } else {
                        clean = false;
                    }
                    peer.queue_raw_record(typ, bytes, (mode >> 2) as usize).unwrap();
                }
                1 => {
                    peer.queue_raw_bytes(bytes);
                    clean = false;
                }
                _ => {
                    sent.extend_from_slice(bytes);
                    peer.queue_raw_record(23, bytes, 0).unwrap();
                }
            }
        }
        let writer = async move {
            let _ = peer.flush().await;
            let _ = peer.shutdown().await;
            drop(peer);
        };
        let reader = async move {
            let mut got = Vec::new();
            let mut buf = vec![0; 40_000];
            let end = loop {
                match ours.read(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => break Err(e),
                }
            };
            (got, end)
        };
        let ((), (got, end)) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(writer, reader)
        })
        .await
        .expect("the record layer hung after the peer's input ended");
        assert!(
            sent.starts_with(&got),
            "read bytes the peer never sealed as application data"
        );
        if clean {
            assert_eq!(got, sent, "a well-formed stream lost data");
            assert!(end.is_ok(), "a well-formed stream ended with {end:?}");
        }
    });
});

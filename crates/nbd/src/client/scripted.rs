//! A client connected to a scripted server for the unit tests: the test plays the server's
//! side of the connection with `testutil::scripted`.

use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, Result};
use bytes::Bytes;
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;

pub(super) use testutil::scripted::{
    ALL_FLAGS, META_ID, Offer, read_request, send_chunk, send_data, send_simple,
};

use super::{ClientConfig, NbdClient};

pub(super) fn config() -> ClientConfig {
    ClientConfig {
        request_timeout: Some(Duration::from_secs(5)),
        ..ClientConfig::default()
    }
}

/// A client connected to a scripted server; the test plays the server on the stream.
pub(super) async fn pair(offer: Offer, config: ClientConfig) -> (Arc<NbdClient>, DuplexStream) {
    let (c, mut s) = tokio::io::duplex(4 << 20);
    let server = tokio::spawn(async move {
        offer.serve_handshake(&mut s).await;
        s
    });
    let client = NbdClient::from_stream(c, "disk", config).await.unwrap();
    (Arc::new(client), server.await.unwrap())
}

/// A client of a server that advertises transmission flags `flags` and nothing else special.
pub(super) async fn pair_with_flags(flags: u16) -> (Arc<NbdClient>, DuplexStream) {
    let offer = Offer {
        flags,
        ..Offer::default()
    };
    pair(offer, config()).await
}

/// A client of a server that advertises block sizes 512 (minimum), 4096 and 65536 (maximum).
pub(super) async fn pair_with_block_sizes() -> (Arc<NbdClient>, DuplexStream) {
    let offer = Offer {
        block_size: Some((512, 4096, 65536)),
        ..Offer::default()
    };
    pair(offer, config()).await
}

pub(super) fn spawn_read(c: &Arc<NbdClient>, offset: u64, len: usize) -> JoinHandle<Result<Bytes>> {
    let c = c.clone();
    tokio::spawn(async move { c.read(offset, len).await })
}

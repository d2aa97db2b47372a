//! Plays a client's bytes into a server session over an in-memory stream and collects what the
//! server sent (`#[path]`-included by the session targets).

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Feeds `input` (then end of stream) to the session `serve` runs on the server's end, which
/// must end within 10 s of the input running out; returns the server's output.
pub async fn session<F, Fut>(input: &[u8], what: &str, serve: F) -> Vec<u8>
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()>,
{
    let (client, server_end) = tokio::io::duplex(1 << 16);
    let (mut rd, mut wr) = tokio::io::split(client);
    let drain = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    });
    let input = input.to_vec();
    let feed = tokio::spawn(async move {
        // One write: the duplex buffer holds it all, so the server reads it in one go.
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    });
    tokio::time::timeout(Duration::from_secs(10), serve(server_end))
        .await
        .unwrap_or_else(|_| panic!("{what} hung after the client's input ended"));
    feed.await.unwrap();
    drain.await.unwrap()
}

/// Runs `f` on a fresh current-thread runtime (one per input: nothing carries over).
pub fn run<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

//! A whole server session (handshake and transmission) driven by arbitrary client bytes over an
//! in-memory stream: the server must neither panic nor hang, and must end the session once the
//! client's bytes run out.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use blockdev::MemoryDev;
use libfuzzer_sys::fuzz_target;
use nbd::server::{Export, ExportSet, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let exports = ExportSet::new();
        exports.add(Export::new("disk", Arc::new(MemoryDev::new(1 << 20))));
        let server = Server::new(exports, ServerConfig::default());
        let (client, server_end) = tokio::io::duplex(1 << 16);
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let input = data.to_vec();
        let feed = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        tokio::time::timeout(Duration::from_secs(10), server.serve_stream(server_end))
            .await
            .expect("server session hung after the client's input ended");
        let _ = feed.await;
        let _ = drain.await;
    });
});

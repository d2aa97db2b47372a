//! A scripted server for the unit tests: the test plays the server's side of a connection.

use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, Result};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::{ClientConfig, NbdClient};
use crate::proto::*;

/// What the scripted server advertises.
#[derive(Clone, Copy)]
pub(super) struct Offer {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) block_size: Option<(u32, u32, u32)>,
    pub(super) go_unsupported: bool,
}

pub(super) const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_FAST_ZERO
    | FLAG_SEND_CACHE;

pub(super) const META_ID: u32 = 7;

impl Default for Offer {
    fn default() -> Self {
        Offer {
            size: 1 << 20,
            flags: ALL_FLAGS,
            block_size: None,
            go_unsupported: false,
        }
    }
}

pub(super) async fn read_option(s: &mut DuplexStream) -> (u32, Bytes) {
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let option = s.read_u32().await.unwrap();
    let mut data = vec![0; s.read_u32().await.unwrap() as usize];
    s.read_exact(&mut data).await.unwrap();
    (option, data.into())
}

pub(super) async fn reply(s: &mut DuplexStream, option: u32, kind: u32, data: &[u8]) {
    let mut out = BytesMut::new();
    option_reply(&mut out, option, kind, data);
    s.write_all(&out).await.unwrap();
}

/// The server's half of a fixed-newstyle handshake.
pub(super) async fn serve_handshake(s: &mut DuplexStream, offer: Offer) {
    let mut hello = BytesMut::new();
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello).await.unwrap();
    assert_eq!(
        s.read_u32().await.unwrap(),
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
    loop {
        let (option, _) = read_option(s).await;
        match option {
            OPT_STRUCTURED_REPLY => reply(s, option, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                let mut ctx = BytesMut::new();
                ctx.put_u32(META_ID);
                ctx.put_slice(BASE_ALLOCATION.as_bytes());
                reply(s, option, REP_META_CONTEXT, &ctx).await;
                reply(s, option, REP_ACK, &[]).await;
            }
            OPT_GO if offer.go_unsupported => reply(s, option, REP_ERR_UNSUP, &[]).await,
            OPT_GO => {
                let mut export = BytesMut::new();
                export.put_u16(INFO_EXPORT);
                export.put_u64(offer.size);
                export.put_u16(offer.flags);
                reply(s, option, REP_INFO, &export).await;
                if let Some((min, pref, max)) = offer.block_size {
                    let mut bs = BytesMut::new();
                    bs.put_u16(INFO_BLOCK_SIZE);
                    bs.put_u32(min);
                    bs.put_u32(pref);
                    bs.put_u32(max);
                    reply(s, option, REP_INFO, &bs).await;
                }
                reply(s, option, REP_ACK, &[]).await;
                return;
            }
            OPT_EXPORT_NAME => {
                s.write_u64(offer.size).await.unwrap();
                s.write_u16(offer.flags).await.unwrap();
                return;
            }
            o => panic!("unexpected option {o}"),
        }
    }
}

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
        serve_handshake(&mut s, offer).await;
        s
    });
    let client = NbdClient::from_stream(c, "disk", config).await.unwrap();
    (Arc::new(client), server.await.unwrap())
}

pub(super) async fn read_request(s: &mut DuplexStream) -> (Request, Bytes) {
    let mut header = [0; REQUEST_LEN];
    s.read_exact(&mut header).await.unwrap();
    let req = Request::parse(&header).unwrap();
    let mut payload = vec![
        0;
        if req.has_payload() {
            req.length as usize
        } else {
            0
        }
    ];
    s.read_exact(&mut payload).await.unwrap();
    (req, payload.into())
}

pub(super) async fn send_chunk(
    s: &mut DuplexStream,
    flags: u16,
    kind: u16,
    cookie: u64,
    body: &[u8],
) {
    let mut out = BytesMut::new();
    chunk_header(&mut out, flags, kind, cookie, body.len() as u32);
    out.put_slice(body);
    s.write_all(&out).await.unwrap();
}

pub(super) async fn send_data(
    s: &mut DuplexStream,
    cookie: u64,
    offset: u64,
    data: &[u8],
    done: bool,
) {
    let mut body = BytesMut::new();
    body.put_u64(offset);
    body.put_slice(data);
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    send_chunk(s, flags, REPLY_TYPE_OFFSET_DATA, cookie, &body).await;
}

pub(super) async fn send_simple(s: &mut DuplexStream, error: u32, cookie: u64) {
    let mut out = BytesMut::new();
    simple_reply(&mut out, error, cookie);
    s.write_all(&out).await.unwrap();
}

pub(super) fn spawn_read(c: &Arc<NbdClient>, offset: u64, len: usize) -> JoinHandle<Result<Bytes>> {
    let c = c.clone();
    tokio::spawn(async move { c.read(offset, len).await })
}

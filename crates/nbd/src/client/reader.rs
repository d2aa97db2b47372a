//! The reader task: parses simple replies and structured chunks, fills a read's buffer in place
//! and completes each request at its last reply. Anything the server gets wrong kills the
//! connection.

use std::fmt;
use std::io;
use std::sync::Arc;

use blockdev::{Extent, ExtentList};
use bytes::Buf;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::handshake::text;
use super::inflight::{Failure, Pending, ServerError, Shared};
use crate::proto::*;

/// Largest block-status chunk (2 M extents): more is a broken or hostile server.
const MAX_STATUS_CHUNK: u32 = 16 << 20;
/// Largest error chunk: errno, message length, message, offset.
const MAX_ERROR_CHUNK: u32 = 4 + 2 + MAX_STRING + 8;

/// Why the reader gave up on the connection.
#[derive(Debug)]
pub(super) enum ConnError {
    Io(io::Error),
    Protocol(String),
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("the server closed the connection")
            }
            ConnError::Io(e) => write!(f, "receiving from the server failed: {e}"),
            ConnError::Protocol(m) => write!(f, "protocol violation by the server: {m}"),
        }
    }
}

fn violation<T>(msg: impl Into<String>) -> std::result::Result<T, ConnError> {
    Err(ConnError::Protocol(msg.into()))
}

/// What the reader needs to know about the negotiated session.
#[derive(Debug, Clone, Copy)]
pub(super) struct Session {
    pub(super) structured: bool,
    pub(super) meta_id: Option<u32>,
}

/// The reader task: parses replies and completes their requests.
pub(super) struct ReplyReader<R> {
    pub(super) r: R,
    pub(super) shared: Arc<Shared>,
    pub(super) session: Session,
    /// The request whose reply is being read (out of the map meanwhile).
    pub(super) current: Option<Pending>,
}

impl<R: AsyncRead + Unpin> ReplyReader<R> {
    pub(super) async fn run(mut self) {
        let err = loop {
            if let Err(e) = self.next_reply().await {
                break e;
            }
        };
        self.shared.kill(err.to_string());
        if let Some(p) = self.current.take() {
            p.fail(Failure::Dead(
                self.shared.dead_reason().unwrap_or_else(|| err.to_string()),
            ));
        }
    }

    async fn next_reply(&mut self) -> std::result::Result<(), ConnError> {
        match self.r.read_u32().await? {
            SIMPLE_REPLY_MAGIC => self.simple_reply().await,
            STRUCTURED_REPLY_MAGIC if self.session.structured => self.chunk().await,
            STRUCTURED_REPLY_MAGIC => violation("structured reply although none were negotiated"),
            m => violation(format!("bad reply magic {m:#010x}")),
        }
    }

    async fn simple_reply(&mut self) -> std::result::Result<(), ConnError> {
        let error = self.r.read_u32().await?;
        let cookie = self.r.read_u64().await?;
        let p = self.current.insert(self.shared.take(cookie)?);
        if p.chunked {
            return violation(format!(
                "simple reply to cookie {cookie:#x} after structured chunks"
            ));
        }
        if error != 0 {
            p.error = Some(ServerError {
                errno: error,
                message: None,
                offset: None,
            });
        } else if p.cmd.kind == CMD_READ {
            self.r.read_exact(&mut p.data).await?;
            p.filled = u64::from(p.cmd.len);
        } else if p.cmd.kind == CMD_BLOCK_STATUS {
            return violation("simple reply to a block-status request");
        }
        self.finish()
    }

    async fn chunk(&mut self) -> std::result::Result<(), ConnError> {
        let flags = self.r.read_u16().await?;
        let kind = self.r.read_u16().await?;
        let cookie = self.r.read_u64().await?;
        let len = self.r.read_u32().await?;
        let done = flags & REPLY_FLAG_DONE != 0;
        let p = self.current.insert(self.shared.take(cookie)?);
        p.chunked = true;
        match kind {
            REPLY_TYPE_NONE if len == 0 && done => {}
            REPLY_TYPE_NONE => {
                return violation("NBD_REPLY_TYPE_NONE with a payload or without DONE");
            }
            REPLY_TYPE_OFFSET_DATA => data_chunk(&mut self.r, p, len).await?,
            REPLY_TYPE_OFFSET_HOLE => hole_chunk(&mut self.r, p, len).await?,
            REPLY_TYPE_BLOCK_STATUS => {
                status_chunk(&mut self.r, p, len, self.session.meta_id).await?
            }
            k if k & (1 << 15) != 0 => error_chunk(&mut self.r, p, k, len).await?,
            k => return violation(format!("unknown reply chunk type {k}")),
        }
        if done {
            return self.finish();
        }
        if let Some(p) = self.current.take() {
            self.shared.put_back(cookie, p);
        }
        Ok(())
    }

    /// Completes the current request (it stays current if its reply is incomplete).
    fn finish(&mut self) -> std::result::Result<(), ConnError> {
        if let Some(p) = &self.current {
            p.validate()?;
        }
        if let Some(p) = self.current.take() {
            p.complete();
        }
        Ok(())
    }
}

async fn data_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    len: u32,
) -> std::result::Result<(), ConnError> {
    if p.cmd.kind != CMD_READ {
        return violation("data chunk for a request that is not a read");
    }
    if len <= 8 {
        return violation(format!("data chunk of {len} bytes carries no data"));
    }
    let offset = r.read_u64().await?;
    let n = len - 8;
    let start = p.locate(offset, n)?;
    p.cover(start, n)?;
    r.read_exact(&mut p.data[start..start + n as usize]).await?;
    Ok(())
}

async fn hole_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    len: u32,
) -> std::result::Result<(), ConnError> {
    if p.cmd.kind != CMD_READ || len != 12 {
        return violation(format!(
            "hole chunk of {len} bytes, or for a request that is not a read"
        ));
    }
    let offset = r.read_u64().await?;
    let n = r.read_u32().await?;
    if n == 0 {
        return violation("empty hole chunk");
    }
    let start = p.locate(offset, n)?;
    p.cover(start, n)?;
    p.data[start..start + n as usize].fill(0);
    Ok(())
}

async fn status_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    len: u32,
    meta_id: Option<u32>,
) -> std::result::Result<(), ConnError> {
    if p.cmd.kind != CMD_BLOCK_STATUS || p.extents.is_some() {
        return violation("block-status chunk not asked for, or a second one");
    }
    if len < 12 || (len - 4) & 7 != 0 || len > MAX_STATUS_CHUNK {
        return violation(format!("block-status chunk of {len} bytes"));
    }
    let id = r.read_u32().await?;
    if Some(id) != meta_id {
        return violation(format!(
            "block status for metadata context {id}, never negotiated"
        ));
    }
    let mut body = vec![0; len as usize - 4];
    r.read_exact(&mut body).await?;
    p.extents = Some(parse_extents(&body, u64::from(p.cmd.len)));
    Ok(())
}

/// Parses `base:allocation` descriptors, cut to the `limit` bytes asked for.
fn parse_extents(mut body: &[u8], limit: u64) -> ExtentList {
    let mut list = ExtentList::new();
    let mut left = limit;
    while body.remaining() >= 8 && left > 0 {
        let len = u64::from(body.get_u32()).min(left);
        let flags = body.get_u32();
        list.push(Extent {
            len,
            hole: flags & STATE_HOLE != 0,
            zero: flags & STATE_ZERO != 0,
        });
        left -= len;
    }
    list
}

async fn error_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    kind: u16,
    len: u32,
) -> std::result::Result<(), ConnError> {
    if !(6..=MAX_ERROR_CHUNK).contains(&len) {
        return violation(format!("error chunk of {len} bytes"));
    }
    let mut body = vec![0; len as usize];
    r.read_exact(&mut body).await?;
    let e = parse_error(&body, kind)?;
    p.error.get_or_insert(e);
    Ok(())
}

fn parse_error(mut body: &[u8], kind: u16) -> std::result::Result<ServerError, ConnError> {
    let errno = body.get_u32();
    let msg_len = body.get_u16() as usize;
    if errno == 0 || msg_len > body.len() {
        return violation(format!(
            "error chunk with errno {errno} and a {msg_len}-byte message"
        ));
    }
    let message = (msg_len > 0).then(|| text(&body[..msg_len]));
    body.advance(msg_len);
    let offset = match kind {
        REPLY_TYPE_ERROR_OFFSET if body.len() == 8 => Some(body.get_u64()),
        REPLY_TYPE_ERROR_OFFSET => return violation("error-offset chunk without its offset"),
        _ => None,
    };
    Ok(ServerError {
        errno,
        message,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::super::scripted::*;
    use super::*;
    use blockdev::{BlockDev, ErrorKind, Op, WriteFlags};
    use bytes::{BufMut, Bytes, BytesMut};
    use std::time::Duration;
    use testutil::Rng;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn replies_out_of_order_reach_their_requests() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        let first = spawn_read(&c, 0, 4);
        let (r1, _) = read_request(&mut s).await;
        let second = spawn_read(&c, 100, 4);
        let (r2, _) = read_request(&mut s).await;
        send_data(&mut s, r2.cookie, 100, b"BBBB", true).await;
        send_data(&mut s, r1.cookie, 0, b"AAAA", true).await;
        assert_eq!(&second.await.unwrap().unwrap()[..], b"BBBB");
        assert_eq!(&first.await.unwrap().unwrap()[..], b"AAAA");
    }

    #[tokio::test]
    async fn read_assembles_data_and_hole_chunks() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        let read = spawn_read(&c, 1000, 12);
        let (r, _) = read_request(&mut s).await;
        send_data(&mut s, r.cookie, 1008, b"tail", false).await;
        let mut hole = BytesMut::new();
        hole.put_u64(1002);
        hole.put_u32(6);
        send_chunk(&mut s, 0, REPLY_TYPE_OFFSET_HOLE, r.cookie, &hole).await;
        send_data(&mut s, r.cookie, 1000, b"hd", false).await;
        send_chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie, &[]).await;
        assert_eq!(&read.await.unwrap().unwrap()[..], b"hd\0\0\0\0\0\0tail");
    }

    #[tokio::test]
    async fn error_chunk_maps_errno_and_keeps_the_connection() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        let c2 = c.clone();
        let write = tokio::spawn(async move {
            c2.write(4096, Bytes::from_static(b"x"), WriteFlags::default())
                .await
        });
        let (r, payload) = read_request(&mut s).await;
        assert_eq!((r.kind, &payload[..]), (CMD_WRITE, &b"x"[..]));
        let mut body = BytesMut::new();
        body.put_u32(ENOSPC);
        body.put_u16(4);
        body.put_slice(b"full");
        body.put_u64(4096);
        send_chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR_OFFSET,
            r.cookie,
            &body,
        )
        .await;
        let err = write.await.unwrap().unwrap_err();
        assert_eq!(
            (err.kind, err.op, err.offset),
            (ErrorKind::NoSpace, Op::Write, 4096)
        );
        assert!(err.to_string().contains("ENOSPC: full"), "{err}");
        assert!(c.is_alive());
    }

    /// Sends `garbage` in answer to a read and checks that the connection dies cleanly.
    async fn assert_garbage_kills(garbage: impl FnOnce(u64) -> BytesMut, why: &str) {
        let (c, mut s) = pair(Offer::default(), config()).await;
        let read = spawn_read(&c, 0, 16);
        let other = spawn_read(&c, 16, 16);
        let (r, _) = read_request(&mut s).await;
        read_request(&mut s).await;
        s.write_all(&garbage(r.cookie)).await.unwrap();
        for task in [read, other] {
            let err = task.await.unwrap().unwrap_err();
            assert_eq!(err.kind, ErrorKind::Shutdown, "{err}");
            assert!(err.to_string().contains(why), "{err}");
        }
        assert!(!c.is_alive());
        let err = c.read(0, 1).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Shutdown);
    }

    #[tokio::test]
    async fn bad_reply_magic_kills_the_connection() {
        assert_garbage_kills(
            |_| BytesMut::from(&[0xde, 0xad, 0xbe, 0xef, 0, 0][..]),
            "bad reply magic",
        )
        .await;
    }

    #[tokio::test]
    async fn unknown_cookie_kills_the_connection() {
        let garbage = |cookie: u64| {
            let mut b = BytesMut::new();
            simple_reply(&mut b, 0, cookie + 1000);
            b
        };
        assert_garbage_kills(garbage, "unknown cookie").await;
    }

    #[tokio::test]
    async fn oversized_data_chunk_kills_the_connection() {
        let garbage = |cookie| {
            let mut b = BytesMut::new();
            chunk_header(
                &mut b,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                u32::MAX,
            );
            b.put_u64(0);
            b
        };
        assert_garbage_kills(garbage, "outside the request").await;
    }

    #[tokio::test]
    async fn chunk_offset_near_the_end_of_u64_kills_the_connection() {
        let garbage = |cookie| {
            let mut b = BytesMut::new();
            chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            b.put_u64(u64::MAX - 1);
            b.put_u32(u32::MAX);
            b
        };
        assert_garbage_kills(garbage, "outside the request").await;
    }

    #[tokio::test]
    async fn short_read_reply_kills_the_connection() {
        let garbage = |cookie| {
            let mut b = BytesMut::new();
            chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 12);
            b.put_u64(0);
            b.put_slice(b"abcd");
            b
        };
        assert_garbage_kills(garbage, "covers 4 of 16 bytes").await;
    }

    #[tokio::test]
    async fn server_hanging_up_fails_pending_requests() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        let read = spawn_read(&c, 0, 16);
        read_request(&mut s).await;
        drop(s);
        let err = read.await.unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Shutdown);
        assert!(
            err.to_string().contains("server closed the connection"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn block_status_parses_and_clips_extents() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        let c2 = c.clone();
        let status = tokio::spawn(async move { c2.block_status(4096, 12288).await });
        let (r, _) = read_request(&mut s).await;
        assert_eq!(
            (r.kind, r.offset, r.length),
            (CMD_BLOCK_STATUS, 4096, 12288)
        );
        let mut body = BytesMut::new();
        body.put_u32(META_ID);
        for (len, flags) in [
            (4096, 0),
            (4096, STATE_HOLE | STATE_ZERO),
            (65536, STATE_ZERO),
        ] {
            body.put_u32(len);
            body.put_u32(flags);
        }
        send_chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.cookie,
            &body,
        )
        .await;
        let extents = status.await.unwrap().unwrap();
        assert_eq!(
            extents.0,
            vec![Extent::data(4096), Extent::hole(4096), Extent::zero(4096)]
        );
    }

    /// A reply frame that is plausible enough to reach the deeper parsing paths.
    fn random_frame(rng: &mut Rng, cookies: &[u64]) -> BytesMut {
        let mut b = BytesMut::new();
        let cookie = match rng.below(4) {
            0 => rng.next(),
            _ => cookies[rng.below(cookies.len() as u64) as usize],
        };
        if rng.below(3) == 0 {
            simple_reply(&mut b, [0, EIO, 0][rng.below(3) as usize], cookie);
            return b;
        }
        let kinds = [0, 1, 2, 5, 0x8001, 0x8002, 0x8003, 77];
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let len = [0, 4, 8, 12, 14, 20, 28, u32::MAX][rng.below(8) as usize];
        chunk_header(&mut b, rng.below(2) as u16, kind, cookie, len);
        for _ in 0..len.min(32) {
            b.put_u8(if rng.below(2) == 0 {
                0
            } else {
                rng.next() as u8
            });
        }
        b
    }

    #[tokio::test]
    async fn random_reply_garbage_never_panics_or_hangs() {
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
        for _ in 0..300 {
            let (c, mut s) = pair(Offer::default(), config()).await;
            let mut tasks = vec![spawn_read(&c, 0, 16), spawn_read(&c, 16, 16)];
            let c2 = c.clone();
            let status =
                tokio::spawn(async move { c2.block_status(0, 4096).await.map(|_| Bytes::new()) });
            tasks.push(status);
            let mut cookies = Vec::new();
            for _ in 0..3 {
                cookies.push(read_request(&mut s).await.0.cookie);
            }
            for _ in 0..1 + rng.below(4) {
                let _ = s.write_all(&random_frame(&mut rng, &cookies)).await;
            }
            drop(s);
            for t in tasks {
                let done = tokio::time::timeout(Duration::from_secs(2), t).await;
                let _ = done.expect("request hung").expect("request task panicked");
            }
            assert!(
                c.closed_reason().is_some(),
                "the reader must have closed the connection"
            );
        }
    }
}

//! Command execution: one request against the export, and its reply framed as the session
//! negotiated (simple or structured).

use blockdev::{BlockError, ErrorKind, ExtentList, WriteFlags, ZeroFlags};
use bytes::{BufMut, Bytes, BytesMut};

use super::Session;
use crate::proto::*;

/// Command flags valid for each command.
fn allowed_flags(kind: u16) -> u16 {
    match kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// Outcome of a command before it is framed.
pub(super) enum Outcome {
    Done,
    Data(Bytes),
    Extents(ExtentList),
    Error(u32, String),
}

fn block_error(e: BlockError) -> Outcome {
    let errno = match e.kind {
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfRange => EINVAL,
        k => wire_errno(k.errno()),
    };
    Outcome::Error(errno, e.to_string())
}

/// Runs one request against the export and frames its reply.
pub(super) async fn execute(s: &Session, req: Request, payload: Bytes) -> (Bytes, Option<Bytes>) {
    let outcome = run_command(s, &req, payload).await;
    frame(s, &req, outcome)
}

async fn run_command(s: &Session, req: &Request, payload: Bytes) -> Outcome {
    let dev = &s.export.dev;
    let size = dev.len();
    let len = req.length as u64;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    if req.flags & !allowed_flags(req.kind) != 0 {
        return Outcome::Error(
            EINVAL,
            format!("flags {:#x} not valid for command {}", req.flags, req.kind),
        );
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.export.is_read_only() {
        return Outcome::Error(EPERM, "export is read-only".into());
    }
    let known = matches!(
        req.kind,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if !known {
        return Outcome::Error(EINVAL, format!("unknown command {}", req.kind));
    }
    if req.kind != CMD_FLUSH && req.offset.checked_add(len).is_none_or(|end| end > size) {
        let errno = if writes { ENOSPC } else { EINVAL };
        return Outcome::Error(
            errno,
            format!(
                "request {}+{} beyond the export size {size}",
                req.offset, len
            ),
        );
    }
    let result = match req.kind {
        CMD_READ => {
            if req.length > MAX_PAYLOAD {
                return Outcome::Error(
                    EINVAL,
                    format!("read of {} bytes exceeds the limit", req.length),
                );
            }
            return dev
                .read(req.offset, req.length as usize)
                .await
                .map_or_else(block_error, Outcome::Data);
        }
        CMD_WRITE => dev.write(req.offset, payload, WriteFlags { fua }).await,
        CMD_FLUSH => dev.flush().await,
        CMD_TRIM => match dev.discard(req.offset, len).await {
            Ok(()) if fua => dev.flush().await,
            r => r,
        },
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                fua,
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            dev.write_zeroes(req.offset, len, flags).await
        }
        // Nothing to prefetch into: our devices cache in the kernel or in memory already.
        CMD_CACHE => Ok(()),
        CMD_BLOCK_STATUS => {
            if !s.base_allocation {
                return Outcome::Error(EINVAL, "no metadata context was negotiated".into());
            }
            if len == 0 {
                return Outcome::Error(EINVAL, "block status of zero bytes".into());
            }
            return match dev.block_status(req.offset, len).await {
                Ok(mut list) => {
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        list.0.truncate(1);
                    }
                    Outcome::Extents(list)
                }
                Err(e) => block_error(e),
            };
        }
        _ => unreachable!("checked above"),
    };
    result.map_or_else(block_error, |()| Outcome::Done)
}

pub(super) fn frame(s: &Session, req: &Request, outcome: Outcome) -> (Bytes, Option<Bytes>) {
    let mut h = BytesMut::with_capacity(64);
    if !s.structured {
        match outcome {
            Outcome::Data(d) => {
                simple_reply(&mut h, 0, req.cookie);
                return (h.freeze(), Some(d));
            }
            Outcome::Error(e, _) => simple_reply(&mut h, e, req.cookie),
            Outcome::Done | Outcome::Extents(_) => simple_reply(&mut h, 0, req.cookie),
        }
        return (h.freeze(), None);
    }
    match outcome {
        Outcome::Done => chunk_header(&mut h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0),
        Outcome::Data(d) => {
            chunk_header(
                &mut h,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + d.len() as u32,
            );
            h.put_u64(req.offset);
            return (h.freeze(), Some(d));
        }
        Outcome::Extents(list) => {
            chunk_header(
                &mut h,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                4 + 8 * list.0.len() as u32,
            );
            h.put_u32(BASE_ALLOCATION_ID);
            for e in list.iter() {
                h.put_u32(e.len.min(u32::MAX as u64) as u32);
                h.put_u32(
                    if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 },
                );
            }
        }
        Outcome::Error(errno, msg) => {
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            chunk_header(
                &mut h,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                6 + msg.len() as u32,
            );
            h.put_u32(errno);
            h.put_u16(msg.len() as u16);
            h.put_slice(msg);
        }
    }
    (h.freeze(), None)
}

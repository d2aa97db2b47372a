//! The NBD client (`nbd::client::NbdClient`, `crates/nbd/src/client/`) facing an arbitrary
//! server over an in-memory stream.
//!
//! Input: byte 0 is the control byte, the rest is what the "server" sends.
//!  * bits 0-1, the mode: 0 = raw (the rest is the server's whole side, greeting included);
//!    1, 2, 3 = a valid fixed-newstyle handshake first (greeting with NO_ZEROES; STRUCTURED_REPLY
//!    acknowledged in modes 1 and 2, refused in mode 3; in mode 1 SET_META_CONTEXT selects
//!    `base:allocation` as context id 7, in mode 2 it is refused; GO "disk" answers
//!    NBD_INFO_EXPORT for a 1 MiB export, maybe NBD_INFO_BLOCK_SIZE, and ACK), then the rest as
//!    transmission-phase replies, sent once the client has sent its requests and gone quiet;
//!  * bit 2: the server shuts its side down after the rest (otherwise it keeps the connection
//!    open and the client's request timeout fires);
//!  * bits 3-7 (handshake modes only): bit 3 advertises block sizes 512/512/512 (so the
//!    1 KiB read is split in two requests), bit 4 makes the export read-only, bit 5 withholds
//!    WRITE_ZEROES (the client writes zero buffers instead), bit 6 withholds FUA (the client
//!    flushes after the write), bit 7 withholds FLUSH, TRIM and CACHE.
//!
//! The client (request timeout and handshake timeout 200 ms, on tokio's paused clock so that
//! timeouts cost no real time) issues, concurrently and in this order, so that with every
//! feature on its cookies are 1..=10: read(0, 512); read(1024, 1024) (cookies 2 and 3 when
//! split); write(512, 512 bytes of 0xa5, FUA); block_status(0, 65536);
//! block_status_with(65536, 4096, REQ_ONE); flush; write_zeroes(2048, 512, no unmap);
//! discard(4096, 512); cache(0, 512); write_batch of (8192, 512) and (12288, 1024) bytes of
//! 0xa5 (cookies 11 and 12; with bit 3 the second is split and goes its own way); then
//! disconnect(). (Small, so that replies carrying data fit in libFuzzer's default 4 KiB
//! inputs.)
//!
//! Asserts:
//!  * no panic; the handshake, the calls together and disconnect() each return within 10 s
//!    (of the paused clock, so a hang is reported at once), and the client lets go of the
//!    connection within 10 s after that;
//!  * the batch answers every one of its writes; a successful read has exactly the requested
//!    length; a successful block status describes
//!    1..=len bytes in non-empty extents (exactly one extent with REQ_ONE);
//!  * what the client sends is well-formed and honours what the server advertised: the
//!    handshake options expected (exactly those in the handshake modes); then request headers
//!    with the request magic, a known command, only the flags that command allows and the server
//!    advertised, a length within the maximum payload (reads, writes, cache) or 1 GiB, a range
//!    within the export, unique cookies, no write-class command to a read-only export, no
//!    block status without a context, write payloads with the caller's bytes, nothing after
//!    NBD_CMD_DISC (a truncated last frame is allowed: the writer can be cut off);
//!  * in the handshake modes the replies are also parsed here (a reference reader): a successful
//!    read's replies are exactly one simple reply with its data, or structured chunks (data and
//!    holes only, ending with DONE) inside the request that cover every byte exactly once, and
//!    the read returns the bytes they carry; a successful non-REQ_ONE block status returns the
//!    extents of its one BLOCK_STATUS chunk (cut to the length asked for).
//!
//! The findings F5 and F6 (README.md, "Findings") are fixed and checked strictly;
//! `regressions/nbd_client_replies/*` replays them. `NBD_CLIENT_DUMP=1` prints what the client
//! did.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use blockdev::{BatchWrite, BlockDev, Extent, ExtentList, Result, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use nbd::client::{ClientConfig, ExportInfo, NbdClient};
use nbd::proto::*;
use testutil::scripted::{ALL_FLAGS, META_ID, Offer};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const EXPORT: &str = "disk";
const DISK_SIZE: u64 = 1 << 20;
/// Everything must be over within this (paused-clock) time.
const BOUND: Duration = Duration::from_secs(10);
/// The server sends the transmission-phase bytes once the client has been silent this long.
const QUIET: Duration = Duration::from_millis(1);
/// Largest trim, write-zeroes or block-status request (`SPAN_LIMIT`, nbd/src/client/split.rs).
const SPAN_LIMIT: u64 = 1 << 30;

const MODE: u8 = 0b11;
const HANG_UP: u8 = 1 << 2;
const BLOCK_SIZES: u8 = 1 << 3;
const READ_ONLY: u8 = 1 << 4;
const NO_WRITE_ZEROES: u8 = 1 << 5;
const NO_FUA: u8 = 1 << 6;
const NO_FLUSH_TRIM_CACHE: u8 = 1 << 7;

/// The calls, as ranges (offset, length).
const READS: [(u64, usize); 2] = [(0, 512), (1024, 1024)];
const WRITE: (u64, usize) = (512, 512);
const WRITE_BYTE: u8 = 0xa5;
/// (offset, length, REQ_ONE)
const STATUS: [(u64, u64, bool); 2] = [(0, 65536, false), (65536, 4096, true)];
const ZERO: (u64, u64) = (2048, 512);
const DISCARD: (u64, u64) = (4096, 512);
const CACHE: (u64, u64) = (0, 512);
const BATCH: [(u64, usize); 2] = [(8192, 512), (12288, 1024)];

#[path = "common/cur.rs"]
mod cur;
use cur::Cur;

/// What the handshake prefix (modes 1-3) negotiates: the scripted server's offer for `ctl`.
fn offer_for(ctl: u8) -> Offer {
    let mode = ctl & MODE;
    let mut flags = ALL_FLAGS;
    if ctl & READ_ONLY != 0 {
        flags |= FLAG_READ_ONLY;
    }
    if ctl & NO_WRITE_ZEROES != 0 {
        flags &= !(FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO);
    }
    if ctl & NO_FUA != 0 {
        flags &= !FLAG_SEND_FUA;
    }
    if ctl & NO_FLUSH_TRIM_CACHE != 0 {
        flags &= !(FLAG_SEND_FLUSH | FLAG_SEND_TRIM | FLAG_SEND_CACHE);
    }
    Offer {
        size: DISK_SIZE,
        flags,
        block_size: (ctl & BLOCK_SIZES != 0).then_some((512, 512, 512)),
        structured: mode != 3,
        meta_context: (mode == 1).then_some(META_ID),
        go_unsupported: false,
    }
}

/// The scripted server: sends `prefix` (then waits for the client to go quiet) and `rest`,
/// drains the client's bytes until the client lets go of the connection, returns them.
async fn serve(s: DuplexStream, prefix: Option<Vec<u8>>, rest: Vec<u8>, hang_up: bool) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let mut out = Vec::new();
    if let Some(prefix) = prefix {
        let _ = wr.write_all(&prefix).await;
        let mut buf = vec![0; 1 << 16];
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout(QUIET, rd.read(&mut buf)).await {
            out.extend_from_slice(&buf[..n]);
        }
    }
    let _ = wr.write_all(&rest).await;
    if hang_up {
        let _ = wr.shutdown().await;
    }
    let _ = rd.read_to_end(&mut out).await;
    out
}

/// What the calls returned.
struct Outcome {
    info: ExportInfo,
    reads: Vec<Result<Bytes>>,
    status: Vec<Result<ExtentList>>,
}

fn config() -> ClientConfig {
    ClientConfig {
        request_timeout: Some(Duration::from_millis(200)),
        handshake_timeout: Some(Duration::from_millis(200)),
        ..ClientConfig::default()
    }
}

/// `NBD_CLIENT_DUMP=1` prints what the client did (for writing seeds).
fn dump() -> bool {
    std::env::var_os("NBD_CLIENT_DUMP").is_some()
}

/// Connects over `c`, runs the calls, disconnects; `None` when the handshake fails.
async fn drive(c: DuplexStream) -> Option<Outcome> {
    let client = tokio::time::timeout(BOUND, NbdClient::from_stream(c, EXPORT, config()))
        .await
        .unwrap_or_else(|_| panic!("the handshake hung (no result within {BOUND:?})"))
        .ok()?;
    let info = client.export_info().clone();
    let c = &client;
    let zero_flags = ZeroFlags {
        fua: false,
        may_unmap: false,
        fast_only: false,
    };
    let calls = async {
        tokio::join!(
            biased;
            c.read(READS[0].0, READS[0].1),
            c.read(READS[1].0, READS[1].1),
            c.write(
                WRITE.0,
                Bytes::from(vec![WRITE_BYTE; WRITE.1]),
                WriteFlags { fua: true }
            ),
            c.block_status(STATUS[0].0, STATUS[0].1),
            c.block_status_with(STATUS[1].0, STATUS[1].1, STATUS[1].2),
            c.flush(),
            c.write_zeroes(ZERO.0, ZERO.1, zero_flags),
            c.discard(DISCARD.0, DISCARD.1),
            c.cache(CACHE.0, CACHE.1),
            c.write_batch(
                BATCH
                    .iter()
                    .map(|&(offset, len)| BatchWrite {
                        offset,
                        data: Bytes::from(vec![WRITE_BYTE; len]),
                        flags: WriteFlags::default(),
                    })
                    .collect()
            ),
        )
    };
    let (r0, r1, w, s0, s1, f, z, d, ch, b) = tokio::time::timeout(BOUND, calls)
        .await
        .unwrap_or_else(|_| panic!("a client call hung (no result within {BOUND:?})"));
    let alive = client.is_alive();
    if dump() {
        let short = |r: &Result<()>| format!("{:?}", r.as_ref().map_err(|e| e.to_string()));
        eprintln!("info {info:?}");
        for r in [&r0, &r1] {
            let r = r.as_ref().map(|b| b.len()).map_err(|e| e.to_string());
            eprintln!("read: {r:?}");
        }
        eprintln!("write {}", short(&w));
        for s in [&s0, &s1] {
            eprintln!("status: {:?}", s.as_ref().map_err(|e| e.to_string()));
        }
        eprintln!("flush {}", short(&f));
        eprintln!("zeroes {}", short(&z));
        eprintln!("discard {}", short(&d));
        eprintln!("cache {}", short(&ch));
        b.iter().for_each(|r| eprintln!("batch write {}", short(r)));
        eprintln!("closed: {:?}", client.closed_reason());
    }
    let some_failed = r0.is_err()
        || r1.is_err()
        || s0.is_err()
        || s1.is_err()
        || [&w, &f, &z, &d, &ch].iter().any(|r| r.is_err())
        || b.iter().any(|r| r.is_err());
    assert_eq!(
        b.len(),
        BATCH.len(),
        "the batch answered {} writes",
        b.len()
    );
    if tokio::time::timeout(BOUND, client.disconnect())
        .await
        .is_err()
    {
        // F6 (README.md, fixed): a split call that failed early used to leave parts pending.
        panic!(
            "disconnect() hung (not done within {BOUND:?}; connection alive after the calls: \
             {alive}, a call failed: {some_failed})"
        );
    }
    Some(Outcome {
        info,
        reads: vec![r0, r1],
        status: vec![s0, s1],
    })
}

/// A request the client sent.
#[derive(Debug, Clone, Copy)]
struct Sent {
    kind: u16,
    offset: u64,
    len: u32,
}

fn within(offset: u64, len: u64, range: (u64, u64)) -> bool {
    offset >= range.0 && offset + len <= range.0 + range.1
}

/// Checks the client's bytes; returns its requests by cookie (NBD_CMD_DISC left out).
fn check_client_output(out: &[u8], info: &ExportInfo, offer: Option<Offer>) -> HashMap<u64, Sent> {
    let mut o = Cur(out);
    let client_flags = o.u32().expect("client flags");
    assert_eq!(
        client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES),
        0,
        "unknown client flags"
    );
    let mut options = Vec::new();
    while o.peek_u64() == Some(IHAVEOPT) {
        o.u64();
        let opt = o.u32().expect("option number");
        let len = o.u32().expect("option length");
        let data = o.take(len as usize).expect("option data");
        options.push((opt, data));
    }
    let opts: Vec<u32> = options.iter().map(|&(opt, _)| opt).collect();
    let mut go = BytesMut::new();
    InfoRequest {
        name: EXPORT.into(),
        infos: vec![INFO_BLOCK_SIZE],
    }
    .encode(&mut go);
    let mut meta = BytesMut::new();
    MetaContextRequest {
        name: EXPORT.into(),
        queries: vec![BASE_ALLOCATION.into()],
    }
    .encode(&mut meta);
    match offer {
        Some(offer) => {
            assert_eq!(client_flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            let mut want: Vec<(u32, &[u8])> = vec![(OPT_STRUCTURED_REPLY, &[])];
            if offer.structured {
                want.push((OPT_SET_META_CONTEXT, &meta));
            }
            want.push((OPT_GO, &go));
            assert_eq!(options, want, "handshake options");
            assert_eq!(info.size, DISK_SIZE);
            assert_eq!(info.flags, offer.flags);
            assert_eq!(info.structured_replies, offer.structured);
            assert_eq!(info.base_allocation, offer.meta_context);
        }
        None => {
            // Each at most once, in this order, ending with GO or EXPORT_NAME.
            let order = [
                OPT_STRUCTURED_REPLY,
                OPT_SET_META_CONTEXT,
                OPT_GO,
                OPT_EXPORT_NAME,
            ];
            let mut at = 0;
            for &opt in &opts {
                let i = order[at..]
                    .iter()
                    .position(|&x| x == opt)
                    .unwrap_or_else(|| panic!("handshake options out of order: {opts:?}"));
                at += i + 1;
            }
            assert!(
                matches!(opts.last(), Some(&(OPT_GO | OPT_EXPORT_NAME))),
                "handshake options {opts:?}"
            );
            assert_eq!(
                opts.contains(&OPT_SET_META_CONTEXT),
                info.structured_replies,
                "SET_META_CONTEXT is asked for exactly when structured replies were acknowledged"
            );
            for (opt, data) in &options {
                match *opt {
                    OPT_STRUCTURED_REPLY => assert!(data.is_empty()),
                    OPT_SET_META_CONTEXT => assert_eq!(*data, &meta[..]),
                    OPT_GO => assert_eq!(*data, &go[..]),
                    _ => assert_eq!(*data, EXPORT.as_bytes()),
                }
            }
        }
    }

    let mut sent = HashMap::new();
    let mut cookies = HashSet::new();
    let max_payload = u64::from(info.max_payload());
    while o.0.len() >= REQUEST_LEN {
        let req = Request::parse(o.take(REQUEST_LEN).unwrap())
            .unwrap_or_else(|e| panic!("client sent a bad request header: {e}"));
        assert!(
            cookies.insert(req.cookie),
            "cookie {} used twice: {req:?}",
            req.cookie
        );
        let (off, len, flags) = (req.offset, u64::from(req.length), req.flags);
        let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        assert!(
            !(writes && info.read_only()),
            "write to a read-only export: {req:?}"
        );
        if req.kind != CMD_DISC {
            assert!(
                off.checked_add(len).is_some_and(|end| end <= info.size),
                "request past the end of the {}-byte export: {req:?}",
                info.size
            );
        }
        let fua_ok = info.can_fua() || flags & CMD_FLAG_FUA == 0;
        match req.kind {
            CMD_READ | CMD_CACHE => {
                assert!(req.kind == CMD_READ || info.can_cache(), "{req:?}");
                assert_eq!(flags, 0, "{req:?}");
                assert!((1..=max_payload).contains(&len), "{req:?}");
            }
            CMD_WRITE => {
                assert_eq!(flags & !CMD_FLAG_FUA, 0, "{req:?}");
                assert!(fua_ok, "{req:?}");
                assert!((1..=max_payload).contains(&len), "{req:?}");
                let Some(payload) = o.take(len as usize) else {
                    break; // cut off mid-frame
                };
                let caller_wrote = std::iter::once(WRITE)
                    .chain(BATCH)
                    .any(|(o, l)| within(off, len, (o, l as u64)));
                if caller_wrote {
                    assert!(payload.iter().all(|&b| b == WRITE_BYTE), "{req:?}");
                } else if within(off, len, ZERO) {
                    assert!(payload.iter().all(|&b| b == 0), "{req:?}");
                } else {
                    panic!("write outside the ranges written: {req:?}");
                }
            }
            CMD_FLUSH => {
                assert!(info.can_flush(), "{req:?}");
                assert_eq!((flags, off, len), (0, 0, 0), "{req:?}");
            }
            CMD_TRIM => {
                assert!(info.can_trim(), "{req:?}");
                assert_eq!(flags & !CMD_FLAG_FUA, 0, "{req:?}");
                assert!(fua_ok, "{req:?}");
                assert!((1..=SPAN_LIMIT).contains(&len), "{req:?}");
                assert!(within(off, len, DISCARD), "{req:?}");
            }
            CMD_WRITE_ZEROES => {
                assert!(info.can_write_zeroes(), "{req:?}");
                let allowed = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
                assert_eq!(flags & !allowed, 0, "{req:?}");
                assert!(fua_ok, "{req:?}");
                assert!(flags & CMD_FLAG_FAST_ZERO == 0 || info.can_fast_zero());
                assert_ne!(
                    flags & CMD_FLAG_NO_HOLE,
                    0,
                    "unmapping not allowed: {req:?}"
                );
                assert!((1..=SPAN_LIMIT).contains(&len), "{req:?}");
                assert!(within(off, len, ZERO), "{req:?}");
            }
            CMD_BLOCK_STATUS => {
                assert!(info.base_allocation.is_some(), "{req:?}");
                assert_eq!(flags & !CMD_FLAG_REQ_ONE, 0, "{req:?}");
                assert!((1..=SPAN_LIMIT).contains(&len), "{req:?}");
            }
            CMD_DISC => {
                assert_eq!(flags, 0);
                assert!(o.0.is_empty(), "client sent {} bytes after DISC", o.0.len());
                continue;
            }
            k => panic!("unknown command {k}: {req:?}"),
        }
        sent.insert(
            req.cookie,
            Sent {
                kind: req.kind,
                offset: off,
                len: req.length,
            },
        );
    }
    sent
}

/// One reply (simple, or a structured chunk) the reference reader parsed.
#[derive(Debug)]
enum Part<'a> {
    Simple {
        error: u32,
        data: &'a [u8],
    },
    Chunk {
        flags: u16,
        kind: u16,
        body: &'a [u8],
    },
}

/// Parses the transmission-phase replies the way the client must, as far as that is
/// unambiguous; returns the replies of each cookie up to and including its last one (absent
/// for a cookie whose reply did not finish before the parse stopped).
fn reference_replies<'a>(
    stream: &'a [u8],
    sent: &HashMap<u64, Sent>,
    structured: bool,
) -> HashMap<u64, Vec<Part<'a>>> {
    let mut open: HashMap<u64, Vec<Part>> = HashMap::new();
    let mut done = HashMap::new();
    let mut r = Cur(stream);
    loop {
        let Some(magic) = r.u32() else { break };
        let (cookie, part, last) = match magic {
            SIMPLE_REPLY_MAGIC => {
                let (Some(error), Some(cookie)) = (r.u32(), r.u64()) else {
                    break;
                };
                let Some(req) = sent.get(&cookie) else { break };
                let n = if req.kind == CMD_READ && error == 0 {
                    req.len as usize
                } else {
                    0
                };
                let Some(data) = r.take(n) else { break };
                (cookie, Part::Simple { error, data }, true)
            }
            STRUCTURED_REPLY_MAGIC if structured => {
                let (Some(flags), Some(kind), Some(cookie), Some(len)) =
                    (r.u16(), r.u16(), r.u64(), r.u32())
                else {
                    break;
                };
                let Some(body) = r.take(len as usize) else {
                    break;
                };
                let last = flags & REPLY_FLAG_DONE != 0;
                (cookie, Part::Chunk { flags, kind, body }, last)
            }
            _ => break,
        };
        // A reply for a request that is not (or no longer) pending ends the connection.
        if done.contains_key(&cookie) || !sent.contains_key(&cookie) {
            break;
        }
        let parts = open.entry(cookie).or_default();
        if matches!(part, Part::Simple { .. }) && !parts.is_empty() {
            break; // a simple reply after chunks: a violation
        }
        parts.push(part);
        if last {
            done.insert(cookie, open.remove(&cookie).unwrap());
        }
    }
    done
}

/// The replies, without their data.
fn describe(parts: &[Part]) -> String {
    let items: Vec<String> = parts
        .iter()
        .map(|p| match p {
            Part::Simple { error, data } => format!("simple(error {error}, {} bytes)", data.len()),
            Part::Chunk { flags, kind, body } => {
                let mut b = Cur(body);
                match (*kind, b.u64()) {
                    (REPLY_TYPE_OFFSET_DATA, Some(off)) => {
                        format!("data(at {off}, {} bytes, flags {flags})", b.0.len())
                    }
                    (REPLY_TYPE_OFFSET_HOLE, Some(off)) => {
                        format!("hole(at {off}, {:?} bytes, flags {flags})", b.u32())
                    }
                    _ => format!("chunk(type {kind:#x}, {} bytes, flags {flags})", body.len()),
                }
            }
        })
        .collect();
    items.join(", ")
}

/// A successful read of `req` returned `data`: check it against the replies.
fn check_read_part(req: &Sent, parts: &[Part], data: &[u8]) {
    let n = req.len as usize;
    assert_eq!(data.len(), n);
    if let [Part::Simple { error, data: sent }] = parts {
        assert_eq!(*error, 0, "read succeeded despite error {error}");
        assert_eq!(
            data, *sent,
            "read returned other bytes than the simple reply carried"
        );
        return;
    }
    let mut expect = vec![0u8; n];
    let mut covered = vec![0u8; n];
    for (i, part) in parts.iter().enumerate() {
        let Part::Chunk { flags, kind, body } = part else {
            panic!(
                "read succeeded with a simple reply after chunks: {}",
                describe(parts)
            );
        };
        let mut b = Cur(body);
        let (offset, bytes) = match *kind {
            REPLY_TYPE_OFFSET_DATA => {
                let off = b.u64().expect("read succeeded with a short data chunk");
                assert!(!b.0.is_empty(), "read succeeded with an empty data chunk");
                (off, Some(b.0))
            }
            REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(body.len(), 12, "read succeeded with a bad hole chunk");
                let off = b.u64().unwrap();
                let len = b.u32().unwrap();
                assert_ne!(len, 0, "read succeeded with an empty hole chunk");
                (off, None)
            }
            REPLY_TYPE_NONE => {
                assert!(
                    body.is_empty() && i == parts.len() - 1,
                    "{}",
                    describe(parts)
                );
                continue;
            }
            k => panic!("read succeeded despite a chunk of type {k:#x} (flags {flags:#x})"),
        };
        let len = bytes.map_or_else(
            || u32::from_be_bytes(body[8..12].try_into().unwrap()) as u64,
            |d| d.len() as u64,
        );
        let rel = offset
            .checked_sub(req.offset)
            .filter(|rel| {
                rel.checked_add(len)
                    .is_some_and(|end| end <= u64::from(req.len))
            })
            .unwrap_or_else(|| {
                panic!("read succeeded despite a chunk of {len} bytes at {offset} outside {req:?}")
            }) as usize;
        let range = rel..rel + len as usize;
        match bytes {
            Some(d) => expect[range.clone()].copy_from_slice(d),
            None => expect[range.clone()].fill(0),
        }
        covered[range]
            .iter_mut()
            .for_each(|c| *c = c.saturating_add(1));
    }
    if let Some(i) = covered.iter().position(|&c| c != 1) {
        // F5 (README.md, fixed): overlapping chunks used to pass for a complete reply.
        panic!(
            "read of {} bytes at {} succeeded although its chunks cover byte {i} {} times: {}",
            req.len,
            req.offset,
            covered[i],
            describe(parts)
        );
    }
    assert_eq!(
        data,
        &expect[..],
        "read returned other bytes than its chunks carried"
    );
}

/// A successful block status (without REQ_ONE) returned `got`: check it against the replies.
fn check_status(req: &Sent, parts: &[Part], got: &ExtentList) {
    let mut status = parts.iter().filter_map(|p| match p {
        Part::Chunk {
            kind: REPLY_TYPE_BLOCK_STATUS,
            body,
            ..
        } => Some(*body),
        _ => None,
    });
    let body = status
        .next()
        .expect("block status succeeded without a status chunk");
    assert!(
        status.next().is_none(),
        "block status succeeded with two status chunks"
    );
    let mut b = Cur(body);
    assert_eq!(b.u32(), Some(META_ID));
    let mut want = ExtentList::new();
    let mut left = u64::from(req.len);
    while let (Some(len), Some(flags), true) = (b.u32(), b.u32(), left > 0) {
        let len = u64::from(len).min(left);
        want.push(Extent {
            len,
            hole: flags & STATE_HOLE != 0,
            zero: flags & STATE_ZERO != 0,
        });
        left -= len;
    }
    assert_eq!(
        got,
        &want,
        "block status differs from its chunk: {}",
        describe(parts)
    );
}

fn check(ctl: u8, rest: &[u8], outcome: &Outcome, client_out: &[u8]) {
    for (r, &(_, len)) in outcome.reads.iter().zip(&READS) {
        if let Ok(data) = r {
            assert_eq!(
                data.len(),
                len,
                "read of {len} bytes returned {}",
                data.len()
            );
        }
    }
    for (s, &(_, len, req_one)) in outcome.status.iter().zip(&STATUS) {
        if let Ok(ext) = s {
            let total = ext.total();
            assert!(
                (1..=len).contains(&total),
                "block status of {len} bytes describes {total}: {ext:?}"
            );
            assert!(ext.iter().all(|e| e.len > 0), "empty extent: {ext:?}");
            assert!(!req_one || ext.0.len() == 1, "REQ_ONE gave {ext:?}");
        }
    }
    let offer = (ctl & MODE != 0).then(|| offer_for(ctl));
    let sent = check_client_output(client_out, &outcome.info, offer);
    let Some(offer) = offer else { return };
    let replies = reference_replies(rest, &sent, offer.structured);
    for (r, &(offset, len)) in outcome.reads.iter().zip(&READS) {
        let Ok(data) = r else { continue };
        for (cookie, req) in &sent {
            if req.kind != CMD_READ || !within(req.offset, u64::from(req.len), (offset, len as u64))
            {
                continue;
            }
            // Unchecked when the reference reader stopped before this reply.
            if let Some(parts) = replies.get(cookie) {
                let start = (req.offset - offset) as usize;
                check_read_part(req, parts, &data[start..start + req.len as usize]);
            }
        }
    }
    for (s, &(offset, len, req_one)) in outcome.status.iter().zip(&STATUS) {
        let (Ok(ext), false) = (s, req_one) else {
            continue;
        };
        for (cookie, req) in &sent {
            if req.kind == CMD_BLOCK_STATUS && req.offset == offset && u64::from(req.len) == len {
                if let Some(parts) = replies.get(cookie) {
                    check_status(req, parts, ext);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let prefix = (ctl & MODE != 0).then(|| offer_for(ctl).handshake());
        let (c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve(s, prefix, rest.to_vec(), ctl & HANG_UP != 0));
        // Each step of drive() has its own bound.
        let outcome = drive(c).await;
        let client_out = tokio::time::timeout(BOUND, server)
            .await
            .expect("the client kept the connection open after it was dropped")
            .unwrap();
        if dump() {
            let head = &client_out[..client_out.len().min(128)];
            eprintln!("client sent {} bytes: {head:02x?}...", client_out.len());
        }
        if let Some(outcome) = outcome {
            check(ctl, rest, &outcome, &client_out);
        }
    });
});

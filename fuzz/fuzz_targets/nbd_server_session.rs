//! A whole NBD server session (handshake and transmission) driven by arbitrary client bytes over
//! an in-memory stream, serving one 1 MiB [`MemoryDev`] export named "disk".
//!
//! Asserts:
//!  * no panic, and the session ends within 10 s once the client's bytes run out;
//!  * the server's bytes are what the protocol lets a client parse, given what the client sent:
//!    the greeting; for each complete option, a sequence of option replies for that option
//!    ending in an ACK or an error (an ABORT or a refused NBD_OPT_EXPORT_NAME ends the
//!    session, nothing follows it); NBD_OPT_EXPORT_NAME/"disk" or "" gets the export size and
//!    flags (and 124 zero bytes unless NO_ZEROES); a successful NBD_OPT_GO carries an
//!    NBD_INFO_EXPORT with the export size;
//!  * in transmission, every request the server read completely (up to DISC, a bad header or
//!    the end of the input) gets exactly one reply with its cookie, and nothing else is sent:
//!    simple replies (with the data of a successful READ) or, after NBD_OPT_STRUCTURED_REPLY,
//!    single structured chunks with the DONE flag: OFFSET_DATA at the request's offset and
//!    length for READ, a well-formed base:allocation BLOCK_STATUS payload (one extent with
//!    REQ_ONE, no empty extent, none past the end of the export), NONE or an ERROR chunk.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use blockdev::MemoryDev;
use libfuzzer_sys::fuzz_target;
use nbd::proto::*;
use nbd::server::{Export, ExportSet, Server, ServerConfig};

const DISK_SIZE: u64 = 1 << 20;

#[path = "common/cur.rs"]
mod cur;
#[path = "common/duplex.rs"]
mod duplex;
use cur::Cur;

fn assert_nothing_more(out: &Cur, why: &str) {
    assert!(
        out.is_empty(),
        "server sent {} more bytes after {why}: {:02x?}",
        out.0.len(),
        &out.0[..out.0.len().min(64)]
    );
}

/// Replays the client's input against the server's output.
fn check_transcript(input: &[u8], output: &[u8]) {
    let mut inp = Cur(input);
    let mut out = Cur(output);
    assert_eq!(out.u64(), Some(NBDMAGIC), "greeting");
    assert_eq!(out.u64(), Some(IHAVEOPT), "greeting");
    let hs = out.u16().expect("handshake flags");
    assert_ne!(hs & FLAG_FIXED_NEWSTYLE, 0);

    let Some(client_flags) = inp.u32() else {
        return assert_nothing_more(&out, "a truncated client flags field");
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return assert_nothing_more(&out, "unknown client flags");
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;

    // Negotiation.
    loop {
        let Some(magic) = inp.u64() else {
            return assert_nothing_more(&out, "the input ended during negotiation");
        };
        if magic != IHAVEOPT {
            return assert_nothing_more(&out, "a bad option magic");
        }
        let (Some(opt), Some(len)) = (inp.u32(), inp.u32()) else {
            return assert_nothing_more(&out, "a truncated option header");
        };
        if len > MAX_OPTION_LEN {
            return assert_nothing_more(&out, "an oversized option");
        }
        let Some(data) = inp.take(len as usize) else {
            return assert_nothing_more(&out, "a truncated option");
        };
        if opt == OPT_EXPORT_NAME {
            if data != b"disk" && !data.is_empty() {
                return assert_nothing_more(&out, "NBD_OPT_EXPORT_NAME of an unknown export");
            }
            assert_eq!(
                out.u64(),
                Some(DISK_SIZE),
                "NBD_OPT_EXPORT_NAME: export size"
            );
            let flags = out.u16().expect("NBD_OPT_EXPORT_NAME: transmission flags");
            assert_ne!(flags & FLAG_HAS_FLAGS, 0);
            if !no_zeroes {
                let z = out.take(124).expect("NBD_OPT_EXPORT_NAME: 124 zero bytes");
                assert!(z.iter().all(|&b| b == 0));
            }
            break;
        }
        let mut export_info = false;
        let acked = loop {
            let magic = out
                .u64()
                .unwrap_or_else(|| panic!("option {opt}: no (complete) reply"));
            assert_eq!(magic, OPT_REPLY_MAGIC, "option {opt}: reply magic");
            assert_eq!(
                out.u32(),
                Some(opt),
                "option {opt}: reply names another option"
            );
            let kind = out.u32().expect("reply type");
            let rlen = out.u32().expect("reply length");
            let rdata = out.take(rlen as usize).expect("reply data");
            match kind {
                REP_ACK => {
                    assert!(rdata.is_empty(), "option {opt}: ACK with data");
                    break true;
                }
                k if k & (1 << 31) != 0 => break false,
                REP_SERVER => assert_eq!(opt, OPT_LIST),
                REP_INFO => {
                    assert!(opt == OPT_INFO || opt == OPT_GO, "option {opt}: REP_INFO");
                    let mut d = Cur(rdata);
                    if d.u16() == Some(INFO_EXPORT) {
                        assert_eq!(d.u64(), Some(DISK_SIZE), "NBD_INFO_EXPORT size");
                        export_info = true;
                    }
                }
                REP_META_CONTEXT => {
                    assert!(opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT)
                }
                k => panic!("option {opt}: unknown reply type {k:#x}"),
            }
        };
        match opt {
            OPT_ABORT => return assert_nothing_more(&out, "NBD_OPT_ABORT"),
            OPT_STRUCTURED_REPLY if acked => structured = true,
            OPT_GO if acked => {
                assert!(
                    export_info,
                    "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"
                );
                break;
            }
            _ => {}
        }
    }

    // Transmission: the requests the server reads completely, by cookie.
    let mut pending: HashMap<u64, Vec<Request>> = HashMap::new();
    let mut requests = 0usize;
    loop {
        let Some(h) = inp.take(REQUEST_LEN) else {
            break;
        };
        let Ok(req) = Request::parse(h) else { break };
        if req.kind == CMD_DISC {
            break;
        }
        if req.has_payload()
            && (req.length > MAX_PAYLOAD || inp.take(req.length as usize).is_none())
        {
            break;
        }
        let same = pending.entry(req.cookie).or_default();
        if same.first().is_some_and(|r| *r != req) {
            // Two different requests under one cookie: a client could not tell their replies
            // apart either. Nothing more to check.
            return;
        }
        same.push(req);
        requests += 1;
    }

    let mut replies = 0usize;
    while !out.is_empty() {
        let magic = out.u32().expect("reply magic");
        let cookie = if structured {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "structured reply magic");
            let flags = out.u16().expect("chunk flags");
            let kind = out.u16().expect("chunk type");
            let cookie = out.u64().expect("chunk cookie");
            let len = out.u32().expect("chunk length");
            let data = out.take(len as usize).expect("chunk payload");
            let req = *pending
                .get(&cookie)
                .and_then(|v| v.first())
                .unwrap_or_else(|| panic!("chunk for cookie {cookie:#x} nobody is waiting for"));
            assert_eq!(flags, REPLY_FLAG_DONE, "one chunk per reply, with DONE");
            let mut d = Cur(data);
            match kind {
                REPLY_TYPE_NONE => {
                    assert!(data.is_empty());
                    assert!(
                        req.kind != CMD_READ && req.kind != CMD_BLOCK_STATUS,
                        "{req:?}: NONE"
                    );
                }
                REPLY_TYPE_OFFSET_DATA => {
                    assert_eq!(req.kind, CMD_READ, "OFFSET_DATA for {req:?}");
                    assert_eq!(d.u64(), Some(req.offset), "OFFSET_DATA offset");
                    assert_eq!(d.0.len(), req.length as usize, "OFFSET_DATA length");
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    assert_eq!(req.kind, CMD_BLOCK_STATUS, "BLOCK_STATUS for {req:?}");
                    assert_eq!(d.u32(), Some(BASE_ALLOCATION_ID), "context id");
                    assert_eq!(d.0.len() % 8, 0, "extent descriptors");
                    let n = d.0.len() / 8;
                    assert!(n >= 1, "no extents for {req:?}");
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        assert_eq!(n, 1, "REQ_ONE: {n} extents");
                    }
                    let mut end = req.offset;
                    for _ in 0..n {
                        let len = d.u32().unwrap();
                        let state = d.u32().unwrap();
                        assert_ne!(len, 0, "empty extent for {req:?}");
                        assert_eq!(state & !(STATE_HOLE | STATE_ZERO), 0);
                        end += u64::from(len);
                    }
                    assert!(end <= DISK_SIZE, "extents of {req:?} end at {end}");
                }
                REPLY_TYPE_ERROR => {
                    let errno = d.u32().expect("error chunk: errno");
                    let mlen = d.u16().expect("error chunk: message length");
                    assert_ne!(errno, 0, "error chunk without an error");
                    assert_eq!(d.0.len(), mlen as usize, "error chunk message length");
                }
                k => panic!("unexpected chunk type {k:#x}"),
            }
            cookie
        } else {
            assert_eq!(magic, SIMPLE_REPLY_MAGIC, "simple reply magic");
            let error = out.u32().expect("reply error");
            let cookie = out.u64().expect("reply cookie");
            let req = *pending
                .get(&cookie)
                .and_then(|v| v.first())
                .unwrap_or_else(|| panic!("reply for cookie {cookie:#x} nobody is waiting for"));
            if req.kind == CMD_READ && error == 0 {
                out.take(req.length as usize).expect("READ data");
            }
            cookie
        };
        let v = pending.get_mut(&cookie).unwrap();
        v.pop();
        if v.is_empty() {
            pending.remove(&cookie);
        }
        replies += 1;
    }
    assert_eq!(
        replies, requests,
        "every request gets one reply; unanswered: {pending:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    duplex::run(async {
        let exports = ExportSet::new();
        exports.add(Export::new("disk", Arc::new(MemoryDev::new(DISK_SIZE))));
        let server = Server::new(exports, ServerConfig::default());
        let output = duplex::session(data, "server session", |server_end| async move {
            server.serve_stream(server_end).await
        })
        .await;
        check_transcript(data, &output);
    });
});

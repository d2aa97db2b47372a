//! NBD wire format: magics, option/command/reply numbers, and the fixed-size headers.
//!
//! Everything here is pure (no I/O) so that the handshake and request parsers can be fuzzed.
//! Numbers are from the NBD protocol document (`doc/proto.md` in NetworkBlockDevice/nbd).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission-phase request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flag: the server speaks fixed newstyle (unknown options get an error reply).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the server can leave out the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the other flags are valid (always set).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server takes NBD_CMD_FLUSH.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server takes NBD_CMD_FLAG_FUA.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export behaves like a rotating disk (a hint for schedulers).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: the server takes NBD_CMD_TRIM.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server takes NBD_CMD_WRITE_ZEROES.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the server takes NBD_CMD_FLAG_DF (a read's data in one chunk).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: a flush on one connection covers writes on all of them.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: the server takes NBD_CMD_CACHE.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the server takes NBD_CMD_FLAG_FAST_ZERO.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: select an export and end the handshake (no reply on failure: the server hangs up).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the session without going into transmission.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without selecting it.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export, select it and end the handshake.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list the metadata contexts a query matches.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select the metadata contexts for block status.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done (the last reply to an option).
pub const REP_ACK: u32 = 1;
/// Option reply: one export of NBD_OPT_LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information (NBD_INFO_*).
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context, with its id.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: the option is unknown or not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: forbidden by the server's policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: the option or its payload is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: not possible on this platform.
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
/// Option error: TLS must come first.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: the client must ask for block sizes (NBD_INFO_BLOCK_SIZE).
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// Option error: the payload or the request is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Export information: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Export information: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// Export information: a description for people.
pub const INFO_DESCRIPTION: u16 = 2;
/// Export information: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (the payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard (the content becomes unspecified).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch (advisory).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: describe allocation in the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: durable before the reply (force unit access).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes without deallocating.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: send a read's data in one chunk (don't fragment).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: describe just one extent in block status.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Chunk flag: the request's last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (only with DONE).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: read data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a run of zeroes in a read, at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Chunk type: an error with a message and the offset where it happened.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` extent flag: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` extent flag: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id on the wire (any nonzero value the server picks).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Wire errno: operation not permitted (a write to a read-only export).
pub const EPERM: u32 = 1;
/// Wire errno: I/O error.
pub const EIO: u32 = 5;
/// Wire errno: out of memory.
pub const ENOMEM: u32 = 12;
/// Wire errno: invalid argument.
pub const EINVAL: u32 = 22;
/// Wire errno: no space left.
pub const ENOSPC: u32 = 28;
/// Wire errno: the request is too large.
pub const EOVERFLOW: u32 = 75;
/// Wire errno: not supported.
pub const ENOTSUP: u32 = 95;
/// Wire errno: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest request payload (and read) we accept, as qemu-nbd does.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option payload a server accepts during negotiation.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or metadata-context query (the protocol's limit).
pub const MAX_STRING: u32 = 4096;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Maps an errno from the block layer onto the small set NBD allows.
pub fn wire_errno(errno: i32) -> u32 {
    match errno as u32 {
        e @ (EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN) => e,
        // EDQUOT and EFBIG are "no space" to a client.
        122 | 27 => ENOSPC,
        _ => EIO,
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`).
    pub kind: u16,
    /// Chosen by the client; the reply carries it back.
    pub cookie: u64,
    /// Where on the export.
    pub offset: u64,
    /// How many bytes (the payload length for a write).
    pub length: u32,
}

/// Why a request header is unusable; the connection cannot continue after any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The header does not start with [`REQUEST_MAGIC`].
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    /// Fewer than [`REQUEST_LEN`] bytes.
    #[error("truncated request header ({0} of 28 bytes)")]
    Truncated(usize),
}

impl Request {
    /// Parses a 28-byte header.
    pub fn parse(buf: &[u8]) -> Result<Request, HeaderError> {
        if buf.len() < REQUEST_LEN {
            return Err(HeaderError::Truncated(buf.len()));
        }
        let mut b = &buf[..REQUEST_LEN];
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        Ok(Request {
            flags: b.get_u16(),
            kind: b.get_u16(),
            cookie: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u32(),
        })
    }

    /// Appends the 28-byte header to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// The request carries a payload the receiver must read (only WRITE does).
    pub fn has_payload(&self) -> bool {
        self.kind == CMD_WRITE
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Encodes a structured reply chunk header.
pub fn chunk_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// Encodes an option reply.
pub fn option_reply(out: &mut BytesMut, option: u32, kind: u32, data: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(kind);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export asked about.
    pub name: String,
    /// The information asked for (`INFO_*`).
    pub infos: Vec<u16>,
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub name: String,
    /// Context names or prefixes (`base:allocation`, `base:`).
    pub queries: Vec<String>,
}

/// A malformed option payload (answered with NBD_REP_ERR_INVALID; the session goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed option payload: {0}")]
pub struct OptionError(
    /// What is malformed.
    pub &'static str,
);

fn take_string(b: &mut Bytes, what: &'static str) -> Result<String, OptionError> {
    if b.remaining() < 4 {
        return Err(OptionError(what));
    }
    let len = b.get_u32();
    if len > MAX_STRING || b.remaining() < len as usize {
        return Err(OptionError(what));
    }
    let s = b.split_to(len as usize);
    String::from_utf8(s.to_vec()).map_err(|_| OptionError("string is not UTF-8"))
}

impl InfoRequest {
    /// Parses an option payload.
    pub fn parse(mut b: Bytes) -> Result<InfoRequest, OptionError> {
        let name = take_string(&mut b, "export name length exceeds the option")?;
        if b.remaining() < 2 {
            return Err(OptionError("missing number of information requests"));
        }
        let n = b.get_u16() as usize;
        if b.remaining() != n * 2 {
            return Err(OptionError(
                "information request count does not match the length",
            ));
        }
        let infos = (0..n).map(|_| b.get_u16()).collect();
        Ok(InfoRequest { name, infos })
    }

    /// Appends the option payload to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.name.len() as u32);
        out.put_slice(self.name.as_bytes());
        out.put_u16(self.infos.len() as u16);
        for i in &self.infos {
            out.put_u16(*i);
        }
    }
}

impl MetaContextRequest {
    /// Parses an option payload.
    pub fn parse(mut b: Bytes) -> Result<MetaContextRequest, OptionError> {
        let name = take_string(&mut b, "export name length exceeds the option")?;
        if b.remaining() < 4 {
            return Err(OptionError("missing number of queries"));
        }
        let n = b.get_u32();
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(take_string(&mut b, "query length exceeds the option")?);
        }
        if b.has_remaining() {
            return Err(OptionError("trailing bytes after the queries"));
        }
        Ok(MetaContextRequest { name, queries })
    }

    /// Appends the option payload to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.name.len() as u32);
        out.put_slice(self.name.as_bytes());
        out.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            out.put_u32(q.len() as u32);
            out.put_slice(q.as_bytes());
        }
    }
}

/// Does metadata-context query `q` select `base:allocation`?
pub fn query_matches_base_allocation(q: &str) -> bool {
    q == BASE_ALLOCATION || q == "base:"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        let mut b = BytesMut::new();
        r.encode(&mut b);
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(Request::parse(&b).unwrap(), r);
    }

    #[test]
    fn request_with_bad_magic_is_refused() {
        let mut b = BytesMut::new();
        Request {
            flags: 0,
            kind: 0,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode(&mut b);
        b[0] = 0;
        assert_eq!(Request::parse(&b), Err(HeaderError::BadMagic(0x00609513)));
        assert_eq!(Request::parse(&b[..5]), Err(HeaderError::Truncated(5)));
    }

    #[test]
    fn info_request_parses_and_rejects_lies() {
        let r = InfoRequest {
            name: "disk".into(),
            infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let mut b = BytesMut::new();
        r.encode(&mut b);
        assert_eq!(InfoRequest::parse(b.clone().freeze()).unwrap(), r);
        let mut short = b.clone();
        short.truncate(b.len() - 1);
        assert!(InfoRequest::parse(short.freeze()).is_err());
        let mut liar = BytesMut::new();
        liar.put_u32(1000);
        liar.put_slice(b"abc");
        assert!(InfoRequest::parse(liar.freeze()).is_err());
    }

    #[test]
    fn meta_context_request_round_trips() {
        let r = MetaContextRequest {
            name: "".into(),
            queries: vec!["base:allocation".into()],
        };
        let mut b = BytesMut::new();
        r.encode(&mut b);
        assert_eq!(MetaContextRequest::parse(b.freeze()).unwrap(), r);
    }

    #[test]
    fn wire_errno_maps_unknown_values_to_eio() {
        assert_eq!(wire_errno(1), EPERM);
        assert_eq!(wire_errno(28), ENOSPC);
        assert_eq!(wire_errno(122), ENOSPC);
        assert_eq!(wire_errno(9999), EIO);
    }
}

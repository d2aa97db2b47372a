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
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Info types (in NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id on the wire (any nonzero value the server picks).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Errors on the wire.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
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
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header is unusable; the connection cannot continue after any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
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
    pub name: String,
    pub infos: Vec<u16>,
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// A malformed option payload (answered with NBD_REP_ERR_INVALID; the session goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed option payload: {0}")]
pub struct OptionError(pub &'static str);

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

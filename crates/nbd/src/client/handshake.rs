//! The client's half of the handshake, fixed newstyle up to the transmission phase: structured
//! replies, `base:allocation` and the export's block sizes (NBD_OPT_GO), with NBD_OPT_EXPORT_NAME
//! for servers that lack NBD_OPT_GO or fixed newstyle.

use std::future::Future;
use std::io;
use std::time::Duration;

use blockdev::{BlockError, ErrorKind, Op};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ClientConfig;
use super::export::{BlockSize, ExportInfo};
use crate::proto::*;

/// Largest option reply we read during the handshake.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// The oldstyle greeting's second magic, which we recognise only to refuse clearly.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Errno used for protocol violations by the server.
const EPROTO: i32 = 71;
/// Why a handshake failed.
#[derive(Debug)]
pub(super) enum HandshakeError {
    Io(io::Error),
    Protocol(String),
    Refused {
        option: &'static str,
        reply: u32,
        message: String,
    },
    TimedOut(Duration),
    Tls(net::TlsError),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl HandshakeError {
    pub(super) fn into_block_error(self, label: &str) -> BlockError {
        let (kind, detail) = match self {
            HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => (
                ErrorKind::Shutdown,
                "the server closed the connection during the handshake".into(),
            ),
            HandshakeError::Io(e) => (
                ErrorKind::Io(e.raw_os_error()),
                format!("handshake failed: {e}"),
            ),
            HandshakeError::Protocol(m) => (
                ErrorKind::Io(Some(EPROTO)),
                format!("protocol violation during the handshake: {m}"),
            ),
            HandshakeError::Refused {
                option,
                reply,
                message,
            } => (
                refusal_kind(reply),
                format!(
                    "server refused {option} with {}: {message}",
                    reply_name(reply)
                ),
            ),
            HandshakeError::TimedOut(d) => (
                ErrorKind::TimedOut,
                format!("handshake did not finish within {d:?}"),
            ),
            HandshakeError::Tls(e) => {
                let kind = match e.kind {
                    net::TlsErrorKind::Credentials => ErrorKind::InvalidArgument,
                    net::TlsErrorKind::Handshake => ErrorKind::Io(Some(EPROTO)),
                    net::TlsErrorKind::NotAuthorised => ErrorKind::Io(Some(13)), // EACCES
                };
                (kind, e.to_string())
            }
        };
        BlockError::new(kind, Op::Open, 0).context(format!("{label}: {detail}"))
    }
}

fn refusal_kind(reply: u32) -> ErrorKind {
    match reply {
        REP_ERR_UNSUP | REP_ERR_TLS_REQD => ErrorKind::NotSupported,
        REP_ERR_SHUTDOWN => ErrorKind::Shutdown,
        REP_ERR_POLICY => ErrorKind::Io(Some(13)), // EACCES
        _ => ErrorKind::InvalidArgument,
    }
}

fn reply_name(reply: u32) -> String {
    match reply {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP".into(),
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY".into(),
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM".into(),
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD".into(),
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)".into(),
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN".into(),
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG".into(),
        r => format!("option reply {r:#x}"),
    }
}

fn is_error_reply(reply: u32) -> bool {
    reply & (1 << 31) != 0
}

fn protocol<T>(msg: impl Into<String>) -> std::result::Result<T, HandshakeError> {
    Err(HandshakeError::Protocol(msg.into()))
}

/// One option reply.
struct OptionReply {
    kind: u32,
    data: Bytes,
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(16 + data.len());
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    w.write_all(&out).await?;
    w.flush().await
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> std::result::Result<OptionReply, HandshakeError> {
    let magic = r.read_u64().await?;
    if magic != OPT_REPLY_MAGIC {
        return protocol(format!("bad option reply magic {magic:#018x}"));
    }
    let answered = r.read_u32().await?;
    if answered != option {
        return protocol(format!(
            "reply to option {answered} while waiting for option {option}"
        ));
    }
    let kind = r.read_u32().await?;
    let len = r.read_u32().await?;
    if len > MAX_OPTION_REPLY {
        return protocol(format!("option reply of {len} bytes"));
    }
    let mut data = vec![0; len as usize];
    r.read_exact(&mut data).await?;
    Ok(OptionReply {
        kind,
        data: data.into(),
    })
}

pub(super) fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// Reads the greeting; returns the server's handshake flags.
async fn greeting<R: AsyncRead + Unpin>(r: &mut R) -> std::result::Result<u16, HandshakeError> {
    if r.read_u64().await? != NBDMAGIC {
        return protocol("the peer is not an NBD server (bad greeting magic)");
    }
    match r.read_u64().await? {
        IHAVEOPT => Ok(r.read_u16().await?),
        OLDSTYLE_MAGIC => {
            protocol("the server speaks oldstyle negotiation, which is not supported")
        }
        m => protocol(format!("unknown negotiation magic {m:#018x}")),
    }
}

/// What the greeting settled.
#[derive(Debug, Clone, Copy)]
pub(super) struct Greeting {
    fixed: bool,
    no_zeroes: bool,
}

/// Reads the greeting and answers it with our flags.
async fn hello<R, W>(r: &mut R, w: &mut W) -> std::result::Result<Greeting, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let server_flags = greeting(r).await?;
    let fixed = server_flags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let mut client_flags = 0;
    if fixed {
        client_flags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    w.write_all(&client_flags.to_be_bytes()).await?;
    Ok(Greeting { fixed, no_zeroes })
}

/// Runs the handshake up to the transmission phase.
pub(super) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    export: &str,
    config: &ClientConfig,
) -> std::result::Result<ExportInfo, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let greeting = hello(r, w).await?;
    options(r, w, export, config, greeting).await
}

/// The clear part of a TLS connection: the greeting and NBD_OPT_STARTTLS, which must be
/// acknowledged (a client that wants TLS never goes on in the clear: no downgrade).
pub(super) async fn starttls<S>(s: &mut S) -> std::result::Result<Greeting, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(s);
    let greeting = hello(&mut r, &mut w).await?;
    if !greeting.fixed {
        return protocol("the server does not speak fixed newstyle, so it cannot do TLS");
    }
    send_option(&mut w, OPT_STARTTLS, &[]).await?;
    let reply = read_option_reply(&mut r, OPT_STARTTLS).await?;
    match reply.kind {
        REP_ACK if reply.data.is_empty() => Ok(greeting),
        REP_ACK => protocol("NBD_OPT_STARTTLS acknowledged with data"),
        k => Err(HandshakeError::Refused {
            option: "NBD_OPT_STARTTLS",
            reply: k,
            message: text(&reply.data),
        }),
    }
}

/// The option phase, from the first option to the transmission phase.
pub(super) async fn options<R, W>(
    r: &mut R,
    w: &mut W,
    export: &str,
    config: &ClientConfig,
    greeting: Greeting,
) -> std::result::Result<ExportInfo, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Greeting { fixed, no_zeroes } = greeting;
    let mut info = ExportInfo::new(export);
    // Without fixed newstyle an unknown option makes the server hang up, so only
    // NBD_OPT_EXPORT_NAME is safe.
    if fixed {
        info.structured_replies = config.structured_replies && structured_replies(r, w).await?;
        if info.structured_replies && config.block_status {
            info.base_allocation = base_allocation(r, w, export).await?;
        }
        if go(r, w, &mut info).await? {
            return Ok(info);
        }
    }
    export_name(r, w, &mut info, no_zeroes).await?;
    Ok(info)
}

async fn structured_replies<R, W>(r: &mut R, w: &mut W) -> std::result::Result<bool, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send_option(w, OPT_STRUCTURED_REPLY, &[]).await?;
    let reply = read_option_reply(r, OPT_STRUCTURED_REPLY).await?;
    match reply.kind {
        REP_ACK => Ok(true),
        k if is_error_reply(k) => Ok(false),
        k => protocol(format!(
            "unexpected reply {k:#x} to NBD_OPT_STRUCTURED_REPLY"
        )),
    }
}

/// Selects `base:allocation`; `None` when the server does not offer it.
async fn base_allocation<R, W>(
    r: &mut R,
    w: &mut W,
    export: &str,
) -> std::result::Result<Option<u32>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut payload = BytesMut::new();
    MetaContextRequest {
        name: export.to_string(),
        queries: vec![BASE_ALLOCATION.to_string()],
    }
    .encode(&mut payload);
    send_option(w, OPT_SET_META_CONTEXT, &payload).await?;
    let mut id = None;
    loop {
        let mut reply = read_option_reply(r, OPT_SET_META_CONTEXT).await?;
        match reply.kind {
            REP_META_CONTEXT if reply.data.len() >= 4 => {
                let ctx = reply.data.get_u32();
                if reply.data == BASE_ALLOCATION.as_bytes() {
                    id = Some(ctx);
                }
            }
            REP_ACK => return Ok(id),
            k if is_error_reply(k) => return Ok(None),
            k => {
                return protocol(format!(
                    "unexpected reply {k:#x} to NBD_OPT_SET_META_CONTEXT"
                ));
            }
        }
    }
}

/// NBD_OPT_GO; `Ok(false)` when the server does not know it (use NBD_OPT_EXPORT_NAME).
async fn go<R, W>(
    r: &mut R,
    w: &mut W,
    info: &mut ExportInfo,
) -> std::result::Result<bool, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut payload = BytesMut::new();
    InfoRequest {
        name: info.name.clone(),
        infos: vec![INFO_BLOCK_SIZE],
    }
    .encode(&mut payload);
    send_option(w, OPT_GO, &payload).await?;
    let mut have_export = false;
    loop {
        let reply = read_option_reply(r, OPT_GO).await?;
        match reply.kind {
            REP_INFO => have_export |= apply_info(info, reply.data)?,
            REP_ACK if have_export => return Ok(true),
            REP_ACK => return protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"),
            REP_ERR_UNSUP => return Ok(false),
            k if is_error_reply(k) => {
                return Err(HandshakeError::Refused {
                    option: "NBD_OPT_GO",
                    reply: k,
                    message: text(&reply.data),
                });
            }
            k => return protocol(format!("unexpected reply {k:#x} to NBD_OPT_GO")),
        }
    }
}

/// Applies one NBD_REP_INFO; returns whether it was NBD_INFO_EXPORT.
fn apply_info(info: &mut ExportInfo, mut data: Bytes) -> std::result::Result<bool, HandshakeError> {
    if data.len() < 2 {
        return protocol("NBD_REP_INFO without an information type");
    }
    match data.get_u16() {
        INFO_EXPORT if data.len() == 10 => {
            info.size = data.get_u64();
            info.flags = data.get_u16();
            Ok(true)
        }
        INFO_BLOCK_SIZE if data.len() == 12 => {
            info.block_size = block_size(data.get_u32(), data.get_u32(), data.get_u32())?;
            Ok(false)
        }
        t @ (INFO_EXPORT | INFO_BLOCK_SIZE) => protocol(format!(
            "information {t} with a payload of {} bytes",
            data.len()
        )),
        _ => Ok(false),
    }
}

/// Checks advertised block sizes against what the protocol allows.
fn block_size(
    min: u32,
    preferred: u32,
    max: u32,
) -> std::result::Result<BlockSize, HandshakeError> {
    let min_ok = min.is_power_of_two() && min <= 64 * 1024;
    if !min_ok || !preferred.is_power_of_two() || max < min {
        return protocol(format!(
            "invalid block sizes min {min}, preferred {preferred}, max {max}"
        ));
    }
    Ok(BlockSize {
        min,
        preferred,
        max,
    })
}

async fn export_name<R, W>(
    r: &mut R,
    w: &mut W,
    info: &mut ExportInfo,
    no_zeroes: bool,
) -> std::result::Result<(), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send_option(w, OPT_EXPORT_NAME, info.name.as_bytes()).await?;
    info.size = match r.read_u64().await {
        Ok(size) => size,
        // The only way a server can refuse NBD_OPT_EXPORT_NAME is to hang up.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(HandshakeError::Refused {
                option: "NBD_OPT_EXPORT_NAME",
                reply: REP_ERR_UNKNOWN,
                message: "the server closed the connection".into(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    info.flags = r.read_u16().await?;
    if !no_zeroes {
        r.read_exact(&mut [0; 124]).await?;
    }
    Ok(())
}

pub(super) async fn bounded<T>(
    limit: Option<Duration>,
    f: impl Future<Output = std::result::Result<T, HandshakeError>>,
) -> std::result::Result<T, HandshakeError> {
    match limit {
        None => f.await,
        Some(d) => tokio::time::timeout(d, f)
            .await
            .unwrap_or(Err(HandshakeError::TimedOut(d))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::scripted::*;
    use super::*;
    use blockdev::BlockDev;

    #[tokio::test]
    async fn handshake_records_size_flags_and_block_sizes() {
        let (c, _s) = pair_with_block_sizes().await;
        let info = c.export_info();
        assert_eq!((info.size, info.flags), (1 << 20, ALL_FLAGS));
        assert_eq!(
            info.block_size,
            BlockSize {
                min: 512,
                preferred: 4096,
                max: 65536
            }
        );
        assert!(info.structured_replies);
        assert_eq!(info.base_allocation, Some(META_ID));
        assert_eq!(c.info().max_request, 65536);
    }

    #[tokio::test]
    async fn go_unsupported_falls_back_to_export_name() {
        let offer = Offer {
            go_unsupported: true,
            ..Offer::default()
        };
        let (c, _s) = pair(offer, config()).await;
        assert_eq!(c.export_info().size, 1 << 20);
        assert_eq!(c.export_info().block_size, BlockSize::default());
    }

    #[test]
    fn invalid_block_sizes_are_refused() {
        assert!(block_size(512, 4096, 1 << 25).is_ok());
        assert!(block_size(3, 4096, 1 << 25).is_err());
        assert!(block_size(1 << 17, 1 << 17, 1 << 25).is_err());
        assert!(block_size(4096, 4096, 512).is_err());
    }
}

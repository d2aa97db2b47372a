//! The pipelined NBD client: how the replication primary reaches the secondary's disk.
//!
//! ```text
//!   callers (any task) --submit--> cookie -> Pending{waiter, slot} in the pending map
//!        |  (write_batch: a run of         ^                     |
//!        |   frames, one waiter)           | take / put back     | reply or failure
//!        v                                 |                     v
//!   writer task: everything queued      reader task: parses simple replies and structured
//!   goes out in one vectored send       chunks, fills the read buffer in place, completes
//!        |                                 ^   the waiter on the DONE chunk (a oneshot, or
//!        '------------> socket ------------'   its batch's count, woken at the last reply)
//! ```
//!
//! Many requests share one connection (bounded by [`ClientConfig::max_in_flight`]); replies are
//! matched by cookie and may come in any order. A caller only ever hands whole frames to the
//! writer task, so dropping a request future can never leave half a request on the wire; its
//! reply, when it comes, is simply discarded.
//!
//! The connection is all-or-nothing. Any protocol violation by the server (bad magic, unknown
//! cookie, a chunk outside its request, ...), a broken socket, or a request that gets no reply
//! within [`ClientConfig::request_timeout`] kills it: every pending request fails with
//! [`ErrorKind::Shutdown`] (the timed-out one with [`ErrorKind::TimedOut`]) and later requests
//! fail at once. Nothing hangs and nothing is retried here: after a lost reply the server's
//! state is unknown, and the replication layer above decides what that means.
//!
//! The client honours what the server advertises: requests above its maximum block size (or
//! 32 MiB) are split, write-zeroes becomes writes of zero buffers where the server lacks it,
//! trim is dropped where the server lacks it (its content is unspecified anyway), FUA becomes a
//! flush after the write, and block status reports everything allocated when the server offers
//! no `base:allocation` context. Requests are not aligned for the server: callers keep to
//! [`ExportInfo::block_size`] (the block layer's [`DevInfo::min_block`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use blockdev::{
    BatchWrite, BlockDev, BlockError, DevInfo, ErrorKind, Extent, ExtentList, Op, Result,
    WriteFlags, ZeroFlags,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{StreamExt, stream};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::addr::SocketAddr;
use crate::proto::*;
use crate::uri::NbdUri;

/// Default for [`ClientConfig::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Upper bound on [`ClientConfig::max_in_flight`] (cookies and permits stay cheap).
pub const MAX_IN_FLIGHT: usize = 4096;
/// Default for [`ClientConfig::request_timeout`] and [`ClientConfig::handshake_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest trim, write-zeroes or block-status request: these carry no payload, so the maximum
/// block size does not bind them (as in qemu's client), but the length field is 32 bits.
const SPAN_LIMIT: u32 = 1 << 30;
/// Parts of one split request in flight at a time.
const SPLIT_PARALLELISM: usize = 8;
/// Size of the zero buffers written where the server cannot write zeroes itself.
const ZERO_CHUNK: u32 = 1 << 20;
static ZEROES: [u8; ZERO_CHUNK as usize] = [0; ZERO_CHUNK as usize];
/// Largest option reply we read during the handshake.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Largest block-status chunk (2 M extents): more is a broken or hostile server.
const MAX_STATUS_CHUNK: u32 = 16 << 20;
/// Largest error chunk: errno, message length, message, offset.
const MAX_ERROR_CHUNK: u32 = 4 + 2 + MAX_STRING + 8;
/// The oldstyle greeting's second magic, which we recognise only to refuse clearly.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Errno used for protocol violations by the server.
const EPROTO: i32 = 71;
/// The reader's buffer: a burst of replies is parsed from one receive.
const READ_BUFFER: usize = 256 * 1024;
/// How long [`NbdClient::disconnect`] waits for the disconnect request to leave.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Requests in flight on the connection (clamped to `1..=MAX_IN_FLIGHT`).
    pub max_in_flight: usize,
    /// A request with no reply after this long fails with [`ErrorKind::TimedOut`] and closes the
    /// connection. `None` waits forever (only sensible when something else watches the peer).
    pub request_timeout: Option<Duration>,
    /// Connecting and negotiating must finish within this time.
    pub handshake_timeout: Option<Duration>,
    /// Ask for structured replies (sparse reads, error messages, block status).
    pub structured_replies: bool,
    /// Ask for the `base:allocation` metadata context (needs structured replies).
    pub block_status: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            request_timeout: Some(DEFAULT_TIMEOUT),
            handshake_timeout: Some(DEFAULT_TIMEOUT),
            structured_replies: true,
            block_status: true,
        }
    }
}

impl ClientConfig {
    fn in_flight(&self) -> usize {
        self.max_in_flight.clamp(1, MAX_IN_FLIGHT)
    }
}

/// Block size constraints the server advertised (NBD_INFO_BLOCK_SIZE), or the protocol's
/// defaults when it sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        }
    }
}

/// What negotiation settled: the export and what the connection may do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name asked for.
    pub name: String,
    /// Length in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*` in [`crate::proto`]).
    pub flags: u16,
    pub block_size: BlockSize,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// The server's id for `base:allocation`, when that context was negotiated.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    fn new(name: &str) -> Self {
        ExportInfo {
            name: name.to_string(),
            size: 0,
            flags: 0,
            block_size: BlockSize::default(),
            structured_replies: false,
            base_allocation: None,
        }
    }

    /// Whether the server set transmission flag `flag` (flags count only with HAS_FLAGS).
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & FLAG_HAS_FLAGS != 0 && self.flags & flag == flag
    }

    pub fn read_only(&self) -> bool {
        self.has_flag(FLAG_READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.has_flag(FLAG_SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.has_flag(FLAG_SEND_FUA)
    }
    pub fn can_trim(&self) -> bool {
        self.has_flag(FLAG_SEND_TRIM)
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.has_flag(FLAG_SEND_WRITE_ZEROES)
    }
    pub fn can_fast_zero(&self) -> bool {
        self.can_write_zeroes() && self.has_flag(FLAG_SEND_FAST_ZERO)
    }
    pub fn can_cache(&self) -> bool {
        self.has_flag(FLAG_SEND_CACHE)
    }
    pub fn can_multi_conn(&self) -> bool {
        self.has_flag(FLAG_CAN_MULTI_CONN)
    }

    /// Largest read or write sent as one request: the server's maximum, at most 32 MiB, and a
    /// multiple of its minimum block size.
    pub fn max_payload(&self) -> u32 {
        let min = self.block_size.min.max(1);
        let max = self.block_size.max.min(MAX_PAYLOAD);
        (max / min * min).max(min)
    }

    /// The export as the block layer sees it.
    pub fn dev_info(&self) -> DevInfo {
        DevInfo {
            len: self.size,
            min_block: self.block_size.min,
            preferred_block: self.block_size.preferred,
            max_request: self.max_payload(),
            read_only: self.read_only(),
            can_discard: self.can_trim(),
            // Zeroes not sent over the network are cheaper even if the server writes them.
            fast_zero: self.can_write_zeroes(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// Why a handshake failed.
#[derive(Debug)]
enum HandshakeError {
    Io(io::Error),
    Protocol(String),
    Refused {
        option: &'static str,
        reply: u32,
        message: String,
    },
    TimedOut(Duration),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl HandshakeError {
    fn into_block_error(self, label: &str) -> BlockError {
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

fn text(data: &[u8]) -> String {
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

/// Runs the handshake up to the transmission phase.
async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    export: &str,
    config: &ClientConfig,
) -> std::result::Result<ExportInfo, HandshakeError>
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

async fn bounded<T>(
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

// ---------------------------------------------------------------------------------------------
// Connection state shared by callers, the reader and the writer
// ---------------------------------------------------------------------------------------------

/// An error the server replied with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerError {
    errno: u32,
    message: Option<String>,
    /// Where the error happened (NBD_REPLY_TYPE_ERROR_OFFSET).
    offset: Option<u64>,
}

/// Why a request did not succeed, as the reader reports it.
#[derive(Debug)]
enum Failure {
    Server(ServerError),
    /// The connection is gone; the text says why.
    Dead(String),
}

/// A successful reply: read data or block-status extents (empty for other commands).
#[derive(Debug, Default)]
struct Reply {
    data: Bytes,
    extents: ExtentList,
}

type Outcome = std::result::Result<Reply, Failure>;

/// A request on the wire, waiting for its reply.
struct Pending {
    kind: u16,
    offset: u64,
    len: u32,
    /// Read data, zero-filled up front so holes need no work.
    data: BytesMut,
    /// Bytes of a read that chunks have covered.
    filled: u64,
    /// The ranges chunks covered (start -> end, relative to the request): a chunk that
    /// overlaps an earlier one is a protocol violation, else `filled` could reach the length
    /// with bytes never sent.
    covered: std::collections::BTreeMap<u64, u64>,
    extents: Option<ExtentList>,
    error: Option<ServerError>,
    /// Structured chunks have arrived (a simple reply is then a violation).
    chunked: bool,
    tx: Waiter,
    /// Held until the reply arrives, even if the caller gave up: the server still works on it.
    /// (A batch holds its requests' slots together, in its [`BatchWait`].)
    _slot: Option<OwnedSemaphorePermit>,
}

/// Who waits for a reply.
enum Waiter {
    /// One caller, on a channel of its own.
    One(Option<oneshot::Sender<Outcome>>),
    /// Entry `.1` of a batch, woken once its last reply is in.
    Batch(Option<(Arc<BatchWait>, usize)>),
}

impl Waiter {
    fn deliver(&mut self, outcome: Outcome) {
        match self {
            Waiter::One(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(outcome);
                }
            }
            Waiter::Batch(entry) => {
                if let Some((batch, index)) = entry.take() {
                    batch.deliver(index, outcome);
                }
            }
        }
    }
}

impl Drop for Waiter {
    /// A request dropped unanswered (its connection went away) must still count down its
    /// batch, or the batch would wait forever; a single caller sees its channel close.
    fn drop(&mut self) {
        if let Waiter::Batch(Some(_)) = self {
            self.deliver(Err(Failure::Dead("connection lost".into())));
        }
    }
}

/// The replies of a batch of requests, collected for one wake-up of its caller.
struct BatchWait {
    outcomes: Mutex<Vec<Option<Outcome>>>,
    remaining: AtomicUsize,
    done: Notify,
    /// The batch's slots, held until its last reply is in even if the caller gave up.
    _slots: OwnedSemaphorePermit,
}

impl BatchWait {
    fn deliver(&self, index: usize, outcome: Outcome) {
        self.outcomes.lock()[index] = Some(outcome);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Stores a permit if the caller is not waiting yet.
            self.done.notify_one();
        }
    }
}

impl Pending {
    /// A request about to go out, its reply to be delivered to `tx`.
    fn new(cmd: &Cmd, data: BytesMut, tx: Waiter, slot: Option<OwnedSemaphorePermit>) -> Self {
        Pending {
            kind: cmd.kind,
            offset: cmd.offset,
            len: cmd.len,
            data,
            filled: 0,
            covered: std::collections::BTreeMap::new(),
            extents: None,
            error: None,
            chunked: false,
            tx,
            _slot: slot,
        }
    }

    fn fail(mut self, failure: Failure) {
        self.tx.deliver(Err(failure));
    }

    /// Where the range `offset..offset+n` of a chunk lies in the request.
    fn locate(&self, offset: u64, n: u32) -> std::result::Result<usize, ConnError> {
        match offset.checked_sub(self.offset) {
            Some(rel)
                if rel
                    .checked_add(u64::from(n))
                    .is_some_and(|end| end <= u64::from(self.len)) =>
            {
                Ok(rel as usize)
            }
            _ => Err(ConnError::Protocol(format!(
                "chunk for {n} bytes at offset {offset} lies outside the request for {} bytes at {}",
                self.len, self.offset
            ))),
        }
    }

    /// Records that a chunk covered `start..start+n` of the request, refusing overlaps.
    fn cover(&mut self, start: usize, n: u32) -> std::result::Result<(), ConnError> {
        let (s, e) = (start as u64, start as u64 + u64::from(n));
        let before = self.covered.range(..e).next_back();
        if before.is_some_and(|(_, &end)| end > s) {
            return Err(ConnError::Protocol(format!(
                "read chunk for {n} bytes at request offset {s} overlaps an earlier chunk"
            )));
        }
        self.covered.insert(s, e);
        self.filled += u64::from(n);
        Ok(())
    }

    /// Checks that a finished reply is complete.
    fn validate(&self) -> std::result::Result<(), ConnError> {
        if self.error.is_some() {
            return Ok(());
        }
        if self.kind == CMD_READ && self.filled != u64::from(self.len) {
            return Err(ConnError::Protocol(format!(
                "read reply covers {} of {} bytes",
                self.filled, self.len
            )));
        }
        if self.kind == CMD_BLOCK_STATUS && self.extents.as_ref().is_none_or(|e| e.total() == 0) {
            return Err(ConnError::Protocol(
                "block-status reply without extents".into(),
            ));
        }
        Ok(())
    }

    fn complete(mut self) {
        let outcome = match self.error.take() {
            Some(e) => Err(Failure::Server(e)),
            None => Ok(Reply {
                data: std::mem::take(&mut self.data).freeze(),
                extents: self.extents.take().unwrap_or_default(),
            }),
        };
        self.tx.deliver(outcome);
    }
}

#[derive(Default)]
struct State {
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    /// Why the connection is unusable; set once.
    dead: Option<String>,
    /// [`NbdClient::disconnect`] has begun: no new requests.
    closing: bool,
    /// NBD_CMD_DISC is on its way, so the server hanging up is expected.
    disc_sent: bool,
}

/// What a frame queue entry asks the writer to do.
enum Outgoing {
    Request {
        frame: Bytes,
        payload: Option<Bytes>,
    },
    /// Requests (header, payload) that leave together.
    Batch(Vec<(Bytes, Bytes)>),
    /// Flush, shut the write side down and stop (after NBD_CMD_DISC).
    Close,
}

struct Shared {
    /// "NBD export 'x' at unix:/path", the prefix of every error's context.
    label: String,
    state: Mutex<State>,
    /// One permit per request in flight.
    slots: Arc<Semaphore>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    /// Stops the reader and writer tasks.
    stop: CancellationToken,
}

impl Shared {
    /// Files a request under a fresh cookie, unless the connection is closed.
    fn register(&self, p: Pending) -> std::result::Result<u64, String> {
        self.register_all(std::iter::once(p))
    }

    /// Files several requests under one lock; the first cookie is returned and the others
    /// follow it. Refused as a whole if the connection is closed.
    fn register_all(
        &self,
        ps: impl IntoIterator<Item = Pending>,
    ) -> std::result::Result<u64, String> {
        let mut st = self.state.lock();
        if let Some(reason) = &st.dead {
            return Err(reason.clone());
        }
        if st.closing {
            return Err("the client is disconnecting".into());
        }
        let first = st.next_cookie + 1;
        for p in ps {
            st.next_cookie += 1;
            let cookie = st.next_cookie;
            st.pending.insert(cookie, p);
        }
        Ok(first)
    }

    fn take(&self, cookie: u64) -> std::result::Result<Pending, ConnError> {
        let p = self.state.lock().pending.remove(&cookie);
        p.ok_or_else(|| ConnError::Protocol(format!("reply for unknown cookie {cookie:#x}")))
    }

    /// Returns a request whose reply goes on; fails it if the connection died meanwhile.
    fn put_back(&self, cookie: u64, p: Pending) {
        let mut st = self.state.lock();
        match &st.dead {
            Some(reason) => {
                let reason = reason.clone();
                drop(st);
                p.fail(Failure::Dead(reason));
            }
            None => {
                st.pending.insert(cookie, p);
            }
        }
    }

    /// Declares the connection dead: fails every pending request, stops both tasks.
    fn kill(&self, reason: impl Into<String>) {
        self.close(reason, true);
    }

    /// [`Shared::kill`], logging a warning only when `unexpected` (not for a client closing
    /// its own connection).
    fn close(&self, reason: impl Into<String>, unexpected: bool) {
        let (reason, pending, unexpected) = {
            let mut st = self.state.lock();
            let first = st.dead.is_none();
            if first {
                let reason = if st.disc_sent {
                    "the client disconnected".into()
                } else {
                    reason.into()
                };
                st.dead = Some(reason);
            }
            let unexpected = unexpected && first && !st.disc_sent;
            (
                st.dead.clone().unwrap_or_default(),
                std::mem::take(&mut st.pending),
                unexpected,
            )
        };
        if unexpected {
            warn!("{}: connection closed: {reason}", self.label);
        }
        self.slots.close();
        self.stop.cancel();
        for (_, p) in pending {
            p.fail(Failure::Dead(reason.clone()));
        }
    }

    fn dead_reason(&self) -> Option<String> {
        self.state.lock().dead.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Reader and writer tasks
// ---------------------------------------------------------------------------------------------

/// Why the reader gave up on the connection.
#[derive(Debug)]
enum ConnError {
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
struct Session {
    structured: bool,
    meta_id: Option<u32>,
}

/// The reader task: parses replies and completes their requests.
struct ReplyReader<R> {
    r: R,
    shared: Arc<Shared>,
    session: Session,
    /// The request whose reply is being read (out of the map meanwhile).
    current: Option<Pending>,
}

impl<R: AsyncRead + Unpin> ReplyReader<R> {
    async fn run(mut self) {
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
        } else if p.kind == CMD_READ {
            self.r.read_exact(&mut p.data).await?;
            p.filled = u64::from(p.len);
        } else if p.kind == CMD_BLOCK_STATUS {
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
    if p.kind != CMD_READ {
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
    if p.kind != CMD_READ || len != 12 {
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
    if p.kind != CMD_BLOCK_STATUS || p.extents.is_some() {
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
    p.extents = Some(parse_extents(&body, u64::from(p.len)));
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

/// The writer task: sends frames in queue order, gathering every frame queued meanwhile into
/// one vectored send, so that pipelined requests share system calls and payloads are not
/// copied on their way to the socket.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    let mut pieces: Vec<Bytes> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Outgoing::Request { frame, payload } => {
                    pieces.push(frame);
                    pieces.extend(payload);
                }
                Outgoing::Batch(frames) => {
                    for (frame, payload) in frames {
                        pieces.push(frame);
                        pieces.push(payload);
                    }
                }
                Outgoing::Close => {
                    send_pieces(&mut w, &mut pieces).await?;
                    w.flush().await?;
                    return w.shutdown().await;
                }
            }
            next = rx.try_recv().ok();
        }
        send_pieces(&mut w, &mut pieces).await?;
    }
    w.flush().await
}

/// Most slices one vectored send takes (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Writes every piece in order with vectored sends, then empties the list. A stream without
/// vectored writes (an in-memory pipe given to [`NbdClient::from_stream`]) gets the pieces
/// copied into one buffer instead, so that frames still share a write.
async fn send_pieces<W: AsyncWrite + Unpin>(w: &mut W, pieces: &mut Vec<Bytes>) -> io::Result<()> {
    if !w.is_write_vectored() && pieces.len() > 1 {
        let mut joined = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
        pieces.iter().for_each(|p| joined.extend_from_slice(p));
        pieces.clear();
        pieces.push(joined.freeze());
    }
    let mut start = 0;
    loop {
        while start < pieces.len() && pieces[start].is_empty() {
            start += 1;
        }
        if start == pieces.len() {
            break;
        }
        let slices: Vec<io::IoSlice<'_>> = pieces[start..]
            .iter()
            .take(MAX_IOVECS)
            .map(|p| io::IoSlice::new(p))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = pieces[start].len().min(n);
            pieces[start].advance(len);
            n -= len;
            if pieces[start].is_empty() {
                start += 1;
            }
        }
    }
    pieces.clear();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// One request as the caller sees it.
#[derive(Debug, Clone, Copy)]
struct Cmd {
    op: Op,
    kind: u16,
    flags: u16,
    offset: u64,
    len: u32,
}

impl Cmd {
    /// Its header on the wire, under `cookie`.
    fn request(&self, cookie: u64) -> Request {
        Request {
            flags: self.flags,
            kind: self.kind,
            cookie,
            offset: self.offset,
            length: self.len,
        }
    }
}

/// An NBD connection to one export; also a [`BlockDev`].
///
/// Share it as `Arc<NbdClient>` (or `Arc<dyn BlockDev>`): every method takes `&self`, and
/// concurrent calls are pipelined on the one connection. Dropping it closes the connection
/// abruptly; [`NbdClient::disconnect`] closes it politely.
pub struct NbdClient {
    shared: Arc<Shared>,
    info: ExportInfo,
    config: ClientConfig,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("label", &self.shared.label)
            .field("info", &self.info)
            .field("dead", &self.shared.dead_reason())
            .finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.shared.close("the client was dropped", false);
    }
}

fn connect_error(e: io::Error, label: &str) -> BlockError {
    let detail = format!("{label}: cannot connect: {e}");
    match e.kind() {
        io::ErrorKind::TimedOut => BlockError::new(ErrorKind::TimedOut, Op::Open, 0),
        _ => BlockError::from_io(e, Op::Open, 0),
    }
    .context(detail)
}

/// Opens the socket, split so that the reader and writer tasks each own a half.
async fn open_socket(addr: &SocketAddr) -> io::Result<(BoxRead, BoxWrite)> {
    match addr {
        SocketAddr::Unix(path) => {
            let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        SocketAddr::Tcp { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            // Request headers are small; waiting to coalesce them only adds latency.
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

impl NbdClient {
    /// Connects to `addr` and opens `export` (the empty name is the server's default export).
    pub async fn connect(
        addr: &SocketAddr,
        export: &str,
        config: ClientConfig,
    ) -> Result<NbdClient> {
        let label = format!("NBD export '{export}' at {addr}");
        let opened = match config.handshake_timeout {
            None => open_socket(addr).await,
            Some(d) => tokio::time::timeout(d, open_socket(addr))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        };
        let (r, w) = opened.map_err(|e| connect_error(e, &label))?;
        Self::start(r, w, export, config, label).await
    }

    /// Connects to an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`).
    pub async fn connect_uri(uri: &str, config: ClientConfig) -> Result<NbdClient> {
        let uri: NbdUri = uri.parse().map_err(|e: crate::uri::UriError| {
            BlockError::new(ErrorKind::InvalidArgument, Op::Open, 0).context(e.to_string())
        })?;
        Self::connect(&uri.addr, &uri.export, config).await
    }

    /// Negotiates over an already connected byte stream (tunnels, tests).
    pub async fn from_stream<S>(stream: S, export: &str, config: ClientConfig) -> Result<NbdClient>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::start(r, w, export, config, format!("NBD export '{export}'")).await
    }

    async fn start<R, W>(
        r: R,
        mut w: W,
        export: &str,
        config: ClientConfig,
        label: String,
    ) -> Result<NbdClient>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // The reader keeps this BufReader: bytes it buffered during the handshake are replies.
        let mut r = BufReader::with_capacity(READ_BUFFER, r);
        let info = bounded(
            config.handshake_timeout,
            negotiate(&mut r, &mut w, export, &config),
        )
        .await
        .map_err(|e| e.into_block_error(&label))?;
        debug!(
            "{label}: connected, {} bytes, flags {:#x}, structured {}, base:allocation {:?}",
            info.size, info.flags, info.structured_replies, info.base_allocation
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            label,
            state: Mutex::new(State::default()),
            slots: Arc::new(Semaphore::new(config.in_flight())),
            outgoing: tx,
            stop: CancellationToken::new(),
        });
        let session = Session {
            structured: info.structured_replies,
            meta_id: info.base_allocation,
        };
        let reader = ReplyReader {
            r,
            shared: shared.clone(),
            session,
            current: None,
        };
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = reader.run() => {}
            }
        });
        let (stop, sh) = (shared.stop.clone(), shared.clone());
        let writer = tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                r = write_frames(w, &mut rx) => if let Err(e) = r {
                    sh.kill(format!("sending to the server failed: {e}"));
                },
            }
        });
        Ok(NbdClient {
            shared,
            info,
            config,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// What negotiation settled (size, flags, block sizes, contexts).
    pub fn export_info(&self) -> &ExportInfo {
        &self.info
    }

    /// The connection can still take requests.
    pub fn is_alive(&self) -> bool {
        let st = self.shared.state.lock();
        st.dead.is_none() && !st.closing
    }

    /// Why the connection is closed, once it is.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.dead_reason()
    }

    /// Discards `offset..offset+len`; with `fua` the discard is durable on return. A no-op when
    /// the server does not advertise trim (discarded content is unspecified anyway).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check(Op::Discard, offset, len, true)?;
        if len == 0 || !self.info.can_trim() {
            return Ok(());
        }
        let wire_fua = fua && self.info.can_fua();
        let flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        self.for_each_span(offset, len, SPAN_LIMIT, |o, l| {
            self.command(Op::Discard, CMD_TRIM, flags, o, l)
        })
        .await?;
        self.emulate_fua(fua && !wire_fua).await
    }

    /// Asks the server to prefetch `offset..offset+len` (advisory: a no-op without server
    /// support).
    pub async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check(Op::Read, offset, len, false)?;
        if len == 0 || !self.info.can_cache() {
            return Ok(());
        }
        let limit = self.info.max_payload();
        self.for_each_span(offset, len, limit, |o, l| {
            self.command(Op::Read, CMD_CACHE, 0, o, l)
        })
        .await
    }

    /// Allocation status from `offset`: at least one byte and at most `len` bytes (at most
    /// 1 GiB per call) are described. With `req_one` the server describes just one extent.
    /// Without a `base:allocation` context everything reads as allocated data.
    pub async fn block_status_with(
        &self,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<ExtentList> {
        self.check(Op::BlockStatus, offset, len, false)?;
        if len == 0 {
            return Ok(ExtentList::new());
        }
        let len = len.min(u64::from(SPAN_LIMIT)) as u32;
        if self.info.base_allocation.is_none() {
            return Ok(ExtentList(vec![Extent::data(u64::from(len))]));
        }
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let cmd = Cmd {
            op: Op::BlockStatus,
            kind: CMD_BLOCK_STATUS,
            flags,
            offset,
            len,
        };
        let mut extents = self.submit(cmd, None).await?.extents;
        if req_one {
            extents.0.truncate(1);
        }
        Ok(extents)
    }

    /// Closes the connection politely: new requests are refused, requests in flight finish
    /// (each within the request timeout), NBD_CMD_DISC is sent and the socket shut down.
    pub async fn disconnect(&self) {
        {
            let mut st = self.shared.state.lock();
            if st.dead.is_some() || st.closing {
                return;
            }
            st.closing = true;
        }
        let all = self.config.in_flight() as u32;
        if let Ok(_all) = self.shared.slots.acquire_many(all).await {
            self.send_disconnect().await;
        }
        self.shared.close("the client disconnected", false);
    }

    async fn send_disconnect(&self) {
        let cookie = {
            let mut st = self.shared.state.lock();
            st.disc_sent = true;
            st.next_cookie += 1;
            st.next_cookie
        };
        let mut frame = BytesMut::with_capacity(REQUEST_LEN);
        Request {
            flags: 0,
            kind: CMD_DISC,
            cookie,
            offset: 0,
            length: 0,
        }
        .encode(&mut frame);
        let _ = self.shared.outgoing.send(Outgoing::Request {
            frame: frame.freeze(),
            payload: None,
        });
        let _ = self.shared.outgoing.send(Outgoing::Close);
        let writer = self.writer.lock().take();
        if let Some(w) = writer {
            let _ = tokio::time::timeout(DISCONNECT_GRACE, w).await;
        }
    }

    // --- request plumbing ---

    /// Sends one request and waits for its reply.
    async fn submit(&self, cmd: Cmd, payload: Option<Bytes>) -> Result<Reply> {
        let slot = self
            .shared
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.dead_error(&cmd))?;
        let (tx, rx) = oneshot::channel();
        let data = if cmd.kind == CMD_READ {
            BytesMut::zeroed(cmd.len as usize)
        } else {
            BytesMut::new()
        };
        let pending = Pending::new(&cmd, data, Waiter::One(Some(tx)), Some(slot));
        let cookie = self
            .shared
            .register(pending)
            .map_err(|reason| self.shutdown_error(&cmd, &reason))?;
        let mut frame = BytesMut::with_capacity(REQUEST_LEN);
        cmd.request(cookie).encode(&mut frame);
        if self
            .shared
            .outgoing
            .send(Outgoing::Request {
                frame: frame.freeze(),
                payload,
            })
            .is_err()
        {
            self.shared.kill("the writer task is gone");
            return Err(self.dead_error(&cmd));
        }
        self.wait(&cmd, rx).await
    }

    async fn wait(&self, cmd: &Cmd, rx: oneshot::Receiver<Outcome>) -> Result<Reply> {
        let outcome = match self.config.request_timeout {
            None => rx.await,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(outcome) => outcome,
                Err(_) => return Err(self.timed_out(cmd, limit)),
            },
        };
        self.settle(cmd, outcome.ok())
    }

    /// What a caller gets for a request's outcome (`None`: the request was dropped unanswered).
    fn settle(&self, cmd: &Cmd, outcome: Option<Outcome>) -> Result<Reply> {
        match outcome {
            Some(Ok(reply)) => Ok(reply),
            Some(Err(Failure::Server(e))) => Err(self.server_error(cmd, e)),
            Some(Err(Failure::Dead(reason))) => Err(self.shutdown_error(cmd, &reason)),
            None => Err(self.dead_error(cmd)),
        }
    }

    /// [`BlockDev::write_batch`]: writes that fit one request each leave as one run of frames
    /// per [`ClientConfig::max_in_flight`] of them, and their caller is woken once per run;
    /// writes outside the export or to a read-only one fail here without a request, and the
    /// rest (empty, split or FUA-emulated writes) take the usual path alongside. The whole
    /// batch answers when its slowest write has.
    async fn write_burst(&self, writes: Vec<BatchWrite>) -> Vec<Result<()>> {
        let limit = self.info.max_payload() as usize;
        let mut results: Vec<Option<Result<()>>> = (0..writes.len()).map(|_| None).collect();
        let mut framed = Vec::new();
        let mut others = Vec::new();
        for (i, w) in writes.into_iter().enumerate() {
            let one_frame = !w.data.is_empty()
                && w.data.len() <= limit
                && (!w.flags.fua || self.info.can_fua());
            if !one_frame {
                others.push((i, w));
                continue;
            }
            match self.check(Op::Write, w.offset, w.data.len() as u64, true) {
                Ok(()) => framed.push((i, w)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let runs = framed
            .chunks(self.config.in_flight())
            .map(|run| self.write_run(run));
        let singles = others.iter().map(|(i, w)| async move {
            (
                *i,
                self.write_range(w.offset, w.data.clone(), w.flags.fua)
                    .await,
            )
        });
        let (runs, singles) = futures::future::join(
            futures::future::join_all(runs),
            futures::future::join_all(singles),
        )
        .await;
        for (i, r) in runs.into_iter().flatten().chain(singles) {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.expect("every write of a batch has a result"))
            .collect()
    }

    /// Sends single-frame writes together (at most the connection's slots) and waits for all
    /// their replies, with one timer for the run.
    async fn write_run(&self, run: &[(usize, BatchWrite)]) -> Vec<(usize, Result<()>)> {
        let cmds: Vec<Cmd> = run
            .iter()
            .map(|(_, w)| Cmd {
                op: Op::Write,
                kind: CMD_WRITE,
                flags: if w.flags.fua { CMD_FLAG_FUA } else { 0 },
                offset: w.offset,
                len: w.data.len() as u32,
            })
            .collect();
        let fail_all = |e: &dyn Fn(&Cmd) -> BlockError| {
            run.iter()
                .zip(&cmds)
                .map(|((i, _), c)| (*i, Err(e(c))))
                .collect::<Vec<_>>()
        };
        let Ok(slots) = self
            .shared
            .slots
            .clone()
            .acquire_many_owned(run.len() as u32)
            .await
        else {
            return fail_all(&|c| self.dead_error(c));
        };
        let wait = Arc::new(BatchWait {
            outcomes: Mutex::new((0..run.len()).map(|_| None).collect()),
            remaining: AtomicUsize::new(run.len()),
            done: Notify::new(),
            _slots: slots,
        });
        let pending = cmds.iter().enumerate().map(|(j, c)| {
            let tx = Waiter::Batch(Some((wait.clone(), j)));
            Pending::new(c, BytesMut::new(), tx, None)
        });
        let first = match self.shared.register_all(pending) {
            Ok(first) => first,
            Err(reason) => return fail_all(&|c| self.shutdown_error(c, &reason)),
        };
        let mut headers = BytesMut::with_capacity(REQUEST_LEN * run.len());
        for (cookie, c) in (first..).zip(&cmds) {
            c.request(cookie).encode(&mut headers);
        }
        let mut headers = headers.freeze();
        let frames = run
            .iter()
            .map(|(_, w)| (headers.split_to(REQUEST_LEN), w.data.clone()))
            .collect();
        if self.shared.outgoing.send(Outgoing::Batch(frames)).is_err() {
            self.shared.kill("the writer task is gone");
            return fail_all(&|c| self.dead_error(c));
        }
        let answered = match self.config.request_timeout {
            None => {
                wait.done.notified().await;
                true
            }
            Some(limit) => tokio::time::timeout(limit, wait.done.notified())
                .await
                .is_ok(),
        };
        // Replaced, not emptied: replies that lose the race with the timer still find a slot.
        let outcomes = std::mem::replace(
            &mut *wait.outcomes.lock(),
            (0..run.len()).map(|_| None).collect(),
        );
        run.iter()
            .zip(&cmds)
            .zip(outcomes)
            .map(|(((i, _), c), outcome)| {
                let r = match (outcome, self.config.request_timeout) {
                    (None, Some(limit)) if !answered => Err(self.timed_out(c, limit)),
                    (outcome, _) => self.settle(c, outcome).map(|_| ()),
                };
                (*i, r)
            })
            .collect()
    }

    /// A request with no payload and no reply data.
    async fn command(&self, op: Op, kind: u16, flags: u16, offset: u64, len: u32) -> Result<()> {
        self.submit(
            Cmd {
                op,
                kind,
                flags,
                offset,
                len,
            },
            None,
        )
        .await
        .map(|_| ())
    }

    async fn read_one(&self, offset: u64, len: u32) -> Result<Bytes> {
        let cmd = Cmd {
            op: Op::Read,
            kind: CMD_READ,
            flags: 0,
            offset,
            len,
        };
        Ok(self.submit(cmd, None).await?.data)
    }

    async fn write_one(&self, op: Op, offset: u64, data: Bytes, flags: u16) -> Result<()> {
        let cmd = Cmd {
            op,
            kind: CMD_WRITE,
            flags,
            offset,
            len: data.len() as u32,
        };
        self.submit(cmd, Some(data)).await.map(|_| ())
    }

    /// Runs `f` on each part of a range split at `limit`, a few parts at a time.
    async fn for_each_span<'a, F, Fut>(
        &'a self,
        offset: u64,
        len: u64,
        limit: u32,
        f: F,
    ) -> Result<()>
    where
        F: FnMut(u64, u32) -> Fut,
        Fut: Future<Output = Result<()>> + 'a,
    {
        let mut f = f;
        // Every part runs to its end (reply or its own timeout) even when another failed: a
        // part dropped half-way would keep its slot with nobody left to time it out.
        let results: Vec<Result<()>> = stream::iter(spans(offset, len, limit))
            .map(|(o, l)| f(o, l))
            .buffer_unordered(SPLIT_PARALLELISM)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Makes preceding writes durable where the server could not take FUA on the request.
    async fn emulate_fua(&self, needed: bool) -> Result<()> {
        if needed {
            self.flush_writes().await
        } else {
            Ok(())
        }
    }

    async fn flush_writes(&self) -> Result<()> {
        if !self.info.can_flush() {
            return Ok(());
        }
        self.command(Op::Flush, CMD_FLUSH, 0, 0, 0).await
    }

    async fn read_range(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(Op::Read, offset, len as u64, false)?;
        let limit = self.info.max_payload();
        if len == 0 {
            return Ok(Bytes::new());
        }
        if len <= limit as usize {
            return self.read_one(offset, len as u32).await;
        }
        // As in for_each_span: wait for every part, then report the first failure.
        let parts: Vec<Result<Bytes>> = stream::iter(spans(offset, len as u64, limit))
            .map(|(o, l)| self.read_one(o, l))
            .buffered(SPLIT_PARALLELISM)
            .collect()
            .await;
        let parts = parts.into_iter().collect::<Result<Vec<Bytes>>>()?;
        let mut out = BytesMut::with_capacity(len);
        parts.iter().for_each(|p| out.extend_from_slice(p));
        Ok(out.freeze())
    }

    async fn write_range(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check(Op::Write, offset, data.len() as u64, true)?;
        let wire_fua = fua && self.info.can_fua();
        let flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        let data = &data;
        self.for_each_span(
            offset,
            data.len() as u64,
            self.info.max_payload(),
            |o, l| {
                let start = (o - offset) as usize;
                self.write_one(Op::Write, o, data.slice(start..start + l as usize), flags)
            },
        )
        .await?;
        self.emulate_fua(fua && !wire_fua).await
    }

    async fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(Op::WriteZeroes, offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        if !self.info.can_write_zeroes() {
            return self.zero_by_writing(offset, len, flags).await;
        }
        if flags.fast_only && !self.info.can_fast_zero() {
            return Err(self.local_error(
                ErrorKind::NotSupported,
                Op::WriteZeroes,
                offset,
                "no fast zeroing",
            ));
        }
        let wire_fua = flags.fua && self.info.can_fua();
        let mut cmd_flags = 0;
        if wire_fua {
            cmd_flags |= CMD_FLAG_FUA;
        }
        if !flags.may_unmap {
            cmd_flags |= CMD_FLAG_NO_HOLE;
        }
        if flags.fast_only {
            cmd_flags |= CMD_FLAG_FAST_ZERO;
        }
        self.for_each_span(offset, len, SPAN_LIMIT, |o, l| {
            self.command(Op::WriteZeroes, CMD_WRITE_ZEROES, cmd_flags, o, l)
        })
        .await?;
        self.emulate_fua(flags.fua && !wire_fua).await
    }

    /// Write-zeroes for servers without NBD_CMD_WRITE_ZEROES: zero buffers on the wire.
    async fn zero_by_writing(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast_only {
            let why = "the server cannot write zeroes, and writing zero buffers is not fast";
            return Err(self.local_error(ErrorKind::NotSupported, Op::WriteZeroes, offset, why));
        }
        let wire_fua = flags.fua && self.info.can_fua();
        let cmd_flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        let chunk = self.info.max_payload().min(ZERO_CHUNK);
        self.for_each_span(offset, len, chunk, |o, l| {
            self.write_one(
                Op::WriteZeroes,
                o,
                Bytes::from_static(&ZEROES[..l as usize]),
                cmd_flags,
            )
        })
        .await?;
        self.emulate_fua(flags.fua && !wire_fua).await
    }

    // --- errors ---

    /// Refuses requests the server would refuse anyway, without a round trip.
    fn check(&self, op: Op, offset: u64, len: u64, writes: bool) -> Result<()> {
        if writes && self.info.read_only() {
            return Err(self.local_error(
                ErrorKind::ReadOnly,
                op,
                offset,
                "the export is read-only",
            ));
        }
        blockdev::check_range(op, offset, len, self.info.size).map_err(|e| {
            let detail = e.context.clone().unwrap_or_default();
            e.context(format!("{}: {detail}", self.shared.label))
        })
    }

    fn local_error(&self, kind: ErrorKind, op: Op, offset: u64, detail: &str) -> BlockError {
        BlockError::new(kind, op, offset).context(format!("{}: {detail}", self.shared.label))
    }

    fn shutdown_error(&self, cmd: &Cmd, reason: &str) -> BlockError {
        let detail = format!("connection closed: {reason}");
        self.local_error(ErrorKind::Shutdown, cmd.op, cmd.offset, &detail)
    }

    fn dead_error(&self, cmd: &Cmd) -> BlockError {
        let reason = self
            .shared
            .dead_reason()
            .unwrap_or_else(|| "connection lost".into());
        self.shutdown_error(cmd, &reason)
    }

    /// Fails a request that got no reply in time, and the connection with it: the server may
    /// still act on the request, so nothing later on this connection could be trusted.
    fn timed_out(&self, cmd: &Cmd, limit: Duration) -> BlockError {
        let reason = format!(
            "{} of {} bytes at offset {} got no reply within {limit:?}",
            cmd.op, cmd.len, cmd.offset
        );
        self.shared.kill(reason.clone());
        self.local_error(ErrorKind::TimedOut, cmd.op, cmd.offset, &reason)
    }

    fn server_error(&self, cmd: &Cmd, e: ServerError) -> BlockError {
        let mut detail = format!("server replied {}", errno_name(e.errno));
        if let Some(m) = &e.message {
            detail.push_str(": ");
            detail.push_str(m);
        }
        self.local_error(
            errno_kind(e.errno),
            cmd.op,
            e.offset.unwrap_or(cmd.offset),
            &detail,
        )
    }
}

/// Maps an NBD error onto the block layer's kinds.
fn errno_kind(errno: u32) -> ErrorKind {
    match errno {
        EPERM => ErrorKind::ReadOnly,
        ENOSPC => ErrorKind::NoSpace,
        EINVAL => ErrorKind::InvalidArgument,
        ENOTSUP => ErrorKind::NotSupported,
        ESHUTDOWN => ErrorKind::Shutdown,
        e => ErrorKind::Io(Some(e as i32)),
    }
}

fn errno_name(errno: u32) -> String {
    match errno {
        EPERM => "EPERM".into(),
        EIO => "EIO".into(),
        ENOMEM => "ENOMEM".into(),
        EINVAL => "EINVAL".into(),
        ENOSPC => "ENOSPC".into(),
        EOVERFLOW => "EOVERFLOW".into(),
        ENOTSUP => "ENOTSUP".into(),
        ESHUTDOWN => "ESHUTDOWN".into(),
        e => format!("errno {e}"),
    }
}

/// Splits `offset..offset+len` into parts of at most `limit` bytes.
fn spans(offset: u64, len: u64, limit: u32) -> impl Iterator<Item = (u64, u32)> {
    let limit = u64::from(limit.max(1));
    (0..len.div_ceil(limit)).map(move |i| {
        let start = i * limit;
        (offset + start, (len - start).min(limit) as u32)
    })
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

#[async_trait]
impl BlockDev for NbdClient {
    fn info(&self) -> DevInfo {
        self.info.dev_info()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.read_range(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.write_range(offset, data, flags.fua).await
    }

    async fn write_batch(&self, writes: Vec<BatchWrite>) -> Vec<Result<()>> {
        self.write_burst(writes).await
    }

    async fn flush(&self) -> Result<()> {
        self.flush_writes().await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.zero_range(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.trim(offset, len, false).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        self.block_status_with(offset, len, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// What the scripted server advertises.
    #[derive(Clone, Copy)]
    struct Offer {
        size: u64,
        flags: u16,
        block_size: Option<(u32, u32, u32)>,
        go_unsupported: bool,
    }

    const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO
        | FLAG_SEND_CACHE;
    const META_ID: u32 = 7;

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

    async fn read_option(s: &mut DuplexStream) -> (u32, Bytes) {
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        let option = s.read_u32().await.unwrap();
        let mut data = vec![0; s.read_u32().await.unwrap() as usize];
        s.read_exact(&mut data).await.unwrap();
        (option, data.into())
    }

    async fn reply(s: &mut DuplexStream, option: u32, kind: u32, data: &[u8]) {
        let mut out = BytesMut::new();
        option_reply(&mut out, option, kind, data);
        s.write_all(&out).await.unwrap();
    }

    /// The server's half of a fixed-newstyle handshake.
    async fn serve_handshake(s: &mut DuplexStream, offer: Offer) {
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

    fn config() -> ClientConfig {
        ClientConfig {
            request_timeout: Some(Duration::from_secs(5)),
            ..ClientConfig::default()
        }
    }

    /// A client connected to a scripted server; the test plays the server on the stream.
    async fn pair(offer: Offer, config: ClientConfig) -> (Arc<NbdClient>, DuplexStream) {
        let (c, mut s) = tokio::io::duplex(4 << 20);
        let server = tokio::spawn(async move {
            serve_handshake(&mut s, offer).await;
            s
        });
        let client = NbdClient::from_stream(c, "disk", config).await.unwrap();
        (Arc::new(client), server.await.unwrap())
    }

    async fn read_request(s: &mut DuplexStream) -> (Request, Bytes) {
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

    async fn send_chunk(s: &mut DuplexStream, flags: u16, kind: u16, cookie: u64, body: &[u8]) {
        let mut out = BytesMut::new();
        chunk_header(&mut out, flags, kind, cookie, body.len() as u32);
        out.put_slice(body);
        s.write_all(&out).await.unwrap();
    }

    async fn send_data(s: &mut DuplexStream, cookie: u64, offset: u64, data: &[u8], done: bool) {
        let mut body = BytesMut::new();
        body.put_u64(offset);
        body.put_slice(data);
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        send_chunk(s, flags, REPLY_TYPE_OFFSET_DATA, cookie, &body).await;
    }

    async fn send_simple(s: &mut DuplexStream, error: u32, cookie: u64) {
        let mut out = BytesMut::new();
        simple_reply(&mut out, error, cookie);
        s.write_all(&out).await.unwrap();
    }

    fn spawn_read(c: &Arc<NbdClient>, offset: u64, len: usize) -> JoinHandle<Result<Bytes>> {
        let c = c.clone();
        tokio::spawn(async move { c.read(offset, len).await })
    }

    #[tokio::test]
    async fn handshake_records_size_flags_and_block_sizes() {
        let offer = Offer {
            block_size: Some((512, 4096, 65536)),
            ..Offer::default()
        };
        let (c, _s) = pair(offer, config()).await;
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

    #[tokio::test]
    async fn simple_error_reply_maps_errno() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        for (errno, kind) in [
            (EPERM, ErrorKind::ReadOnly),
            (EINVAL, ErrorKind::InvalidArgument),
            (ENOTSUP, ErrorKind::NotSupported),
            (EIO, ErrorKind::Io(Some(5))),
            (ENOMEM, ErrorKind::Io(Some(12))),
        ] {
            let read = spawn_read(&c, 0, 512);
            let (r, _) = read_request(&mut s).await;
            send_simple(&mut s, errno, r.cookie).await;
            assert_eq!(read.await.unwrap().unwrap_err().kind, kind);
        }
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
    async fn timeout_fails_the_request_and_closes_the_connection() {
        let config = ClientConfig {
            request_timeout: Some(Duration::from_millis(100)),
            ..config()
        };
        let (c, mut s) = pair(Offer::default(), config).await;
        let slow = spawn_read(&c, 0, 16);
        let other = spawn_read(&c, 16, 16);
        read_request(&mut s).await;
        read_request(&mut s).await;
        let errs = [
            slow.await.unwrap().unwrap_err(),
            other.await.unwrap().unwrap_err(),
        ];
        assert!(
            errs.iter().any(|e| e.kind == ErrorKind::TimedOut),
            "{errs:?}"
        );
        assert!(!c.is_alive());
        let started = std::time::Instant::now();
        assert_eq!(c.flush().await.unwrap_err().kind, ErrorKind::Shutdown);
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn large_reads_and_writes_are_split_at_the_maximum_block_size() {
        let offer = Offer {
            block_size: Some((512, 4096, 65536)),
            ..Offer::default()
        };
        let (c, mut s) = pair(offer, config()).await;
        let c2 = c.clone();
        let data = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let expect = data.clone();
        let write = tokio::spawn(async move { c2.write(0, data, WriteFlags::default()).await });
        let mut got = vec![0; 200_000];
        for _ in 0..4 {
            let (r, payload) = read_request(&mut s).await;
            assert!(r.length <= 65536 && r.offset % 65536 == 0);
            got[r.offset as usize..][..payload.len()].copy_from_slice(&payload);
            send_simple(&mut s, 0, r.cookie).await;
        }
        write.await.unwrap().unwrap();
        assert_eq!(got, expect);
    }

    #[tokio::test]
    async fn write_zeroes_without_server_support_writes_zero_buffers() {
        let offer = Offer {
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
            ..Offer::default()
        };
        let (c, mut s) = pair(offer, config()).await;
        let c2 = c.clone();
        let zero =
            tokio::spawn(async move { c2.write_zeroes(8192, 3000, ZeroFlags::default()).await });
        let (r, payload) = read_request(&mut s).await;
        assert_eq!((r.kind, r.offset, payload.len()), (CMD_WRITE, 8192, 3000));
        assert!(payload.iter().all(|&b| b == 0));
        send_simple(&mut s, 0, r.cookie).await;
        zero.await.unwrap().unwrap();
        let fast = ZeroFlags {
            fast_only: true,
            ..ZeroFlags::default()
        };
        assert_eq!(
            c.write_zeroes(0, 512, fast).await.unwrap_err().kind,
            ErrorKind::NotSupported
        );
    }

    #[tokio::test]
    async fn write_zeroes_sends_no_hole_unless_unmap_is_allowed() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        for (flags, want) in [
            (ZeroFlags::default(), CMD_FLAG_NO_HOLE),
            (
                ZeroFlags {
                    may_unmap: true,
                    ..ZeroFlags::default()
                },
                0,
            ),
            (
                ZeroFlags {
                    may_unmap: true,
                    fast_only: true,
                    fua: true,
                },
                CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
            ),
        ] {
            let c2 = c.clone();
            let zero = tokio::spawn(async move { c2.write_zeroes(0, 4096, flags).await });
            let (r, _) = read_request(&mut s).await;
            assert_eq!((r.kind, r.flags), (CMD_WRITE_ZEROES, want));
            send_simple(&mut s, 0, r.cookie).await;
            zero.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn trim_without_server_support_is_a_no_op() {
        let offer = Offer {
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
            ..Offer::default()
        };
        let (c, mut s) = pair(offer, config()).await;
        c.discard(0, 4096).await.unwrap();
        let c2 = c.clone();
        let flush = tokio::spawn(async move { c2.flush().await });
        let (r, _) = read_request(&mut s).await;
        assert_eq!(r.kind, CMD_FLUSH, "the trim must not reach the server");
        send_simple(&mut s, 0, r.cookie).await;
        flush.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn fua_without_server_support_becomes_a_flush() {
        let offer = Offer {
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
            ..Offer::default()
        };
        let (c, mut s) = pair(offer, config()).await;
        let c2 = c.clone();
        let write = tokio::spawn(async move {
            c2.write(0, Bytes::from_static(b"d"), WriteFlags { fua: true })
                .await
        });
        let (r, _) = read_request(&mut s).await;
        assert_eq!((r.kind, r.flags), (CMD_WRITE, 0));
        send_simple(&mut s, 0, r.cookie).await;
        let (r, _) = read_request(&mut s).await;
        assert_eq!(r.kind, CMD_FLUSH);
        send_simple(&mut s, 0, r.cookie).await;
        write.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn read_only_exports_refuse_writes_locally() {
        let offer = Offer {
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
            ..Offer::default()
        };
        let (c, _s) = pair(offer, config()).await;
        let err = c
            .write(0, Bytes::from_static(b"x"), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::ReadOnly);
        assert_eq!(
            c.read(1 << 20, 1).await.unwrap_err().kind,
            ErrorKind::OutOfRange
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

    #[tokio::test]
    async fn dropping_a_request_future_leaves_the_connection_usable() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        let abandoned = spawn_read(&c, 0, 4);
        let (r1, _) = read_request(&mut s).await;
        abandoned.abort();
        let _ = abandoned.await;
        send_data(&mut s, r1.cookie, 0, b"late", true).await;
        let read = spawn_read(&c, 4, 4);
        let (r2, _) = read_request(&mut s).await;
        send_data(&mut s, r2.cookie, 4, b"next", true).await;
        assert_eq!(&read.await.unwrap().unwrap()[..], b"next");
        assert!(c.is_alive());
    }

    #[tokio::test]
    async fn disconnect_sends_disc_and_refuses_later_requests() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        c.disconnect().await;
        let (r, _) = read_request(&mut s).await;
        assert_eq!(r.kind, CMD_DISC);
        assert_eq!(
            s.read_u8().await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let err = c.flush().await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Shutdown);
        assert!(err.to_string().contains("client disconnected"), "{err}");
    }

    #[tokio::test]
    async fn more_requests_than_slots_wait_for_a_free_slot() {
        let config = ClientConfig {
            max_in_flight: 2,
            ..config()
        };
        let (c, mut s) = pair(Offer::default(), config).await;
        let reads: Vec<_> = (0..5).map(|i| spawn_read(&c, i * 8, 8)).collect();
        for _ in 0..5 {
            let (r, _) = read_request(&mut s).await;
            let data = [r.offset as u8; 8];
            send_data(&mut s, r.cookie, r.offset, &data, true).await;
        }
        for (i, read) in reads.into_iter().enumerate() {
            assert_eq!(&read.await.unwrap().unwrap()[..], &[(i * 8) as u8; 8]);
        }
    }

    /// A little xorshift generator, so the garbage test is reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
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
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
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

    #[test]
    fn spans_cover_the_range_in_order() {
        let v: Vec<_> = spans(10, 25, 10).collect();
        assert_eq!(v, vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(spans(0, 0, 10).count(), 0);
    }

    #[test]
    fn invalid_block_sizes_are_refused() {
        assert!(block_size(512, 4096, 1 << 25).is_ok());
        assert!(block_size(3, 4096, 1 << 25).is_err());
        assert!(block_size(1 << 17, 1 << 17, 1 << 25).is_err());
        assert!(block_size(4096, 4096, 512).is_err());
    }
}

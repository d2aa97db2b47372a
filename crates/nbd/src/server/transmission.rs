//! The transmission phase: reading requests, running them, writing replies, within the
//! connection's and the server's payload budgets.

use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::budget::{Activity, Allowance, ConnBudget, Direction, Lease, PayloadBudget};
use super::command::{Outcome, execute, frame};
use super::{ConnError, Server, Session};
use crate::proto::*;

/// Reply data leaves in slices of this size, so that a client reading a large reply slowly is
/// seen to make progress.
const SEND_SLICE: usize = 256 * 1024;

/// A reply ready for the writer.
struct Reply {
    header: Bytes,
    data: Option<Bytes>,
    /// Bytes this request counts against the connection's budget.
    cost: usize,
    /// Its share of the server's payload budget, given back once the reply is sent.
    _payload: Option<Lease>,
}

/// What reading the next request gave.
enum Incoming {
    Request(Request, Bytes, Option<Lease>),
    /// NBD_CMD_DISC or the end of the stream.
    End,
}

/// What the reader, the requests and the writer of one connection share.
struct Conn {
    payload: PayloadBudget,
    allowance: Allowance,
    activity: Activity,
}

/// Reads one request and its payload. Owns the reader so that the read can stay pending across
/// the connection loop's turns without ever being dropped half-way.
async fn read_request<R: AsyncRead + Unpin>(
    mut r: R,
    conn: Arc<Conn>,
) -> (R, Result<Incoming, ConnError>) {
    let result = async {
        let mut hdr = [0u8; REQUEST_LEN];
        if let Err(e) = r.read_exact(&mut hdr).await {
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(Incoming::End)
            } else {
                Err(e.into())
            };
        }
        let req = Request::parse(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if req.kind == CMD_DISC {
            return Ok(Incoming::End);
        }
        if req.has_payload() && req.length > MAX_PAYLOAD {
            // The payload cannot be buffered and skipping gigabytes is no better: the stream
            // cannot be trusted any more.
            return Err(ConnError::Protocol(format!(
                "write of {} bytes exceeds the limit",
                req.length
            )));
        }
        if !req.has_payload() {
            return Ok(Incoming::Request(req, Bytes::new(), None));
        }
        let len = req.length as usize;
        // Budget before memory: the payload waits in the socket until there is room for it.
        let permit = conn.payload.acquire(&conn.allowance, len).await;
        conn.activity.start(Direction::Receiving);
        let payload = read_payload(&mut r, len, &conn.activity).await;
        conn.activity.stop(Direction::Receiving);
        Ok(Incoming::Request(req, payload?, Some(permit)))
    }
    .await;
    (r, result)
}

async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    activity: &Activity,
) -> Result<Bytes, ConnError> {
    // Read into spare capacity: zeroing the buffer first would only be overwritten.
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        // `take` bounds the read even if the allocator gave more capacity than asked.
        let want = (len - buf.len()) as u64;
        if r.take(want).read_buf(&mut buf).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        activity.progress(Direction::Receiving);
    }
    Ok(buf.freeze())
}

/// Ticks for a connection to check whether its client has stalled.
fn watchdog(stall_timeout: Duration) -> tokio::time::Interval {
    let period = (stall_timeout / 4).max(Duration::from_millis(10));
    let mut watch = tokio::time::interval(period);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    watch
}

/// The transmission phase of one connection.
///
/// One task reads requests and polls them all as futures; replies that are ready together go
/// to the writer task as one batch and leave in one send. Nothing is spawned per request: on a
/// small machine the task switches were most of a 4 KiB write's cost.
pub(super) async fn transmission<R, W>(
    r: R,
    w: W,
    session: Session,
    server: &Server,
    peer: &str,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let config = &server.config;
    // A newer connection of the same client evicts this one (single-writer exports).
    let evicted = match &session.claim {
        Some(c) => c.evict.clone(),
        None => CancellationToken::new(),
    };
    let session = Arc::new(session);
    let budget = Arc::new(ConnBudget::new(config.max_requests, config.max_bytes));
    let conn = Arc::new(Conn {
        payload: config.payload_budget.clone(),
        allowance: config.payload_budget.allowance(),
        activity: Activity::new(),
    });
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Reply>>();
    let dead = CancellationToken::new();
    // Requests that have not started yet give up once the connection is closing.
    let closing = CancellationToken::new();
    let mut writer = tokio::spawn(write_replies(
        w,
        rx,
        dead.clone(),
        budget.clone(),
        conn.clone(),
    ));
    let mut running: FuturesUnordered<Pin<Box<dyn Future<Output = Reply> + Send>>> =
        FuturesUnordered::new();
    let mut reading = Box::pin(read_request(r, conn.clone()));
    let mut watch = watchdog(config.stall_timeout);
    // The client said it is done (NBD_CMD_DISC or end of stream): it may still read replies.
    let mut client_done = false;

    let result = loop {
        let room = budget.has_room();
        tokio::select! {
            biased;
            _ = server.stop.cancelled() => break Ok(()),
            _ = dead.cancelled() => break Ok(()),
            _ = evicted.cancelled() => break Err(ConnError::Protocol(
                "replaced by a newer connection of the same client".into(),
            )),
            Some(reply) = running.next(), if !running.is_empty() => {
                let mut batch = vec![reply];
                // Every other reply that is ready now leaves with it.
                while let Some(Some(reply)) = running.next().now_or_never() {
                    batch.push(reply);
                }
                let _ = tx.send(batch);
            }
            _ = budget.freed.notified(), if !room => {}
            (r, incoming) = &mut reading, if room => {
                let (req, payload, permit) = match incoming {
                    Ok(Incoming::Request(req, payload, permit)) => (req, payload, permit),
                    Ok(Incoming::End) => {
                        client_done = true;
                        break Ok(());
                    }
                    Err(e) => break Err(e),
                };
                reading.set(read_request(r, conn.clone()));
                let cost = if req.has_payload() || req.kind == CMD_READ {
                    req.length.min(MAX_PAYLOAD) as usize
                } else {
                    0
                };
                budget.take(cost);
                running.push(Box::pin(run_request(
                    session.clone(),
                    conn.clone(),
                    closing.clone(),
                    (req, payload, permit),
                    cost,
                )));
            }
            _ = watch.tick() => {
                if stalled_while_others_wait(&conn, config.stall_timeout) {
                    break Err(ConnError::Stalled(config.stall_timeout));
                }
            }
        }
    };
    if let Err(ConnError::Stalled(t)) = &result {
        info!(%peer, "closing a client that took and sent nothing for {t:?} while other clients waited for memory");
        writer.abort();
    }
    if !client_done {
        closing.cancel();
    }
    // Requests already read run to the end even if nobody will read their replies: a write
    // stopped half-way (on a replicating node, applied but not forwarded) would be worse.
    loop {
        tokio::select! {
            reply = running.next() => match reply {
                Some(reply) => {
                    let _ = tx.send(vec![reply]);
                }
                None => break,
            },
            _ = watch.tick() => {
                if gives_up(&conn, server) {
                    closing.cancel();
                    writer.abort();
                }
            }
        }
    }
    drop(tx);
    loop {
        tokio::select! {
            _ = &mut writer => break,
            _ = watch.tick() => {
                if gives_up(&conn, server) {
                    writer.abort();
                }
            }
        }
    }
    result
}

/// Runs one request: takes its share of the payload budget (a write brought it along), runs it
/// and frames the reply.
async fn run_request(
    session: Arc<Session>,
    conn: Arc<Conn>,
    closing: CancellationToken,
    (req, payload, permit): (Request, Bytes, Option<Lease>),
    cost: usize,
) -> Reply {
    let permit = match permit {
        Some(p) => Some(p),
        None if req.kind == CMD_READ && cost > 0 => tokio::select! {
            biased;
            p = conn.payload.acquire(&conn.allowance, cost) => Some(p),
            _ = closing.cancelled() => {
                let (header, data) = frame(
                    &session,
                    &req,
                    Outcome::Error(ESHUTDOWN, "the connection is closing".into()),
                );
                return Reply { header, data, cost, _payload: None };
            }
        },
        None => None,
    };
    // A panic ends this request with an error, not the connection's other requests half-way.
    let executed = AssertUnwindSafe(execute(&session, req, payload))
        .catch_unwind()
        .await;
    let (header, data) = executed.unwrap_or_else(|_| {
        frame(
            &session,
            &req,
            Outcome::Error(EIO, "internal error: the request panicked".into()),
        )
    });
    Reply {
        header,
        data,
        cost,
        _payload: permit,
    }
}

/// A client that holds payload budget and has moved nothing for `stall_timeout`, while another
/// request waits for budget, gives way: waiting longer would let it starve the others.
fn stalled_while_others_wait(conn: &Conn, stall_timeout: Duration) -> bool {
    conn.payload.is_short() && conn.activity.stalled_for() >= stall_timeout
}

/// Whether a closing connection stops waiting for its client: one that takes nothing for the
/// stall timeout while memory is short or the server stops.
fn gives_up(conn: &Conn, server: &Server) -> bool {
    let timeout = server.config.stall_timeout;
    let stopping = server.stop.is_cancelled() && conn.activity.stalled_for() >= timeout;
    stopping || stalled_while_others_wait(conn, timeout)
}

async fn write_replies<W>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<Reply>>,
    dead: CancellationToken,
    budget: Arc<ConnBudget>,
    conn: Arc<Conn>,
) where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let activity = &conn.activity;
    let r: io::Result<()> = async {
        while let Some(batch) = rx.recv().await {
            activity.start(Direction::Sending);
            let (mut requests, mut bytes) = (0, 0);
            let mut next = Some(batch);
            while let Some(batch) = next {
                for reply in &batch {
                    write_reply(&mut w, reply, activity).await?;
                    requests += 1;
                    bytes += reply.cost;
                }
                next = rx.try_recv().ok();
            }
            w.flush().await?;
            activity.stop(Direction::Sending);
            budget.release(requests, bytes);
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        debug!("writing replies failed: {e}");
        dead.cancel();
        rx.close();
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    reply: &Reply,
    activity: &Activity,
) -> io::Result<()> {
    w.write_all(&reply.header).await?;
    if let Some(d) = &reply.data {
        for slice in d.chunks(SEND_SLICE) {
            w.write_all(slice).await?;
            activity.progress(Direction::Sending);
        }
    }
    Ok(())
}

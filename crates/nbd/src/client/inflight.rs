//! The pending-request table: what callers, the reader task and the writer task share about
//! one connection (the requests waiting for a reply, by cookie; the frame queue; whether the
//! connection is dead, and why).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockdev::{ExtentList, Op};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::reader::ConnError;
use crate::proto::*;

/// An error the server replied with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServerError {
    pub(super) errno: u32,
    pub(super) message: Option<String>,
    /// Where the error happened (NBD_REPLY_TYPE_ERROR_OFFSET).
    pub(super) offset: Option<u64>,
}

/// Why a request did not succeed, as the reader reports it.
#[derive(Debug)]
pub(super) enum Failure {
    Server(ServerError),
    /// The connection is gone; the text says why.
    Dead(String),
}

/// A successful reply: read data or block-status extents (empty for other commands).
#[derive(Debug, Default)]
pub(super) struct Reply {
    pub(super) data: Bytes,
    pub(super) extents: ExtentList,
}

pub(super) type Outcome = std::result::Result<Reply, Failure>;

/// A request on the wire, waiting for its reply.
pub(super) struct Pending {
    /// The request as sent.
    pub(super) cmd: Cmd,
    /// Read data, zero-filled up front so holes need no work.
    pub(super) data: BytesMut,
    /// Bytes of a read that chunks have covered.
    pub(super) filled: u64,
    /// The ranges chunks covered (start -> end, relative to the request): a chunk that
    /// overlaps an earlier one is a protocol violation, else `filled` could reach the length
    /// with bytes never sent.
    pub(super) covered: std::collections::BTreeMap<u64, u64>,
    pub(super) extents: Option<ExtentList>,
    pub(super) error: Option<ServerError>,
    /// Structured chunks have arrived (a simple reply is then a violation).
    pub(super) chunked: bool,
    pub(super) tx: Waiter,
    /// Held until the reply arrives, even if the caller gave up: the server still works on it.
    /// (A batch holds its requests' slots together, in its [`BatchWait`].)
    pub(super) _slot: Option<OwnedSemaphorePermit>,
}

/// Who waits for a reply.
pub(super) enum Waiter {
    /// One caller, on a channel of its own.
    One(Option<oneshot::Sender<Outcome>>),
    /// Entry `.1` of a batch, woken once its last reply is in.
    Batch(Option<(Arc<BatchWait>, usize)>),
}

impl Waiter {
    pub(super) fn deliver(&mut self, outcome: Outcome) {
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
pub(super) struct BatchWait {
    pub(super) outcomes: Mutex<Vec<Option<Outcome>>>,
    pub(super) remaining: AtomicUsize,
    pub(super) done: Notify,
    /// The batch's slots, held until its last reply is in even if the caller gave up.
    pub(super) _slots: OwnedSemaphorePermit,
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
    pub(super) fn new(
        cmd: &Cmd,
        data: BytesMut,
        tx: Waiter,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Pending {
            cmd: *cmd,
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

    pub(super) fn fail(mut self, failure: Failure) {
        self.tx.deliver(Err(failure));
    }

    /// Where the range `offset..offset+n` of a chunk lies in the request.
    pub(super) fn locate(&self, offset: u64, n: u32) -> std::result::Result<usize, ConnError> {
        match offset.checked_sub(self.cmd.offset) {
            Some(rel)
                if rel
                    .checked_add(u64::from(n))
                    .is_some_and(|end| end <= u64::from(self.cmd.len)) =>
            {
                Ok(rel as usize)
            }
            _ => Err(ConnError::Protocol(format!(
                "chunk for {n} bytes at offset {offset} lies outside the request for {} bytes at {}",
                self.cmd.len, self.cmd.offset
            ))),
        }
    }

    /// Records that a chunk covered `start..start+n` of the request, refusing overlaps.
    pub(super) fn cover(&mut self, start: usize, n: u32) -> std::result::Result<(), ConnError> {
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
    pub(super) fn validate(&self) -> std::result::Result<(), ConnError> {
        if self.error.is_some() {
            return Ok(());
        }
        if self.cmd.kind == CMD_READ && self.filled != u64::from(self.cmd.len) {
            return Err(ConnError::Protocol(format!(
                "read reply covers {} of {} bytes",
                self.filled, self.cmd.len
            )));
        }
        if self.cmd.kind == CMD_BLOCK_STATUS && self.extents.as_ref().is_none_or(|e| e.total() == 0)
        {
            return Err(ConnError::Protocol(
                "block-status reply without extents".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn complete(mut self) {
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
pub(super) struct State {
    pub(super) next_cookie: u64,
    pub(super) pending: HashMap<u64, Pending>,
    /// Why the connection is unusable; set once.
    pub(super) dead: Option<String>,
    /// [`NbdClient::disconnect`] has begun: no new requests.
    pub(super) closing: bool,
    /// NBD_CMD_DISC is on its way, so the server hanging up is expected.
    pub(super) disc_sent: bool,
}

/// What a frame queue entry asks the writer to do.
pub(super) enum Outgoing {
    Request {
        frame: Bytes,
        payload: Option<Bytes>,
    },
    /// Requests (header, payload) that leave together.
    Batch(Vec<(Bytes, Bytes)>),
    /// Flush, shut the write side down and stop (after NBD_CMD_DISC).
    Close,
}

pub(super) struct Shared {
    /// "NBD export 'x' at unix:/path", the prefix of every error's context.
    pub(super) label: String,
    pub(super) state: Mutex<State>,
    /// One permit per request in flight.
    pub(super) slots: Arc<Semaphore>,
    pub(super) outgoing: mpsc::UnboundedSender<Outgoing>,
    /// Stops the reader and writer tasks.
    pub(super) stop: CancellationToken,
}

impl Shared {
    /// Files a request under a fresh cookie, unless the connection is closed.
    pub(super) fn register(&self, p: Pending) -> std::result::Result<u64, String> {
        self.register_all(std::iter::once(p))
    }

    /// Files several requests under one lock; the first cookie is returned and the others
    /// follow it. Refused as a whole if the connection is closed.
    pub(super) fn register_all(
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

    pub(super) fn take(&self, cookie: u64) -> std::result::Result<Pending, ConnError> {
        let p = self.state.lock().pending.remove(&cookie);
        p.ok_or_else(|| ConnError::Protocol(format!("reply for unknown cookie {cookie:#x}")))
    }

    /// Returns a request whose reply goes on; fails it if the connection died meanwhile.
    pub(super) fn put_back(&self, cookie: u64, p: Pending) {
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
    pub(super) fn kill(&self, reason: impl Into<String>) {
        self.close(reason, true);
    }

    /// [`Shared::kill`], logging a warning only when `unexpected` (not for a client closing
    /// its own connection).
    pub(super) fn close(&self, reason: impl Into<String>, unexpected: bool) {
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

    pub(super) fn dead_reason(&self) -> Option<String> {
        self.state.lock().dead.clone()
    }
}

/// One request as the caller sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cmd {
    pub(super) op: Op,
    pub(super) kind: u16,
    pub(super) flags: u16,
    pub(super) offset: u64,
    pub(super) len: u32,
}

impl Cmd {
    /// Its header on the wire, under `cookie`.
    pub(super) fn request(&self, cookie: u64) -> Request {
        Request {
            flags: self.flags,
            kind: self.kind,
            cookie,
            offset: self.offset,
            length: self.len,
        }
    }
}

//! Sending requests and waiting for their replies, one at a time or as a run of writes, and
//! what a caller sees when one fails: a local check, a server error, a dead connection or a
//! timeout.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use blockdev::{BatchWrite, BlockError, ErrorKind, Op, Result};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};

use super::NbdClient;
use super::inflight::{
    BatchWait, Cmd, Failure, Outcome, Outgoing, Pending, Reply, ServerError, Waiter,
};
use crate::proto::*;

impl NbdClient {
    /// Sends one request and waits for its reply.
    pub(super) async fn submit(&self, cmd: Cmd, payload: Option<Bytes>) -> Result<Reply> {
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

    pub(super) async fn wait(&self, cmd: &Cmd, rx: oneshot::Receiver<Outcome>) -> Result<Reply> {
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
    pub(super) fn settle(&self, cmd: &Cmd, outcome: Option<Outcome>) -> Result<Reply> {
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
    pub(super) async fn write_burst(&self, writes: Vec<BatchWrite>) -> Vec<Result<()>> {
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
    pub(super) async fn write_run(&self, run: &[(usize, BatchWrite)]) -> Vec<(usize, Result<()>)> {
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
    pub(super) async fn command(
        &self,
        op: Op,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<()> {
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

    pub(super) async fn read_one(&self, offset: u64, len: u32) -> Result<Bytes> {
        let cmd = Cmd {
            op: Op::Read,
            kind: CMD_READ,
            flags: 0,
            offset,
            len,
        };
        Ok(self.submit(cmd, None).await?.data)
    }

    pub(super) async fn write_one(
        &self,
        op: Op,
        offset: u64,
        data: Bytes,
        flags: u16,
    ) -> Result<()> {
        let cmd = Cmd {
            op,
            kind: CMD_WRITE,
            flags,
            offset,
            len: data.len() as u32,
        };
        self.submit(cmd, Some(data)).await.map(|_| ())
    }

    /// Refuses requests the server would refuse anyway, without a round trip.
    pub(super) fn check(&self, op: Op, offset: u64, len: u64, writes: bool) -> Result<()> {
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

    pub(super) fn local_error(
        &self,
        kind: ErrorKind,
        op: Op,
        offset: u64,
        detail: &str,
    ) -> BlockError {
        BlockError::new(kind, op, offset).context(format!("{}: {detail}", self.shared.label))
    }

    pub(super) fn shutdown_error(&self, cmd: &Cmd, reason: &str) -> BlockError {
        let detail = format!("connection closed: {reason}");
        self.local_error(ErrorKind::Shutdown, cmd.op, cmd.offset, &detail)
    }

    pub(super) fn dead_error(&self, cmd: &Cmd) -> BlockError {
        let reason = self
            .shared
            .dead_reason()
            .unwrap_or_else(|| "connection lost".into());
        self.shutdown_error(cmd, &reason)
    }

    /// Fails a request that got no reply in time, and the connection with it: the server may
    /// still act on the request, so nothing later on this connection could be trusted.
    pub(super) fn timed_out(&self, cmd: &Cmd, limit: Duration) -> BlockError {
        let reason = format!(
            "{} of {} bytes at offset {} got no reply within {limit:?}",
            cmd.op, cmd.len, cmd.offset
        );
        self.shared.kill(reason.clone());
        self.local_error(ErrorKind::TimedOut, cmd.op, cmd.offset, &reason)
    }

    pub(super) fn server_error(&self, cmd: &Cmd, e: ServerError) -> BlockError {
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

#[cfg(test)]
mod tests {
    use super::super::ClientConfig;
    use super::super::scripted::*;
    use super::*;
    use blockdev::BlockDev;
    use std::time::Duration;

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
}

//! The vhost-user backend: one worker thread per queue pops request chains, runs them on the
//! `BlockDev` (a batch concurrently, on the daemon's tokio runtime) and completes them.

use std::io;
use std::sync::Arc;

use blockdev::{BlockDev, WriteFlags, ZeroFlags};
use bytes::Bytes;
use futures::future::join_all;
use parking_lot::Mutex;
use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes as _, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::config::{DeviceConfig, MAX_QUEUE_SIZE, MAX_QUEUES};
use crate::request::{Command, Refused, Request, S_IOERR, S_OK, parse};

/// The guest's memory as the frontend shares it.
pub(crate) type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Data bytes a queue has in flight at once: a batch of large requests runs in groups of about
/// this size, so a guest with a full queue of 32 MiB reads cannot make the daemon hold
/// gigabytes.
const MAX_INFLIGHT_BYTES: u64 = 64 << 20;

/// One export's device as the backend threads share it.
pub(crate) struct BlkBackend {
    dev: Arc<dyn BlockDev>,
    cfg: DeviceConfig,
    rt: tokio::runtime::Handle,
    mem: Mutex<Option<Memory>>,
    /// Held by a queue's worker while it runs a batch: stopping a ring (QEMU's `stop`, which
    /// the orchestrator's checkpoint relies on to have drained the VM's writes) waits for it.
    busy: Vec<Mutex<()>>,
}

impl BlkBackend {
    pub(crate) fn new(
        dev: Arc<dyn BlockDev>,
        cfg: DeviceConfig,
        rt: tokio::runtime::Handle,
    ) -> Self {
        BlkBackend {
            dev,
            cfg,
            rt,
            mem: Mutex::new(None),
            busy: (0..MAX_QUEUES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Drops the guest memory of a frontend that went away (its mappings would otherwise
    /// keep a dead QEMU's RAM until the next one connects).
    pub(crate) fn forget_memory(&self) {
        *self.mem.lock() = None;
    }

    /// Completes what the queue holds until the guest adds nothing more while notifications
    /// were off (the EVENT_IDX dance; without it enable_notification just reports the ring).
    ///
    /// A ring the frontend stopped or broke is left alone (an error here would end the
    /// queue's thread for the rest of the connection, and QEMU's `cont` restarts rings).
    fn process(&self, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.lock().clone() else {
            return Ok(());
        };
        let _busy = self.busy.get(queue).map(|m| m.lock());
        loop {
            if !vring.get_ref().get_queue().ready() {
                return Ok(());
            }
            let more = vring
                .disable_notification()
                .and_then(|()| self.batch(vring, &mem))
                .and_then(|()| vring.enable_notification());
            match more {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => {
                    warn!(queue, "vhost-user: ring left alone: {e}");
                    return Ok(());
                }
            }
        }
    }

    /// Takes every available chain, runs them, puts them on the used ring, notifies the guest.
    fn batch(&self, vring: &VringRwLock, mem: &Memory) -> Result<(), virtio_queue::Error> {
        let guard = &mem.memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter((*guard).clone())?
            .collect();
        if chains.is_empty() {
            return Ok(());
        }
        let mut group = Vec::new();
        let mut bytes = 0;
        let mut pending = chains.into_iter().peekable();
        while let Some(chain) = pending.next() {
            let head = chain.head_index();
            let req = parse(chain, &**guard, &self.cfg);
            bytes += req.as_ref().map_or(0, data_len);
            group.push((head, req));
            if bytes >= MAX_INFLIGHT_BYTES || pending.peek().is_none() {
                let done =
                    self.rt
                        .block_on(join_all(group.drain(..).map(|(head, req)| async move {
                            (head, self.complete(req, &**guard).await)
                        })));
                for (head, used) in done {
                    vring.add_used(head, used)?;
                }
                bytes = 0;
            }
        }
        if vring.needs_notification()? {
            // A frontend gone mid-batch has no call eventfd to signal: nothing to tell.
            let _ = vring.signal_used_queue();
        }
        Ok(())
    }

    /// Runs one request and writes its status; returns the bytes written into the guest's
    /// buffers (the used length).
    async fn complete<M: GuestMemory + ?Sized>(
        &self,
        req: Result<Request, Refused>,
        mem: &M,
    ) -> u32 {
        let req = match req {
            Ok(req) => req,
            Err(refused) => {
                debug!(why = ?refused.why, "refused a malformed request");
                return match refused.status {
                    Some(at) if mem.write_slice(&[refused.status_code()], at).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let (status, written) = match self.run(&req.command, mem).await {
            Ok(written) => (S_OK, written),
            Err(e) => {
                debug!("request failed: {e}");
                (S_IOERR, 0)
            }
        };
        match mem.write_slice(&[status], req.status) {
            Ok(()) => written.saturating_add(1),
            Err(_) => 0,
        }
    }

    /// Runs one command; returns the data bytes written into guest memory.
    async fn run<M: GuestMemory + ?Sized>(
        &self,
        command: &Command,
        mem: &M,
    ) -> Result<u32, String> {
        let guest = |e: vm_memory::GuestMemoryError| format!("guest memory: {e}");
        match command {
            Command::Read { offset, dst } => {
                let data = self
                    .dev
                    .read(*offset, dst.len() as usize)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(dst.scatter(mem, &data).map_err(guest)? as u32)
            }
            Command::Write { offset, src } => {
                let data = src.gather(mem).map_err(guest)?;
                self.dev
                    .write(*offset, Bytes::from(data), WriteFlags::default())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(0)
            }
            Command::Flush => self
                .dev
                .flush()
                .await
                .map(|()| 0)
                .map_err(|e| e.to_string()),
            Command::GetId { dst } => Ok(dst.scatter(mem, &self.cfg.id).map_err(guest)? as u32),
            Command::Discard(ranges) => {
                for r in ranges {
                    self.dev
                        .discard(r.offset, r.len)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(0)
            }
            Command::WriteZeroes { ranges, unmap } => {
                let flags = ZeroFlags {
                    may_unmap: *unmap,
                    ..ZeroFlags::default()
                };
                for r in ranges {
                    self.dev
                        .write_zeroes(r.offset, r.len, flags)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(0)
            }
        }
    }
}

/// Bytes of data a request moves (what the in-flight bound counts).
fn data_len(req: &Request) -> u64 {
    match &req.command {
        Command::Read { dst, .. } => dst.len(),
        Command::Write { src, .. } => src.len(),
        _ => 0,
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        MAX_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        DeviceConfig::protocol_features()
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track it themselves (enable/disable_notification follow it).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.cfg.read_config(offset, size)
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.lock() = Some(mem);
        Ok(())
    }

    /// One thread per queue: queues are what the guest spreads its I/O over.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..MAX_QUEUES).map(|q| 1 << q).collect()
    }

    /// Each worker thread gets its own exit event: the library stops its threads with it
    /// when a connection's handler is dropped (without one it would wait for them forever).
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread (queues_per_thread), so the thread is the queue.
        match vrings.get(device_event as usize) {
            Some(vring) => self.process(thread_id, vring),
            None => Ok(()),
        }
    }

    /// Returns once the queue's worker finished its batch: the frontend then has every
    /// request it handed over completed (the ring itself was marked not ready before this).
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(busy) = self.busy.get(queue_index as usize) {
            drop(busy.lock());
        }
        Ok(())
    }
}

//! A vhost-user socket: one frontend (QEMU) at a time; when it goes away (QEMU stopped,
//! killed or restarted) the next one that connects gets a fresh device state, so a QEMU
//! restarted against the same socket attaches again.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use blockdev::BlockDev;
use parking_lot::Mutex;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::DeviceConfig;
use crate::worker::BlkBackend;
use crate::{Error, ErrorKind};

/// A vhost-user-blk export serving one device on one socket.
pub struct VhostUserExport {
    path: PathBuf,
    dev: Arc<dyn BlockDev>,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserExport {
    /// Serves `dev` as the export `name` on `listener` (bound at `path`), from a thread of
    /// its own; requests run on the runtime `rt`. `read_only` refuses writes even where the
    /// device takes them.
    pub fn start(
        listener: UnixListener,
        path: PathBuf,
        name: &str,
        dev: Arc<dyn BlockDev>,
        read_only: bool,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, Error> {
        listener
            .set_nonblocking(false)
            .map_err(|e| Error::new(ErrorKind::Socket, &path).source(e))?;
        let cfg = DeviceConfig::new(name, &dev.info(), read_only);
        let backend = Arc::new(BlkBackend::new(dev.clone(), cfg, rt));
        let stop = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(None));
        let (stop2, current2, path2) = (stop.clone(), current.clone(), path.clone());
        let name = format!("vhost-user {name}");
        let thread = std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                serve(
                    Listener::from(listener),
                    backend,
                    &name,
                    &path2,
                    &stop2,
                    &current2,
                )
            })
            .map_err(|e| Error::new(ErrorKind::Thread, &path).source(e))?;
        Ok(VhostUserExport {
            path,
            dev,
            stop,
            current,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Disconnects the frontend, stops listening, and flushes the device: writes the guest
    /// completed are durable when this returns Ok.
    pub async fn stop(mut self) -> Result<(), Error> {
        self.stop.store(true, Ordering::SeqCst);
        let connected = self.current.lock().clone();
        match connected {
            Some(handle) => handle.shutdown(),
            // Wakes the accept; the thread sees `stop` and closes this connection at once.
            None => drop(UnixStream::connect(&self.path)),
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .ok();
        }
        self.dev
            .flush()
            .await
            .map_err(|e| Error::new(ErrorKind::Flush, &self.path).source(e))
    }
}

/// Accepts frontends one after another until `stop`.
fn serve(
    mut listener: Listener,
    backend: Arc<BlkBackend>,
    name: &str,
    path: &std::path::Path,
    stop: &AtomicBool,
    current: &Mutex<Option<ShutdownHandle>>,
) {
    while !stop.load(Ordering::SeqCst) {
        // Fresh per connection: queues, memory table and features start from nothing, as a
        // newly started QEMU expects.
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.to_string(), backend.clone(), memory) {
            Ok(d) => d,
            Err(e) => {
                warn!(path = %path.display(), "vhost-user: cannot set up the device: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            warn!(path = %path.display(), "vhost-user: accept failed: {e}");
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        *current.lock() = daemon.shutdown_handle();
        if stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        } else {
            info!(path = %path.display(), "vhost-user: frontend connected");
        }
        match daemon.wait() {
            Ok(()) => info!(path = %path.display(), "vhost-user: frontend disconnected"),
            Err(e) => info!(path = %path.display(), "vhost-user: connection ended: {e}"),
        }
        *current.lock() = None;
        drop(daemon);
        backend.forget_memory();
    }
}

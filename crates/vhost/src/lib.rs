//! vhost-user-blk exports: a [`BlockDev`](blockdev::BlockDev) served to QEMU's
//! `vhost-user-blk-pci` over a unix socket, the guest's virtqueues read straight from its
//! shared memory (no NBD framing, no copy through a socket).
//!
//! ```text
//!   QEMU --vhost-user socket--> listener.rs (one frontend at a time; a new one after a
//!                               disconnect: QEMU restarted)
//!        \--shared memory + kick/call eventfds--> worker.rs (a thread per queue)
//!                                                   request.rs: chain -> Request, bounded
//!                                                   BlockDev call on the daemon's runtime
//!                               config.rs: features, virtio_blk_config, limits
//! ```
//!
//! The rust-vmm crates do the protocol (`vhost`, `vhost-user-backend`), the rings
//! (`virtio-queue`) and the guest memory mappings (`vm-memory`); this crate holds no
//! `unsafe`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
mod listener;
pub mod request;
mod worker;

use std::path::Path;

pub use config::DeviceConfig;
pub use listener::VhostUserExport;

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Setting up the listening socket.
    Socket,
    /// Starting the serving thread.
    Thread,
    /// The final flush of the device.
    Flush,
}

/// An error of a vhost-user export: what failed, on which socket, and why.
#[derive(Debug, thiserror::Error)]
#[error("vhost-user {path}: {kind:?}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct Error {
    /// What failed.
    pub kind: ErrorKind,
    /// The socket's path.
    pub path: String,
    /// The underlying error.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    fn new(kind: ErrorKind, path: &Path) -> Self {
        Error {
            kind,
            path: path.display().to_string(),
            source: None,
        }
    }

    fn source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(e));
        self
    }
}

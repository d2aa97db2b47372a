//! NBD for coloblk: the wire format ([`proto`]), an async server that serves
//! [`blockdev::BlockDev`]s as exports ([`server`]), and a pipelined async client ([`client`]).
//!
//! The replication primary talks to the secondary through [`client`]; virtual machines and the
//! NBD tools (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) talk to [`server`].
//!
//! Both sides are split by protocol phase, one file per job: `client/` into export info,
//! handshake, the in-flight table, reply reader, frame writer, request submission and request
//! splitting; `server/` into exports, handshake, transmission, command execution and the
//! payload budget. The types most users need are re-exported here; the rest stays in its module.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod client;
pub mod proto;
pub mod server;
pub mod uri;

pub use addr::SocketAddr;
pub use client::{ClientConfig, ExportInfo, NbdClient};
pub use server::{Export, ExportSet, Server, ServerConfig};
pub use uri::NbdUri;

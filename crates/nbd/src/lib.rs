//! NBD for coloblk: the wire format ([`proto`]), an async server that serves
//! [`blockdev::BlockDev`]s as exports ([`server`]), and a pipelined async client ([`client`]).
//!
//! The replication primary talks to the secondary through [`client`]; virtual machines and the
//! NBD tools (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) talk to [`server`].

#![forbid(unsafe_code)]

pub mod addr;
pub mod client;
pub mod proto;
pub mod server;
pub mod uri;

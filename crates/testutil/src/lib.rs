//! Test aids for coloblk, kept out of the libraries' public API: a dev-dependency of every
//! crate's tests and benches, and a dependency of the fuzz targets.
//!
//! - [`pattern`] and [`Rng`]: deterministic test data and a seeded generator, so tests need no
//!   random-number crate and every failure replays.
//! - [`FaultyDev`]: a [`blockdev::BlockDev`] wrapper that fails, delays, holds or tears
//!   requests on demand.
//! - [`scripted`]: the server's side of an NBD connection, scripted by a test or a fuzz target
//!   that plays the server against `nbd::NbdClient`.
//! - [`peer`]: real programs as test peers, killed on drop.
//! - [`tls`]: a test CA and certificates, written as QEMU's `tls-creds-x509` directory.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod data;
pub mod fault;
pub mod peer;
pub mod scripted;
pub mod tls;

pub use data::{Rng, pattern};
pub use fault::FaultyDev;

//! Socket addresses in the form our command lines use: `unix:PATH` or `tcp:HOST:PORT`.
//!
//! They live in the `net` crate with the listeners; this path stays for existing users.

pub use net::addr::{AddrError, SocketAddr, Stream};

//! Sockets for coloblk, in one place: addresses as our command lines write them
//! ([`SocketAddr`]), listening sockets ([`Listener`]), the one accept loop every listener uses
//! ([`Acceptor`]: a bound on open connections, backoff on accept errors), and the descriptor
//! limit a daemon raises at start ([`raise_fd_limit`]).
//!
//! ```text
//!   SocketAddr --bind--> Listener --Acceptor::run--> Connection { Stream, Peer } --> protocol
//!        '------connect--------------------------------> Stream
//! ```
//!
//! The protocols (NBD, QMP, HTTP for metrics) sit on top and know nothing of sockets; TLS
//! ([`tls`]: credentials, mutual x509 authentication, the peer's name) sits here, between the
//! accepted stream and the protocol.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod addr;
pub mod limits;
pub mod listener;
pub mod tls;

pub use accept::{Acceptor, Connection};
pub use addr::{AddrError, SocketAddr, Stream};
pub use limits::raise_fd_limit;
pub use listener::{Listener, Peer};
pub use tls::{Authz, TlsClient, TlsCreds, TlsError, TlsErrorKind, TlsServer, TlsStream};

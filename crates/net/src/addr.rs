//! Socket addresses in the form our command lines use: `unix:PATH` or `tcp:HOST:PORT`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::net::{TcpStream, UnixStream, tcp, unix};
use tokio_util::either::Either;

/// A connected unix or TCP stream.
pub type Stream = Either<UnixStream, TcpStream>;
/// The read half of a [`Stream`], owned by one task.
pub type ReadHalf = Either<unix::OwnedReadHalf, tcp::OwnedReadHalf>;
/// The write half of a [`Stream`], owned by one task.
pub type WriteHalf = Either<unix::OwnedWriteHalf, tcp::OwnedWriteHalf>;

/// Splits a stream into halves that a reader and a writer task own without sharing a lock.
pub fn split(stream: Stream) -> (ReadHalf, WriteHalf) {
    match stream {
        Either::Left(s) => {
            let (r, w) = s.into_split();
            (Either::Left(r), Either::Left(w))
        }
        Either::Right(s) => {
            let (r, w) = s.into_split();
            (Either::Right(r), Either::Right(w))
        }
    }
}

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddr {
    /// A unix socket file.
    Unix(PathBuf),
    /// A TCP host (name or IP address, without brackets) and port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port number.
        port: u16,
    },
}

/// An address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address '{0}': expected unix:PATH or tcp:HOST:PORT")]
pub struct AddrError(
    /// The text that was given.
    pub String,
);

impl FromStr for SocketAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AddrError(s.to_string());
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(SocketAddr::Unix(PathBuf::from(path)));
        }
        let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        let port = port.parse().map_err(|_| bad())?;
        Ok(SocketAddr::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl SocketAddr {
    /// Connects to the address (TCP with Nagle off: our protocols are request/reply).
    pub async fn connect(&self) -> std::io::Result<Stream> {
        match self {
            SocketAddr::Unix(p) => Ok(Either::Left(UnixStream::connect(p).await?)),
            SocketAddr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Ok(Either::Right(s))
            }
        }
    }
}

impl fmt::Display for SocketAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            SocketAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            SocketAddr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp() {
        assert_eq!("unix:/tmp/s".parse(), Ok(SocketAddr::Unix("/tmp/s".into())));
        assert_eq!(
            "tcp:127.0.0.1:10809".parse(),
            Ok(SocketAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            })
        );
        assert_eq!(
            "tcp:[::1]:99".parse(),
            Ok(SocketAddr::Tcp {
                host: "::1".into(),
                port: 99
            })
        );
        assert_eq!(
            "tcp:[::1]:99".parse::<SocketAddr>().unwrap().to_string(),
            "tcp:[::1]:99"
        );
    }

    #[test]
    fn refuses_garbage() {
        for s in [
            "",
            "unix:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "udp:x:1",
            "/tmp/s",
        ] {
            assert!(s.parse::<SocketAddr>().is_err(), "{s}");
        }
    }
}

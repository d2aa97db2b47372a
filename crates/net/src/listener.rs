//! A listening unix or TCP socket, and who connected to it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::either::Either;

use crate::addr::{SocketAddr, Stream};

/// A listening socket.
pub enum Listener {
    /// A unix socket and the file it is bound to (removed again when the listener is dropped).
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
}

/// Who is on the other end of an accepted connection, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A unix socket client (they have no useful address).
    Unix,
    /// A TCP client.
    Tcp(std::net::SocketAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix => f.write_str("unix"),
            Peer::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl Listener {
    /// Binds `addr`. A stale unix socket file left by a dead server is replaced.
    pub async fn bind(addr: &SocketAddr) -> io::Result<Listener> {
        Self::bind_with_mode(addr, None).await
    }

    /// Binds `addr`; a unix socket file gets file mode `mode` (e.g. 0o600: only its owner may
    /// connect) before anyone can connect to it: it is bound under a temporary name, given the
    /// mode, then renamed into place.
    pub async fn bind_with_mode(addr: &SocketAddr, mode: Option<u32>) -> io::Result<Listener> {
        match addr {
            SocketAddr::Unix(path) => {
                if is_stale_socket(path).await {
                    let _ = std::fs::remove_file(path);
                }
                let Some(mode) = mode else {
                    return Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()));
                };
                if path.exists() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} exists and is not a stale socket", path.display()),
                    ));
                }
                let mut tmp = path.clone().into_os_string();
                tmp.push(format!(".{}.tmp", std::process::id()));
                let tmp = PathBuf::from(tmp);
                let _ = std::fs::remove_file(&tmp);
                use std::os::unix::fs::PermissionsExt;
                let perms = std::fs::Permissions::from_mode(mode);
                let l = match UnixListener::bind(&tmp) {
                    Ok(l) => l,
                    // The temporary name is too long for a socket address where the real one
                    // fits: bind in place and set the mode at once (before anything accepts).
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                        let l = UnixListener::bind(path)?;
                        std::fs::set_permissions(path, perms)?;
                        return Ok(Listener::Unix(l, path.clone()));
                    }
                    Err(e) => return Err(e),
                };
                let placed = std::fs::set_permissions(&tmp, perms)
                    .and_then(|()| std::fs::rename(&tmp, path));
                if let Err(e) = placed {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                Ok(Listener::Unix(l, path.clone()))
            }
            SocketAddr::Tcp { host, port } => Ok(Listener::Tcp(
                TcpListener::bind((host.as_str(), *port)).await?,
            )),
        }
    }

    /// Accepts one connection (TCP with Nagle off: our protocols are request/reply).
    pub async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Unix(l, _) => Ok((Either::Left(l.accept().await?.0), Peer::Unix)),
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Either::Right(s), Peer::Tcp(a)))
            }
        }
    }

    /// Accepts one connection as a plain stream.
    pub async fn accept_stream(&self) -> io::Result<Stream> {
        Ok(self.accept().await?.0)
    }

    /// The address actually bound (useful with TCP port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Unix(_, p) => Ok(SocketAddr::Unix(p.clone())),
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(SocketAddr::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A socket file nobody answers on.
async fn is_stale_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => UnixStream::connect(path).await.is_err(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_file_is_replaced_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "std leaves the file behind");

        let l = Listener::bind(&SocketAddr::Unix(path.clone()))
            .await
            .unwrap();
        assert_eq!(l.local_addr().unwrap(), SocketAddr::Unix(path.clone()));
        drop(l);

        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_unix_socket_gets_its_mode_and_still_accepts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let addr = SocketAddr::Unix(path.clone());

        let l = Listener::bind_with_mode(&addr, Some(0o600)).await.unwrap();

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (client, accepted) = tokio::join!(addr.connect(), l.accept());
        client.unwrap();
        accepted.unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"], "the temporary name is gone");
    }

    #[tokio::test]
    async fn a_path_that_fits_only_without_the_temporary_suffix_still_gets_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let room = 104 - dir.path().as_os_str().len() - 1;
        let path = dir.path().join("s".repeat(room));
        let addr = SocketAddr::Unix(path.clone());

        let l = Listener::bind_with_mode(&addr, Some(0o600)).await.unwrap();

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (client, accepted) = tokio::join!(addr.connect(), l.accept());
        client.unwrap();
        accepted.unwrap();
    }

    #[tokio::test]
    async fn tcp_port_zero_reports_the_bound_port_and_accepts() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();

        let (client, accepted) = tokio::join!(addr.connect(), l.accept());

        client.unwrap();
        let (_, peer) = accepted.unwrap();
        assert!(matches!(peer, Peer::Tcp(a) if a.ip().is_loopback()));
    }
}

//! Who may reach a daemon, decided in one place: TLS credentials and the authz list, which
//! listeners require TLS, the refusal of plain TCP without `--insecure`, unix socket modes.
//!
//! ```text
//!                       with --tls-creds              without
//!   NBD on TCP          TLS required                  refused unless --insecure
//!   replica (any)       TLS required                  plain (unix) / as above (TCP)
//!   NBD on unix         TLS allowed (STARTTLS)        plain
//!   control on TCP      TLS on accept (as QEMU's      refused unless --insecure
//!                       chardev tls-creds)
//!   control on unix     plain: the socket's mode (--socket-mode, 0600) protects it
//!   metrics             plain HTTP, read-only; off loopback only with --insecure
//! ```
//!
//! The daemon's client side (the primary's replica link over `nbds://`, its `--peer-control`
//! on TCP, promotion's new links) uses the same credentials, through [`current`].

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use nbd::addr::SocketAddr;
use nbd::server::TlsPolicy;
use net::{Authz, Listener, TlsClient, TlsCreds, TlsServer};

/// Options every daemon has.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// TLS credentials: a directory laid out as QEMU's tls-creds-x509 (ca-cert.pem,
    /// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem; unencrypted PEM keys).
    /// TLS with client certificates is then required on every TCP listener and on the replica
    /// listener, and allowed on unix NBD listeners.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,

    /// A peer allowed on the TLS listeners: its certificate's distinguished name as QEMU's
    /// authz-simple identity (e.g. CN=primary,O=Example). Repeat for several; without any, every
    /// certificate the CA signed is let in.
    #[arg(long = "tls-authz", value_name = "DN", requires = "tls_creds")]
    pub tls_authz: Vec<String>,

    /// Listen on TCP without TLS: anyone who reaches the port can drive the daemon or write its
    /// disks. Only for networks where that is true of nobody.
    #[arg(long)]
    pub insecure: bool,

    /// File mode of the unix sockets the daemon creates (octal).
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = octal_mode)]
    pub socket_mode: u32,
}

fn octal_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("'{s}' is not an octal file mode (e.g. 600, 660)")),
    }
}

/// The daemon's security settings, loaded once at start.
#[derive(Default)]
pub struct Security {
    server: Option<Arc<TlsServer>>,
    client: Option<Arc<TlsClient>>,
    insecure: bool,
    socket_mode: u32,
}

static CURRENT: OnceLock<Arc<Security>> = OnceLock::new();

/// The settings the daemon started with (none before: plain, as in unit tests).
pub fn current() -> Arc<Security> {
    CURRENT.get().cloned().unwrap_or_default()
}

impl Security {
    /// Reads the credentials (a clear error if they are unusable) and makes them current.
    pub fn install(args: &SecurityArgs) -> anyhow::Result<Arc<Security>> {
        let mut sec = Security {
            insecure: args.insecure,
            socket_mode: args.socket_mode,
            ..Default::default()
        };
        if let Some(dir) = &args.tls_creds {
            let creds = TlsCreds::load(dir).context("--tls-creds")?;
            let authz = Authz::new(args.tls_authz.clone());
            sec.server = Some(Arc::new(
                TlsServer::new(&creds, authz.clone()).context("--tls-creds")?,
            ));
            // A directory may hold only the server side (a plain `serve`).
            sec.client = TlsClient::new(&creds, authz).ok().map(Arc::new);
        }
        let sec = Arc::new(sec);
        let _ = CURRENT.set(sec.clone());
        Ok(sec)
    }

    /// The TLS client for the daemon's own connections, if it has credentials.
    pub fn client(&self) -> Option<Arc<TlsClient>> {
        self.client.clone()
    }

    /// The TLS server for a control socket on `addr`: TLS on TCP, plain on unix. Refuses plain
    /// TCP without `--insecure`.
    pub fn control_tls(&self, addr: &SocketAddr) -> anyhow::Result<Option<Arc<TlsServer>>> {
        match addr {
            SocketAddr::Unix(_) => Ok(None),
            SocketAddr::Tcp { .. } => {
                self.plain_tcp_allowed(addr, "the control socket", self.server.is_some())?;
                Ok(self.server.clone())
            }
        }
    }

    /// How an NBD listener on `addr` speaks TLS; `always` for the replica listener, which
    /// requires it on unix too.
    pub fn nbd_policy(
        &self,
        addr: &SocketAddr,
        who: &str,
        always: bool,
    ) -> anyhow::Result<TlsPolicy> {
        let tcp = matches!(addr, SocketAddr::Tcp { .. });
        if tcp {
            self.plain_tcp_allowed(
                addr,
                &format!("the NBD listener for {who}"),
                self.server.is_some(),
            )?;
        }
        Ok(match &self.server {
            None => TlsPolicy::Off,
            Some(s) if tcp || always => TlsPolicy::Required(s.clone()),
            Some(s) => TlsPolicy::Allowed(s.clone()),
        })
    }

    /// Refuses a metrics endpoint off loopback without `--insecure` (it is plain HTTP).
    pub fn check_metrics(&self, addr: &SocketAddr) -> anyhow::Result<()> {
        let loopback = match addr {
            SocketAddr::Unix(_) => true,
            SocketAddr::Tcp { host, .. } => {
                host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        };
        self.plain_tcp_allowed(addr, "the metrics endpoint (plain HTTP)", loopback)
    }

    fn plain_tcp_allowed(&self, addr: &SocketAddr, what: &str, ok: bool) -> anyhow::Result<()> {
        if ok || self.insecure {
            return Ok(());
        }
        Err(coloblk_usage(format!(
            "{what} on {addr} would accept anyone who can reach the port: give --tls-creds DIR \
             (TLS with client certificates), or say --insecure to allow it in the clear"
        )))
    }

    /// Binds `addr`, a unix socket with the daemon's socket mode.
    pub async fn bind(&self, addr: &SocketAddr) -> std::io::Result<Listener> {
        Listener::bind_with_mode(addr, Some(self.socket_mode)).await
    }
}

fn coloblk_usage(msg: String) -> anyhow::Error {
    coloblk::UsageError(msg).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec(insecure: bool) -> Security {
        Security {
            insecure,
            socket_mode: 0o600,
            ..Default::default()
        }
    }

    #[test]
    fn plain_tcp_needs_insecure_and_unix_does_not() {
        let tcp: SocketAddr = "tcp:0.0.0.0:4445".parse().unwrap();
        let unix: SocketAddr = "unix:/run/x.sock".parse().unwrap();

        let err = sec(false).control_tls(&tcp).unwrap_err().to_string();

        assert!(err.contains("give --tls-creds DIR"), "{err}");
        assert!(err.contains("--insecure"), "{err}");
        assert!(sec(true).control_tls(&tcp).unwrap().is_none());
        assert!(sec(false).control_tls(&unix).unwrap().is_none());
        assert!(sec(false).nbd_policy(&tcp, "the VM", false).is_err());
        assert!(matches!(
            sec(false).nbd_policy(&unix, "the primary", true),
            Ok(TlsPolicy::Off)
        ));
    }

    #[test]
    fn metrics_off_loopback_needs_insecure() {
        let local: SocketAddr = "tcp:127.0.0.1:9100".parse().unwrap();
        let wide: SocketAddr = "tcp:0.0.0.0:9100".parse().unwrap();
        assert!(sec(false).check_metrics(&local).is_ok());
        assert!(sec(false).check_metrics(&wide).is_err());
        assert!(sec(true).check_metrics(&wide).is_ok());
    }

    #[test]
    fn socket_modes_are_octal() {
        assert_eq!(octal_mode("600"), Ok(0o600));
        assert_eq!(octal_mode("0o660"), Ok(0o660));
        assert!(octal_mode("999").is_err());
        assert!(octal_mode("7777").is_err());
    }
}

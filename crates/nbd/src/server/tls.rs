//! The handshake phase with TLS: the greeting, options in the clear, and after
//! NBD_OPT_STARTTLS the TLS handshake and the options again over TLS.
//!
//! ```text
//!   greeting --> options (clear) --GO/EXPORT_NAME--> transmission (only when TLS is not required)
//!                     |
//!                     '--STARTTLS acked--> TLS handshake (client certificate, authz)
//!                                            --> options again, from scratch --> transmission
//! ```
//!
//! The whole of it runs inside the server's handshake timeout, so a client that stalls the TLS
//! handshake is dropped like one that stalls the options.

use std::sync::Arc;

use net::TlsServer;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};

use super::claim::Claims;
use super::export::ExportSet;
use super::handshake::{Negotiation, Step, TlsState, greet, options};
use super::{ConnError, Session};

/// Whether a listener speaks TLS.
#[derive(Clone, Default)]
pub enum TlsPolicy {
    /// No TLS: NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
    #[default]
    Off,
    /// Clients may upgrade with NBD_OPT_STARTTLS or stay in the clear (a unix socket that file
    /// permissions protect).
    Allowed(Arc<TlsServer>),
    /// Clients must upgrade before anything else (FORCEDTLS).
    Required(Arc<TlsServer>),
}

impl TlsPolicy {
    fn state(&self) -> TlsState {
        match self {
            TlsPolicy::Off => TlsState::Off,
            TlsPolicy::Allowed(_) => TlsState::Allowed,
            TlsPolicy::Required(_) => TlsState::Required,
        }
    }

    fn server(&self) -> Option<&TlsServer> {
        match self {
            TlsPolicy::Off => None,
            TlsPolicy::Allowed(s) | TlsPolicy::Required(s) => Some(s),
        }
    }
}

/// The stream a negotiated connection goes on with.
pub(super) enum Transport<S> {
    Plain(S),
    Tls(Box<net::tls::TlsStream<S>>),
}

/// A connection past the handshake.
pub(super) struct Negotiated<S> {
    pub(super) transport: Transport<S>,
    /// Bytes the client sent after its last option that the handshake already read.
    pub(super) leftover: Vec<u8>,
    pub(super) session: Session,
    /// The client certificate's distinguished name, over TLS.
    pub(super) identity: Option<String>,
}

/// Runs the handshake phase on `stream`. `Ok(None)`: the client aborted politely.
pub(super) async fn handshake<S>(
    stream: S,
    exports: &ExportSet,
    tls: &TlsPolicy,
    (claims, peer): (&Arc<Claims>, &str),
) -> Result<Option<Negotiated<S>>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut clear = BufReader::new(stream);
    let no_zeroes = greet(&mut clear).await?;
    let mut st = Negotiation::new(no_zeroes, tls.state()).with_claims(claims.clone(), None, peer);
    let session = match options(&mut clear, &mut st, exports).await? {
        Step::Abort => return Ok(None),
        Step::Transmit(session) => {
            return Ok(Some(Negotiated {
                leftover: clear.buffer().to_vec(),
                transport: Transport::Plain(clear.into_inner()),
                session,
                identity: None,
            }));
        }
        Step::StartTls => {
            // Bytes sent before the server's TLS handshake began would otherwise be taken as
            // protected (the STARTTLS injection class of bugs).
            if !clear.buffer().is_empty() {
                return Err(ConnError::Protocol(
                    "the client sent data after NBD_OPT_STARTTLS before the TLS handshake".into(),
                ));
            }
            let server = tls
                .server()
                .expect("STARTTLS is acknowledged only with credentials");
            let (stream, identity) = server.handshake(clear.into_inner()).await?;
            let mut secure = BufReader::new(stream);
            let mut st = Negotiation::new(st.no_zeroes(), TlsState::Active).with_claims(
                claims.clone(),
                Some(identity.clone()),
                peer,
            );
            // A client not in the authz list is told why in the replies to its options.
            let denied = server.authorise(&identity).err();
            if let Some(e) = &denied {
                st.deny(e.to_string());
            }
            match options(&mut secure, &mut st, exports).await {
                Err(_) | Ok(Step::Abort) if denied.is_some() => {
                    return Err(denied.expect("checked").into());
                }
                Err(e) => return Err(e),
                Ok(Step::Abort) => return Ok(None),
                Ok(Step::StartTls) => unreachable!("STARTTLS is refused once TLS is active"),
                Ok(Step::Transmit(session)) => Negotiated {
                    leftover: secure.buffer().to_vec(),
                    transport: Transport::Tls(Box::new(secure.into_inner())),
                    session,
                    identity: Some(identity),
                },
            }
        }
    };
    Ok(Some(session))
}

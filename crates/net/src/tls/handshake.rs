//! The TLS handshake, run by rustls's unbuffered API over an async stream, then handed to our
//! record layer with the keys rustls extracted.
//!
//! The handshake is over when rustls can write application data and no longer handshakes (a
//! TLS 1.3 server may write before the client's Finished; we wait for it, so that the client's
//! certificate is checked before anything is served). Records that arrived behind the last
//! handshake message were opened by rustls or are still whole in our buffer; both go to the
//! record layer, so no byte the peer sent is lost.

use std::io;

use rustls::pki_types::CertificateDer;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ExtractedSecrets, client, server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::record::{Keys, TlsStream};

/// The most handshake bytes we hold while waiting for a message to complete; rustls refuses
/// handshake messages over 64 KiB, so a peer cannot make us hold more than that and a record.
const MAX_INCOMING: usize = 0xffff + 2 * (5 + (1 << 14) + 256);
/// Application data that arrived during the handshake, held for the first reads.
const MAX_EARLY: usize = 1 << 20;

/// One side of an unbuffered rustls connection.
pub(super) trait Side {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>>;
    fn into_keys(self) -> Result<(ExtractedSecrets, Keys), rustls::Error>;
}

/// The client and the server connection have the same methods under different types.
macro_rules! side {
    ($conn:ty, $data:ty, $keys:path) => {
        impl Side for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
                (**self).peer_certificates().map(<[_]>::to_vec)
            }
            fn into_keys(self) -> Result<(ExtractedSecrets, Keys), rustls::Error> {
                let (s, k) = self.dangerous_into_kernel_connection()?;
                Ok((s, $keys(k)))
            }
        }
    };
}

side!(
    client::UnbufferedClientConnection,
    client::ClientConnectionData,
    Keys::Client
);
side!(
    server::UnbufferedServerConnection,
    server::ServerConnectionData,
    Keys::Server
);

enum Step {
    Send,
    Receive,
    Done,
    Continue,
}

/// Runs the handshake of `conn` over `io`; returns the stream and the peer's certificates.
pub(super) async fn run<C, S>(
    mut conn: C,
    mut io: S,
) -> Result<(TlsStream<S>, Vec<CertificateDer<'static>>), io::Error>
where
    C: Side,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut incoming = vec![0u8; 16 * 1024];
    let mut used = 0;
    let mut outgoing = vec![0u8; 4 * 1024];
    let mut queued = 0;
    let mut early = Vec::new();
    loop {
        let status = conn.process(&mut incoming[..used]);
        let mut discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(e) => {
                // rustls queued an alert that tells the peer why: send it if it goes at once.
                if let Ok(ConnectionState::EncodeTlsData(mut st)) = conn.process(&mut []).state {
                    let mut alert = [0u8; 64];
                    if let Ok(n) = st.encode(&mut alert) {
                        let _ = io.write_all(&outgoing[..queued]).await;
                        let _ = io.write_all(&alert[..n]).await;
                        let _ = io.flush().await;
                    }
                }
                return Err(tls_error(e));
            }
        };
        let step = match state {
            ConnectionState::EncodeTlsData(mut st) => loop {
                match st.encode(&mut outgoing[queued..]) {
                    Ok(n) => {
                        queued += n;
                        break Step::Continue;
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        outgoing.resize(queued + required_size, 0);
                    }
                    Err(e) => return Err(io::Error::other(format!("TLS handshake: {e}"))),
                }
            },
            ConnectionState::TransmitTlsData(st) => {
                // The bytes are ours to send from here; rustls only needs to know they left.
                st.done();
                Step::Send
            }
            ConnectionState::BlockedHandshake => Step::Receive,
            ConnectionState::ReadTraffic(mut st) => {
                while let Some(record) = st.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    if early.len() + record.payload.len() > MAX_EARLY {
                        return Err(io::Error::other(
                            "over 1 MiB of data during the TLS handshake",
                        ));
                    }
                    early.extend_from_slice(record.payload);
                }
                Step::Continue
            }
            ConnectionState::WriteTraffic(_) if queued > 0 => Step::Send,
            ConnectionState::WriteTraffic(_) => Step::Done,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the TLS connection during the handshake",
                ));
            }
            other => {
                return Err(io::Error::other(format!(
                    "unexpected TLS handshake state {other:?}"
                )));
            }
        };
        if discard > 0 {
            incoming.copy_within(discard..used, 0);
            used -= discard;
        }
        let step = match step {
            // A server may write before the client's Finished: wait for the client.
            Step::Done if conn.handshaking() => Step::Receive,
            s => s,
        };
        match step {
            Step::Continue => {}
            Step::Send => {
                io.write_all(&outgoing[..queued]).await?;
                io.flush().await?;
                queued = 0;
            }
            Step::Receive => {
                if used == incoming.len() {
                    if incoming.len() >= MAX_INCOMING {
                        return Err(io::Error::other("a TLS handshake message over 64 KiB"));
                    }
                    incoming.resize((incoming.len() * 2).min(MAX_INCOMING), 0);
                }
                let n = io.read(&mut incoming[used..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ));
                }
                used += n;
            }
            Step::Done => break,
        }
    }
    let certs = conn.peer_certificates().unwrap_or_default();
    let (secrets, keys) = conn.into_keys().map_err(tls_error)?;
    let stream = TlsStream::new(io, keys, secrets, &incoming[..used], early)?;
    Ok((stream, certs))
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

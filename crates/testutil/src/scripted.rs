//! The server's side of an NBD connection, scripted: a test (or a fuzz target) plays the server
//! against the client over an in-memory stream, so it decides every byte the client reads and
//! sees every byte the client sends.
//!
//! [`Offer`] says what the server advertises and answers the handshake, interactively
//! ([`Offer::serve_handshake`]) or as one block of bytes sent up front ([`Offer::handshake`]);
//! the other functions read requests and send replies in the transmission phase.

use bytes::{BufMut, Bytes, BytesMut};
use nbd::proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Every transmission flag a client acts on, set (not read-only, not rotational, no DF).
pub const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_FAST_ZERO
    | FLAG_SEND_CACHE;

/// The id the scripted server gives `base:allocation` (any nonzero value a server picks).
pub const META_ID: u32 = 7;

/// What the scripted server advertises, and how it answers each handshake option.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// (minimum, preferred, maximum) sent as NBD_INFO_BLOCK_SIZE; `None` sends none.
    pub block_size: Option<(u32, u32, u32)>,
    /// Acknowledge NBD_OPT_STRUCTURED_REPLY (else refuse it with NBD_REP_ERR_UNSUP).
    pub structured: bool,
    /// Select `base:allocation` under this id (`None`: refuse NBD_OPT_SET_META_CONTEXT).
    pub meta_context: Option<u32>,
    /// Refuse NBD_OPT_GO with NBD_REP_ERR_UNSUP (the client falls back to EXPORT_NAME).
    pub go_unsupported: bool,
}

impl Default for Offer {
    /// A 1 MiB export with [`ALL_FLAGS`], structured replies and `base:allocation` as
    /// [`META_ID`], no block sizes.
    fn default() -> Self {
        Offer {
            size: 1 << 20,
            flags: ALL_FLAGS,
            block_size: None,
            structured: true,
            meta_context: Some(META_ID),
            go_unsupported: false,
        }
    }
}

impl Offer {
    /// The greeting: fixed newstyle, with NO_ZEROES.
    pub fn greeting(out: &mut BytesMut) {
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }

    /// Appends the replies to `option` to `out`; `true` when they end the handshake. Panics on
    /// an option a client of ours never sends.
    pub fn answer(&self, option: u32, out: &mut BytesMut) -> bool {
        match option {
            OPT_STRUCTURED_REPLY if self.structured => option_reply(out, option, REP_ACK, &[]),
            OPT_STRUCTURED_REPLY => option_reply(out, option, REP_ERR_UNSUP, &[]),
            OPT_SET_META_CONTEXT => match self.meta_context {
                Some(id) => {
                    let mut ctx = BytesMut::new();
                    ctx.put_u32(id);
                    ctx.put_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(out, option, REP_META_CONTEXT, &ctx);
                    option_reply(out, option, REP_ACK, &[]);
                }
                None => option_reply(out, option, REP_ERR_UNSUP, &[]),
            },
            OPT_GO if self.go_unsupported => option_reply(out, option, REP_ERR_UNSUP, &[]),
            OPT_GO => {
                let mut export = BytesMut::new();
                export.put_u16(INFO_EXPORT);
                export.put_u64(self.size);
                export.put_u16(self.flags);
                option_reply(out, option, REP_INFO, &export);
                if let Some((min, preferred, max)) = self.block_size {
                    let mut sizes = BytesMut::new();
                    sizes.put_u16(INFO_BLOCK_SIZE);
                    sizes.put_u32(min);
                    sizes.put_u32(preferred);
                    sizes.put_u32(max);
                    option_reply(out, option, REP_INFO, &sizes);
                }
                option_reply(out, option, REP_ACK, &[]);
                return true;
            }
            // Client flags NO_ZEROES: size and flags only.
            OPT_EXPORT_NAME => {
                out.put_u64(self.size);
                out.put_u16(self.flags);
                return true;
            }
            o => panic!("unexpected option {o}"),
        }
        false
    }

    /// The whole server side of the handshake our client runs (structured replies, then
    /// `base:allocation` if those were acknowledged, then NBD_OPT_GO), for sending up front.
    pub fn handshake(&self) -> Vec<u8> {
        let mut out = BytesMut::new();
        Offer::greeting(&mut out);
        self.answer(OPT_STRUCTURED_REPLY, &mut out);
        if self.structured {
            self.answer(OPT_SET_META_CONTEXT, &mut out);
        }
        self.answer(OPT_GO, &mut out);
        out.to_vec()
    }

    /// Plays the server's half of a fixed-newstyle handshake on `s`, option by option, up to
    /// the transmission phase. Panics unless the client answers with both fixed-newstyle
    /// client flags.
    pub async fn serve_handshake<S: AsyncRead + AsyncWrite + Unpin>(&self, s: &mut S) {
        let mut hello = BytesMut::new();
        Offer::greeting(&mut hello);
        s.write_all(&hello).await.unwrap();
        assert_eq!(
            s.read_u32().await.unwrap(),
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        );
        loop {
            let (option, _) = read_option(s).await;
            let mut out = BytesMut::new();
            let done = self.answer(option, &mut out);
            s.write_all(&out).await.unwrap();
            if done {
                return;
            }
        }
    }
}

/// Reads one client option: its number and payload.
pub async fn read_option<S: AsyncRead + Unpin>(s: &mut S) -> (u32, Bytes) {
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let option = s.read_u32().await.unwrap();
    let mut data = vec![0; s.read_u32().await.unwrap() as usize];
    s.read_exact(&mut data).await.unwrap();
    (option, data.into())
}

/// Reads one request header and its payload (a write's).
pub async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> (Request, Bytes) {
    let mut header = [0; REQUEST_LEN];
    s.read_exact(&mut header).await.unwrap();
    let req = Request::parse(&header).unwrap();
    let len = if req.has_payload() {
        req.length as usize
    } else {
        0
    };
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await.unwrap();
    (req, payload.into())
}

/// Sends one structured reply chunk.
pub async fn send_chunk<S: AsyncWrite + Unpin>(
    s: &mut S,
    flags: u16,
    kind: u16,
    cookie: u64,
    body: &[u8],
) {
    let mut out = BytesMut::new();
    chunk_header(&mut out, flags, kind, cookie, body.len() as u32);
    out.put_slice(body);
    s.write_all(&out).await.unwrap();
}

/// Sends an OFFSET_DATA chunk carrying `data` at `offset`; `done` ends the reply.
pub async fn send_data<S: AsyncWrite + Unpin>(
    s: &mut S,
    cookie: u64,
    offset: u64,
    data: &[u8],
    done: bool,
) {
    let mut body = BytesMut::new();
    body.put_u64(offset);
    body.put_slice(data);
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    send_chunk(s, flags, REPLY_TYPE_OFFSET_DATA, cookie, &body).await;
}

/// Sends a simple reply header (a read's data, if any, is for the caller to send).
pub async fn send_simple<S: AsyncWrite + Unpin>(s: &mut S, error: u32, cookie: u64) {
    let mut out = BytesMut::new();
    simple_reply(&mut out, error, cookie);
    s.write_all(&out).await.unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_interactive_handshake_sends_what_the_up_front_one_sends() {
        // What our client sends: its flags, then three options without payloads.
        let mut options = BytesMut::new();
        options.put_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        for option in [OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_GO] {
            options.put_u64(IHAVEOPT);
            options.put_u32(option);
            options.put_u32(0);
        }
        let offer = Offer {
            block_size: Some((512, 4096, 65536)),
            meta_context: Some(9),
            ..Offer::default()
        };
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let serving = tokio::spawn(async move { offer.serve_handshake(&mut server).await });
        client.write_all(&options).await.unwrap();
        serving.await.unwrap();
        let mut got = vec![0; offer.handshake().len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, offer.handshake());
    }
}

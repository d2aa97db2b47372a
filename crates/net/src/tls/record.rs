//! TLS 1.3's record layer after the handshake: our own, on aws-lc's AEAD, with rustls keeping the
//! keys (its kernel-connection API, made for kTLS).
//!
//! Why not rustls's buffered stream: on the replica link it copied every byte twice more than
//! the cipher needs (into a record vector on the way out; into a plaintext vector and out again
//! on the way in) and read the socket 4 KiB at a time. Here a record is sealed from the
//! caller's buffer straight into the buffer it is sent from (aws-lc seals out of place, the
//! content type byte included), and opened straight into the reader's buffer when it has room
//! for the record, uninitialised or not ([`super::open`]; else in place where it was read, then
//! copied); the socket is read and written in chunks of up to 256 KiB. What remains over a
//! plain socket is the cipher. A record
//! gathered from several pieces (a vectored header and payload) is copied together first and
//! sealed in place.
//!
//! ```text
//!  poll_write(plain) --seal out of place--> tx: [hdr|ciphertext|tag][hdr|...]  --write--> io
//!  io --read up to 256 KiB--> rx: [hdr|ciphertext|tag][hdr|ciph... (partial)
//!                                      `--open into poll_read(out) (or in place, then copy)
//! ```
//!
//! Post-handshake messages: a KeyUpdate from the peer changes the read key (and, when it asks,
//! ours before our next record); we update our own key before the suite's confidentiality limit;
//! a client takes the server's NewSessionTickets and drops them (resumption is off). Anything
//! else, a record that fails authentication or a fatal alert ends the connection with an error
//! that says which; close_notify is the clean end of the stream.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::open::{Aead, NONCE, OpeningKey, TAG};

/// The most plaintext a record carries (RFC 8446 5.1).
const MAX_PLAIN: usize = 1 << 14;
/// The largest ciphertext a peer may send: plaintext, content type, padding and tag (5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
const HEADER: usize = 5;
/// Ciphertext held for the socket before a writer waits; also the most read in one call. One
/// large write or read per 16 records keeps the system calls off the profile.
const CHUNK: usize = 256 * 1024;
/// The send buffer grows to this at most: `CHUNK` waiting, plus the records one write seals.
const TX_MAX: usize = CHUNK + 2 * (HEADER + MAX_CIPHERTEXT);
/// The receive buffer starts at one record and doubles to `CHUNK` while reads fill it.
const RX_MIN: usize = HEADER + MAX_CIPHERTEXT;
/// Handshake messages after the handshake (tickets, KeyUpdate) held while they arrive in
/// pieces; rustls bounds handshake messages to the same.
const MAX_HANDSHAKE: usize = 0xffff;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

/// One direction's key, IV and record sequence number: aws-lc-rs's key for sealing, ours for
/// opening (it opens into memory the reader has not initialised, see [`super::open`]).
struct Direction<K> {
    key: K,
    iv: [u8; NONCE],
    seq: u64,
}

/// A key made from a traffic secret.
trait RecordKey: Sized {
    fn new(aead: Aead, key: &[u8]) -> Option<Self>;
}

impl RecordKey for LessSafeKey {
    fn new(aead: Aead, key: &[u8]) -> Option<Self> {
        let alg = match aead {
            Aead::Aes128Gcm => &AES_128_GCM,
            Aead::Aes256Gcm => &AES_256_GCM,
            Aead::Chacha20Poly1305 => &CHACHA20_POLY1305,
        };
        UnboundKey::new(alg, key).ok().map(LessSafeKey::new)
    }
}

impl RecordKey for OpeningKey {
    fn new(aead: Aead, key: &[u8]) -> Option<Self> {
        OpeningKey::new(aead, key)
    }
}

impl<K: RecordKey> Direction<K> {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Direction<K>> {
        let (aead, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Aead::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Aead::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Aead::Chacha20Poly1305, key, iv)
            }
            _ => {
                return Err(protocol(
                    "the negotiated cipher suite has no record layer here",
                ));
            }
        };
        let key = K::new(aead, key.as_ref())
            .ok_or_else(|| protocol("the negotiated traffic key does not fit its cipher"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| protocol("the negotiated IV is not 12 bytes"))?;
        Ok(Direction { key, iv, seq })
    }

    /// The per-record nonce: the IV with the sequence number xored into its last 8 bytes (5.3).
    fn nonce_bytes(&self) -> [u8; NONCE] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }
}

impl Direction<LessSafeKey> {
    fn nonce(&self) -> Nonce {
        Nonce::assume_unique_for_key(self.nonce_bytes())
    }
}

/// rustls's half that knows the traffic secrets.
pub(super) enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Keys::Client(k) => k.negotiated_cipher_suite(),
            Keys::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    fn next_tx(&mut self) -> io::Result<Direction<LessSafeKey>> {
        let next = match self {
            Keys::Client(k) => k.update_tx_secret(),
            Keys::Server(k) => k.update_tx_secret(),
        };
        Direction::new(next.map_err(|e| protocol(format!("TLS key update: {e}")))?)
    }

    fn next_rx(&mut self) -> io::Result<Direction<OpeningKey>> {
        let next = match self {
            Keys::Client(k) => k.update_rx_secret(),
            Keys::Server(k) => k.update_rx_secret(),
        };
        Direction::new(next.map_err(|e| protocol(format!("TLS key update: {e}")))?)
    }

    fn ticket(&mut self, body: &[u8]) -> io::Result<()> {
        match self {
            Keys::Client(k) => k
                .handle_new_session_ticket(body)
                .map_err(|e| protocol(format!("the server's session ticket: {e}"))),
            Keys::Server(_) => Err(protocol("a TLS client sent a NewSessionTicket")),
        }
    }
}

/// A TLS 1.3 connection past its handshake.
pub struct TlsStream<S> {
    io: S,
    keys: Keys,
    tx: Direction<LessSafeKey>,
    /// Sealed records not yet taken by the socket: `tx_buf[tx_pos..tx_end]`. The buffer keeps
    /// its length (zeroed once) so that records are sealed into it without zeroing it again.
    tx_buf: Vec<u8>,
    tx_pos: usize,
    tx_end: usize,
    /// The peer asked for our KeyUpdate; it goes before our next record.
    owe_key_update: bool,
    /// Our records under one key before we change it: the suite's confidentiality limit.
    key_update_after: u64,
    closed_tx: bool,
    rx: Direction<OpeningKey>,
    /// Bytes read: `rx_buf[rx_start..rx_end]` is not yet opened.
    rx_buf: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// The opened record's plaintext not yet read, inside `rx_buf` before `rx_start`.
    plain: Range<usize>,
    /// Plaintext the handshake read past its end, served first.
    early: Vec<u8>,
    /// A handshake message that spans records.
    partial_handshake: Vec<u8>,
    peer_closed: bool,
}

impl<S> TlsStream<S> {
    /// `leftover`: bytes the handshake read after its last message; `early`: application data
    /// the handshake already opened.
    pub(super) fn new(
        io: S,
        keys: Keys,
        secrets: ExtractedSecrets,
        leftover: &[u8],
        early: Vec<u8>,
    ) -> io::Result<TlsStream<S>> {
        let key_update_after = match keys.suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            #[allow(unreachable_patterns)]
            _ => return Err(protocol("the record layer speaks TLS 1.3 only")),
        };
        let mut rx_buf = vec![0; RX_MIN.max(leftover.len())];
        rx_buf[..leftover.len()].copy_from_slice(leftover);
        Ok(TlsStream {
            io,
            tx: Direction::new(secrets.tx)?,
            rx: Direction::new(secrets.rx)?,
            keys,
            tx_buf: Vec::new(),
            tx_pos: 0,
            tx_end: 0,
            owe_key_update: false,
            key_update_after,
            closed_tx: false,
            rx_buf,
            rx_start: 0,
            rx_end: leftover.len(),
            plain: 0..0,
            early,
            partial_handshake: Vec::new(),
            peer_closed: false,
        })
    }

    /// The cipher suite the handshake chose.
    pub fn cipher_suite(&self) -> rustls::CipherSuite {
        self.keys.suite().suite()
    }

    /// Changes our key after this many records instead of at the suite's limit, so that tests
    /// can see key updates happen.
    #[doc(hidden)]
    pub fn set_key_update_after(&mut self, records: u64) {
        self.key_update_after = records;
    }

    /// Seals one record of any inner content type with `payload` (up to 16 KiB) and `padding`
    /// zeroes, as a peer that sends whatever it likes would: the fuzz target's other end.
    #[doc(hidden)]
    pub fn queue_raw_record(&mut self, typ: u8, payload: &[u8], padding: usize) -> io::Result<()> {
        let padding = padding.min(MAX_PLAIN - payload.len().min(MAX_PLAIN));
        self.seal_copied(typ, &[payload], padding).map(drop)
    }

    /// Queues bytes for the socket as they are, outside any record.
    #[doc(hidden)]
    pub fn queue_raw_bytes(&mut self, bytes: &[u8]) {
        let at = self.reserve_tx(bytes.len());
        self.tx_buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Room for `n` more bytes after `tx_end`: moves what is pending to the front or grows the
    /// buffer. Returns where the `n` bytes go.
    fn reserve_tx(&mut self, n: usize) -> usize {
        if self.tx_end + n > self.tx_buf.len() {
            self.tx_buf.copy_within(self.tx_pos..self.tx_end, 0);
            self.tx_end -= self.tx_pos;
            self.tx_pos = 0;
            if self.tx_end + n > self.tx_buf.len() {
                let need = self.tx_end + n;
                let len = (2 * self.tx_buf.len()).clamp(need, TX_MAX.max(need));
                self.tx_buf.resize(len, 0);
            }
        }
        let at = self.tx_end;
        self.tx_end += n;
        at
    }

    /// Appends one record of content type `typ` holding the concatenation of `parts`, at most
    /// `MAX_PLAIN` bytes; returns how many bytes it took.
    fn seal(&mut self, typ: u8, parts: &[&[u8]]) -> io::Result<usize> {
        if let [one] = parts {
            // One piece: sealed from where it is into the record, no copy first.
            let taken = one.len().min(MAX_PLAIN);
            self.seal_from(typ, &one[..taken])?;
            return Ok(taken);
        }
        self.seal_copied(typ, parts, 0)
    }

    /// A record laid out as `TLSInnerPlaintext` allows, gathered into the send buffer and
    /// sealed there: the concatenation of `parts` (at most `MAX_PLAIN`), the content type, then
    /// `padding` zeroes. Returns how many bytes of `parts` it took.
    fn seal_copied(&mut self, typ: u8, parts: &[&[u8]], padding: usize) -> io::Result<usize> {
        let taken = parts.iter().map(|p| p.len()).sum::<usize>().min(MAX_PLAIN);
        let start = self.reserve_tx(HEADER + taken + 1 + padding + TAG);
        let mut at = start + HEADER;
        let mut left = taken;
        for p in parts {
            let n = p.len().min(left);
            self.tx_buf[at..at + n].copy_from_slice(&p[..n]);
            at += n;
            left -= n;
        }
        self.tx_buf[at] = typ;
        self.tx_buf[at + 1..at + 1 + padding].fill(0);
        self.seal_at(start, taken + 1 + padding)?;
        Ok(taken)
    }

    fn header(len: usize) -> [u8; HEADER] {
        let [hi, lo] = (len as u16).to_be_bytes();
        [APPLICATION_DATA, 3, 3, hi, lo]
    }

    /// Seals the `plain` bytes after the header at `start` in place, the tag after them (the
    /// caller reserved the whole record).
    fn seal_at(&mut self, start: usize, plain: usize) -> io::Result<()> {
        let header = Self::header(plain + TAG);
        self.tx_buf[start..start + HEADER].copy_from_slice(&header);
        let tag_at = start + HEADER + plain;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(
                self.tx.nonce(),
                Aad::from(header),
                &mut self.tx_buf[start + HEADER..tag_at],
            )
            .map_err(|_| protocol("sealing a TLS record failed"))?;
        self.tx_buf[tag_at..tag_at + TAG].copy_from_slice(tag.as_ref());
        self.tx.seq += 1;
        Ok(())
    }

    /// Seals `content` and the content type `typ` from where they are into a new record.
    fn seal_from(&mut self, typ: u8, content: &[u8]) -> io::Result<()> {
        let n = content.len();
        let header = Self::header(n + 1 + TAG);
        let start = self.reserve_tx(HEADER + n + 1 + TAG);
        self.tx_buf[start..start + HEADER].copy_from_slice(&header);
        let (body, rest) =
            self.tx_buf[start + HEADER..start + HEADER + n + 1 + TAG].split_at_mut(n);
        self.tx
            .key
            .seal_out_of_place_scatter(
                self.tx.nonce(),
                Aad::from(header),
                content,
                body,
                &[typ],
                rest,
            )
            .map_err(|_| protocol("sealing a TLS record failed"))?;
        self.tx.seq += 1;
        Ok(())
    }

    /// Before an application record: the KeyUpdate the peer asked for, or ours at the limit.
    fn key_update_if_due(&mut self) -> io::Result<()> {
        if self.owe_key_update || self.tx.seq >= self.key_update_after {
            // update_not_requested: the peer changes its own key at its own limit.
            self.seal(HANDSHAKE, &[&[KEY_UPDATE, 0, 0, 1, 0]])?;
            self.tx = self.keys.next_tx()?;
            self.owe_key_update = false;
        }
        Ok(())
    }

    /// Seals up to `limit` bytes of `bufs` into records of up to `MAX_PLAIN`.
    fn seal_data(&mut self, bufs: &[io::IoSlice<'_>], limit: usize) -> io::Result<usize> {
        let mut total = 0;
        let (mut i, mut off) = (0, 0);
        while total < limit && i < bufs.len() {
            // Gather this record's pieces; a vectored header and payload share records.
            let mut parts: Vec<&[u8]> = Vec::with_capacity(4);
            let mut n = 0;
            while n < MAX_PLAIN && total + n < limit && i < bufs.len() {
                let rest = &bufs[i][off..];
                let k = rest.len().min(MAX_PLAIN - n).min(limit - total - n);
                parts.push(&rest[..k]);
                n += k;
                off += k;
                if off == bufs[i].len() {
                    i += 1;
                    off = 0;
                }
            }
            if n == 0 {
                break;
            }
            self.key_update_if_due()?;
            // `parts` borrows `bufs`, not `self`.
            let taken = self.seal(APPLICATION_DATA, &parts)?;
            debug_assert_eq!(taken, n);
            total += n;
        }
        Ok(total)
    }

    /// Opens the next complete record in `rx_buf`, if there is one: application data straight
    /// into `out` when it has room for the whole record (one pass, no copy after), else in
    /// place into `plain`. `Ok(None)`: more bytes are needed.
    fn open_next(&mut self, out: &mut ReadBuf<'_>) -> io::Result<Option<usize>> {
        let avail = &self.rx_buf[self.rx_start..self.rx_end];
        if avail.len() < HEADER {
            return Ok(None);
        }
        let header: [u8; HEADER] = avail[..HEADER].try_into().expect("5 bytes");
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != APPLICATION_DATA {
            return Err(protocol(format!(
                "a TLS record of type {} after the handshake (only encrypted records may follow it)",
                header[0]
            )));
        }
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(protocol(format!(
                "a TLS record of {len} bytes (record_overflow)"
            )));
        }
        if avail.len() < HEADER + len {
            return Ok(None);
        }
        let body = self.rx_start + HEADER;
        let sealed = len - TAG;
        self.rx_start = body + len;
        let nonce = self.rx.nonce_bytes();
        self.rx.seq += 1;
        let bad_mac = |_| protocol("a TLS record failed authentication (bad_record_mac)");
        if out.remaining() >= sealed {
            // The content type and padding land in `out` too, past what is handed over.
            let (ciphertext, tag) = self.rx_buf[body..body + len].split_at(sealed);
            let tag = tag.try_into().expect("TAG bytes");
            let dst = self
                .rx
                .key
                .open_into(&nonce, &header, ciphertext, tag, out)
                .map_err(bad_mac)?;
            let (typ, end) = content_type(dst)?;
            if typ == APPLICATION_DATA {
                out.advance(end);
                return Ok(Some(end));
            }
            let content = dst[..end].to_vec();
            self.control(typ, &content)?;
            return Ok(Some(0));
        }
        let opened = self
            .rx
            .key
            .open_in_place(&nonce, &header, &mut self.rx_buf[body..body + len])
            .map_err(bad_mac)?;
        let (typ, end) = content_type(opened)?;
        if typ == APPLICATION_DATA {
            self.plain = body..body + end;
        } else {
            let content = self.rx_buf[body..body + end].to_vec();
            self.control(typ, &content)?;
        }
        Ok(Some(0))
    }

    /// A record that is not application data: an alert or post-handshake messages.
    fn control(&mut self, typ: u8, content: &[u8]) -> io::Result<()> {
        match typ {
            ALERT => self.alert(content),
            HANDSHAKE => self.handshake_message(content),
            t => Err(protocol(format!("a TLS record of inner content type {t}"))),
        }
    }

    fn alert(&mut self, content: &[u8]) -> io::Result<()> {
        let [_level, desc] = *content else {
            return Err(protocol("a malformed TLS alert"));
        };
        match AlertDescription::from(desc) {
            AlertDescription::CloseNotify => {
                self.peer_closed = true;
                Ok(())
            }
            // A warning that a close_notify follows (6.1).
            AlertDescription::UserCanceled => Ok(()),
            d => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the TLS peer sent a fatal alert: {d:?}"),
            )),
        }
    }

    /// Post-handshake messages; one may span records.
    fn handshake_message(&mut self, content: &[u8]) -> io::Result<()> {
        if self.partial_handshake.len() + content.len() > MAX_HANDSHAKE + 4 {
            return Err(protocol("a post-handshake TLS message over 64 KiB"));
        }
        self.partial_handshake.extend_from_slice(content);
        let msgs = std::mem::take(&mut self.partial_handshake);
        let mut rest = &msgs[..];
        while let [typ, a, b, c, body @ ..] = rest {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if len > MAX_HANDSHAKE {
                return Err(protocol(format!(
                    "a post-handshake TLS message of {len} bytes"
                )));
            }
            if body.len() < len {
                break;
            }
            let (body, next) = body.split_at(len);
            match (*typ, body) {
                (KEY_UPDATE, [request @ (0 | 1)]) => {
                    // A KeyUpdate must end its record: what follows is under the new key.
                    if !next.is_empty() {
                        return Err(protocol("data after a TLS KeyUpdate in its record"));
                    }
                    self.rx = self.keys.next_rx()?;
                    self.owe_key_update |= *request == 1;
                }
                (KEY_UPDATE, _) => return Err(protocol("a malformed TLS KeyUpdate")),
                (NEW_SESSION_TICKET, _) => self.keys.ticket(body)?,
                (t, _) => {
                    return Err(protocol(format!(
                        "an unexpected post-handshake TLS message (type {t})"
                    )));
                }
            }
            rest = next;
        }
        self.partial_handshake = rest.to_vec();
        Ok(())
    }

    /// Makes room after `rx_end` for a read, moving a partial record to the front or growing
    /// the buffer up to `CHUNK` when reads keep filling it.
    fn make_room(&mut self) {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        if self.rx_end == self.rx_buf.len() {
            if self.rx_start > 0 {
                self.rx_buf.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if self.rx_end == self.rx_buf.len() && self.rx_buf.len() < CHUNK {
                let len = (self.rx_buf.len() * 2).min(CHUNK);
                self.rx_buf.resize(len, 0);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> TlsStream<S> {
    /// Writes sealed records until at most `keep` bytes of them wait.
    fn poll_drain(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<io::Result<()>> {
        while self.tx_end - self.tx_pos > keep {
            let n = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.tx_buf[self.tx_pos..self.tx_end])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx_pos += n;
        }
        if self.tx_pos == self.tx_end {
            self.tx_pos = 0;
            self.tx_end = 0;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        // Leave room for at least one full record.
        ready!(self.poll_drain(cx, CHUNK - MAX_PLAIN))?;
        if self.closed_tx {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the TLS stream was shut down",
            )));
        }
        let room = CHUNK - (self.tx_end - self.tx_pos);
        let n = self.seal_data(bufs, room)?;
        // Start sending now; what the socket does not take waits for the next write or flush.
        if let Poll::Ready(Err(e)) = self.poll_drain(cx, 0) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(out.remaining());
            out.put_slice(&this.early[..n]);
            this.early.drain(..n);
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut copied = false;
            // Fill `out` from every record already read, so one call takes a large read whole.
            while out.remaining() > 0 {
                if !this.plain.is_empty() {
                    let n = this.plain.len().min(out.remaining());
                    out.put_slice(&this.rx_buf[this.plain.start..this.plain.start + n]);
                    this.plain.start += n;
                    copied = true;
                } else if this.peer_closed {
                    break;
                } else {
                    match this.open_next(out)? {
                        None => break,
                        Some(n) => copied |= n > 0,
                    }
                }
            }
            if copied || out.remaining() == 0 || this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            this.make_room();
            let mut buf = ReadBuf::new(&mut this.rx_buf[this.rx_end..]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            if n == 0 {
                let what = if this.rx_start == this.rx_end {
                    "the TLS peer closed the connection without close_notify"
                } else {
                    "the TLS peer closed the connection in the middle of a record"
                };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, what)));
            }
            this.rx_end += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_slices(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx, 0))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closed_tx {
            this.closed_tx = true;
            // close_notify, warning level (6.1).
            this.seal(ALERT, &[&[1, 0]])?;
        }
        ready!(this.poll_drain(cx, 0))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The content type of an opened `TLSInnerPlaintext` and where its content ends: the type is
/// the last non-zero byte, the zeroes after it padding (RFC 8446 5.4).
fn content_type(opened: &[u8]) -> io::Result<(u8, usize)> {
    let Some(end) = opened.iter().rposition(|&b| b != 0) else {
        return Err(protocol("a TLS record without a content type"));
    };
    if end > MAX_PLAIN {
        return Err(protocol(format!(
            "a TLS record of {end} bytes of plaintext (record_overflow)"
        )));
    }
    Ok((opened[end], end))
}

fn protocol(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

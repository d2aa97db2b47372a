//! Splits a byte stream into JSON messages. QMP messages are JSON objects one after another;
//! most clients end each with a newline, but QEMU does not require it, so neither do we.
//! After a syntax error we skip to the next newline, the only resynchronisation point a
//! streaming JSON protocol has.

use serde_json::Value;

/// Largest message we buffer; a client sending more is cut off.
pub const MAX_MESSAGE: usize = 1 << 20;

/// One item taken from the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// One complete JSON value.
    Message(Value),
    /// Bytes that are not JSON, with the parser's complaint.
    Malformed(String),
}

/// Why the stream cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More than 1 MiB (`MAX_MESSAGE`) without a complete message: a client must not make
    /// us buffer without bound.
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
}

/// Accumulates bytes and yields complete messages.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Dropping the rest of a malformed line whose newline has not arrived yet.
    skipping: bool,
}

impl Framer {
    /// An empty buffer.
    pub fn new() -> Self {
        Framer::default()
    }

    /// Adds bytes read from the stream; fails once the buffer would hold too much.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > MAX_MESSAGE {
            return Err(FrameError::TooLarge);
        }
        Ok(())
    }

    /// The next complete message, if the buffer holds one.
    pub fn next_frame(&mut self) -> Option<Frame> {
        if self.skipping {
            let nl = self.buf.iter().position(|&b| b == b'\n');
            match nl {
                Some(nl) => drop(self.buf.drain(..=nl)),
                None => self.buf.clear(),
            }
            self.skipping = nl.is_none();
        }
        let start = self.buf.iter().position(|b| !b.is_ascii_whitespace())?;
        self.buf.drain(..start);
        let mut stream = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match stream.next()? {
            // Numbers and literals do not mark their own end: "1" at the end of the buffer may
            // be the start of "12", and what follows "null" decides whether it stands alone.
            // Wait for the byte after them.
            Ok(Value::Number(_) | Value::Bool(_) | Value::Null)
                if stream.byte_offset() == self.buf.len() =>
            {
                None
            }
            Ok(v) => {
                let used = stream.byte_offset();
                self.buf.drain(..used);
                Some(Frame::Message(v))
            }
            // Incomplete (a message may span lines and reads): wait for more bytes, as QEMU's
            // streaming parser does; MAX_MESSAGE bounds the wait.
            Err(e) if e.is_eof() => None,
            // An error at the very last byte may only mean the input stops there (a number cut
            // short overflows, "tru" is not yet "true"): decide once the next byte is here.
            Err(e) if error_offset(&self.buf, &e) + 1 >= self.buf.len() => None,
            // Skip to the next newline, however the line is split across reads.
            Err(e) => {
                self.skipping = true;
                Some(Frame::Malformed(format!(
                    "JSON parse error, {}",
                    without_position(&e)
                )))
            }
        }
    }
}

/// The byte index in `buf` that a parse error points at.
fn error_offset(buf: &[u8], e: &serde_json::Error) -> usize {
    let line_start = match e.line() {
        0 | 1 => 0,
        l => buf
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(l - 2)
            .map_or(buf.len(), |(i, _)| i + 1),
    };
    line_start + e.column().saturating_sub(1)
}

/// The parser's complaint without its "at line L column C": the position counts from wherever
/// the buffer happened to start, which depends on how reads split the stream.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(input: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for chunk in input {
            f.push(chunk).unwrap();
            while let Some(fr) = f.next_frame() {
                out.push(fr);
            }
        }
        out
    }

    #[test]
    fn splits_messages_with_and_without_newlines_and_across_reads() {
        let got = frames(&[b"{\"a\":1}{\"b\"", b":2}\n  {\"c\":", b"3}"]);
        assert_eq!(
            got,
            vec![
                Frame::Message(json!({"a":1})),
                Frame::Message(json!({"b":2})),
                Frame::Message(json!({"c":3}))
            ]
        );
    }

    #[test]
    fn resynchronises_after_garbage_at_the_next_newline() {
        let got = frames(&[
            b"{\"a\": nope}\n{\"ok\":true}\n",
            b"{\"spans\": \n",
            b"[1]}",
            b"}}garbage\n[2]",
        ]);
        assert_eq!(got.len(), 5);
        assert!(matches!(&got[0], Frame::Malformed(m) if m.starts_with("JSON parse error")));
        assert_eq!(got[1], Frame::Message(json!({"ok": true})));
        assert_eq!(got[2], Frame::Message(json!({"spans": [1]})));
        assert!(matches!(&got[3], Frame::Malformed(_)));
        assert_eq!(got[4], Frame::Message(json!([2])));
    }

    #[test]
    fn results_do_not_depend_on_how_reads_split_the_input() {
        // Found by the qmp_framer fuzz target: a number split across reads, and a bad line
        // whose newline comes in a later read.
        assert_eq!(frames(&[b"1", b"2\n"]), vec![Frame::Message(json!(12))]);
        let whole = frames(&[b"x {\"execute\":\"qmp_capabilities\"}\n{\"a\":1}"]);
        let split = frames(&[b"x ", b"{\"execute\":\"qmp_capabilities\"}\n{\"a\":1}"]);
        assert_eq!(whole, split);
        assert_eq!(split.len(), 2);
        assert!(matches!(&split[0], Frame::Malformed(_)));
        assert_eq!(split[1], Frame::Message(json!({"a": 1})));
        let whole = frames(&[b"999999e9999999999\n[1]\n"]);
        let split = frames(&[b"999999e999999999", b"9\n[1]\n"]);
        assert_eq!(whole, split);
        assert_eq!(whole.len(), 2);
    }

    #[test]
    fn refuses_oversized_input() {
        let mut f = Framer::new();
        assert_eq!(
            f.push(&vec![b'['; MAX_MESSAGE + 1]),
            Err(FrameError::TooLarge)
        );
    }
}

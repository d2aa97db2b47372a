//! The QMP stream framer on arbitrary bytes delivered in arbitrary pieces.
//!
//! Input: the first byte chooses how the rest is cut into reads, the rest is the stream.
//!  * bit 7 set: cut only right after newlines (how line-oriented clients write);
//!  * bit 7 clear: cut at pseudo-random points, 1..=64 bytes apart, seeded by the byte.
//!
//! Asserts:
//!  * `push` and `next_frame` never panic;
//!  * the frames do not depend on how the stream was cut: feeding the pieces one by one (and
//!    draining after each, as the server does) gives the frames feeding everything at once
//!    gives (two framer bugs this found, a number split across reads and a malformed line
//!    whose newline came in a later read, are fixed; see README.md, "Findings");
//!  * every message, serialised as the server sends it (`<json>\r\n`), frames back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmp::{Frame, Framer};
use serde_json::Value;

/// Feeds `pieces` one after another, draining complete frames after each.
fn frames<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Frame> {
    let mut f = Framer::new();
    let mut out = Vec::new();
    for p in pieces {
        f.push(p).expect("input is far below MAX_MESSAGE");
        while let Some(fr) = f.next_frame() {
            out.push(fr);
        }
    }
    out
}

/// Arbitrary cut points from a small xorshift generator seeded by `seed`.
fn random_pieces(input: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut x = 0x9e37_79b9_u32 ^ u32::from(seed).wrapping_mul(0x0101_0101) | 1;
    let mut pieces = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (x % 64 + 1) as usize;
        let (a, b) = rest.split_at(n.min(rest.len()));
        pieces.push(a);
        rest = b;
    }
    pieces
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(m) => m.values().any(has_float),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    // Far below the framer's 1 MiB limit, so `push` never refuses (nor does re-serialising).
    if input.len() > 64 * 1024 {
        return;
    }
    let whole = frames([input]);
    let newline_aligned = ctl & 0x80 != 0;
    let pieces: Vec<&[u8]> = if newline_aligned {
        input.split_inclusive(|&b| b == b'\n').collect()
    } else {
        random_pieces(input, ctl)
    };
    let cut = frames(pieces.iter().copied());

    for fr in whole.iter().chain(&cut) {
        if let Frame::Malformed(m) = fr {
            assert!(m.starts_with("JSON parse error"), "odd complaint {m:?}");
        }
    }

    {
        assert_eq!(
            cut,
            whole,
            "frames depend on how the stream was cut into reads: {:?}",
            pieces
                .iter()
                .map(|p| String::from_utf8_lossy(p))
                .collect::<Vec<_>>()
        );
    }

    // What the server sends frames back to the same values (floats are left out: serde_json
    // without `float_roundtrip` may parse a float one ulp off).
    let sent: Vec<Value> = whole
        .iter()
        .filter_map(|f| match f {
            Frame::Message(v) if !has_float(v) => Some(v.clone()),
            _ => None,
        })
        .collect();
    let mut wire = Vec::new();
    for v in &sent {
        wire.extend(serde_json::to_vec(v).unwrap());
        wire.extend_from_slice(b"\r\n");
    }
    let back: Vec<Value> = frames([&wire[..]])
        .into_iter()
        .map(|f| match f {
            Frame::Message(v) => v,
            Frame::Malformed(m) => panic!("a serialised message does not frame back: {m}"),
        })
        .collect();
    assert_eq!(back, sent);
});

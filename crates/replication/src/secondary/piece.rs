//! Small helpers that keep large requests large: gathering reads and writes into as few
//! store or disk I/Os as their layout allows.

use std::ops::Range;

use blockdev::{BlockError, ErrorKind, Op, Result};
use bytes::BytesMut;

use super::overlay::Overlay;

/// `len` bytes at store position `pos`, going to (or coming from) `buf[at..at+len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub pos: u64,
    pub at: usize,
    pub len: usize,
}

/// Merges neighbours that are contiguous both in the store and in the buffer. Input in
/// buffer order.
pub(crate) fn coalesce(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match out.last_mut() {
            Some(l) if l.pos + l.len as u64 == p.pos && l.at + l.len == p.at => l.len += p.len,
            _ if p.len == 0 => {}
            _ => out.push(p),
        }
    }
    out
}

/// Reads each piece from `store` into `out`.
pub(crate) async fn read_pieces(
    store: &dyn Overlay,
    pieces: &[Piece],
    out: &mut [u8],
) -> Result<()> {
    for p in pieces {
        let data = store.read(p.pos, p.len).await?;
        fill_from(out, p.at, &data, p.len, p.pos)?;
    }
    Ok(())
}

/// Reads each piece from `store` into the owned `buf`, in one store call.
pub(crate) async fn read_pieces_into(
    store: &dyn Overlay,
    pieces: Vec<Piece>,
    buf: BytesMut,
) -> Result<BytesMut> {
    if pieces.is_empty() {
        return Ok(buf);
    }
    let reads = pieces.iter().map(|p| (p.pos, p.at..p.at + p.len)).collect();
    store.read_into(reads, buf).await
}

/// Copies `data` to `out[at..]`, refusing an answer of the wrong length (a misbehaving device
/// must not take the node down).
pub(crate) fn fill_from(
    out: &mut [u8],
    at: usize,
    data: &[u8],
    want: usize,
    pos: u64,
) -> Result<()> {
    if data.len() != want || at + want > out.len() {
        return Err(
            BlockError::new(ErrorKind::Io(None), Op::Read, pos).context(format!(
                "short read: {} bytes instead of {want}",
                data.len()
            )),
        );
    }
    out[at..at + want].copy_from_slice(data);
    Ok(())
}

/// Appends a byte range, extending the last one when they touch.
pub(crate) fn push_span(spans: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.start >= r.end {
        return;
    }
    match spans.last_mut() {
        Some(l) if l.end == r.start => l.end = r.end,
        _ => spans.push(r),
    }
}

/// Splits an ascending list of clusters into runs of consecutive clusters, each at most `max`
/// long.
pub(crate) fn runs(sorted: &[u64], max: u64) -> Vec<Range<u64>> {
    let max = max.max(1);
    let mut out: Vec<Range<u64>> = Vec::new();
    for &c in sorted {
        match out.last_mut() {
            Some(r) if r.end == c && r.end - r.start < max => r.end += 1,
            _ => out.push(c..c + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_only_doubly_contiguous_pieces() {
        let v = vec![
            Piece {
                pos: 0,
                at: 0,
                len: 4,
            },
            Piece {
                pos: 4,
                at: 4,
                len: 4,
            },
            Piece {
                pos: 100,
                at: 8,
                len: 4,
            },
            Piece {
                pos: 104,
                at: 20,
                len: 4,
            },
        ];
        assert_eq!(
            coalesce(v),
            vec![
                Piece {
                    pos: 0,
                    at: 0,
                    len: 8
                },
                Piece {
                    pos: 100,
                    at: 8,
                    len: 4
                },
                Piece {
                    pos: 104,
                    at: 20,
                    len: 4
                }
            ]
        );
    }

    #[test]
    fn runs_split_on_gaps_and_length() {
        assert_eq!(runs(&[1, 2, 3, 5, 6, 7, 8], 3), vec![1..4, 5..8, 8..9]);
        assert!(runs(&[], 3).is_empty());
    }
}

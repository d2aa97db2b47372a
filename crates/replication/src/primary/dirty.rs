//! The dirty bitmap: which ranges of the primary's disk the secondary may be missing.
//!
//! A write is recorded here whenever it is not known to have reached the secondary: replication
//! not started, link down, or a forward that failed. The bitmap lives as long as the primary
//! node (it survives reconnects), so a later resync sends only these ranges.

use parking_lot::Mutex;

/// A fixed-granularity bitmap over a disk.
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    disk_len: u64,
    bits: Mutex<Bits>,
}

#[derive(Debug)]
struct Bits {
    words: Vec<u64>,
    count: u64,
}

impl DirtyBitmap {
    /// A clean bitmap over `disk_len` bytes; `granularity` must be a power of two.
    pub fn new(disk_len: u64, granularity: u64) -> Self {
        assert!(
            granularity.is_power_of_two(),
            "dirty granularity must be a power of two"
        );
        let clusters = disk_len.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            disk_len,
            bits: Mutex::new(Bits {
                words: vec![0; clusters.div_ceil(64) as usize],
                count: 0,
            }),
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Marks every cluster touched by `offset..offset+len`.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_len {
            return;
        }
        let end = (offset + len).min(self.disk_len);
        let mut b = self.bits.lock();
        for c in offset / self.granularity..end.div_ceil(self.granularity) {
            let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            if b.words[w] & bit == 0 {
                b.words[w] |= bit;
                b.count += 1;
            }
        }
    }

    /// Number of dirty clusters.
    pub fn dirty_clusters(&self) -> u64 {
        self.bits.lock().count
    }

    /// Bytes covered by dirty clusters (the last cluster counted only up to the disk end).
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges().iter().map(|(_, l)| l).sum()
    }

    /// Dirty ranges as (offset, length), merged and in order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let b = self.bits.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, &word) in b.words.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let c = wi as u64 * 64 + w.trailing_zeros() as u64;
                w &= w - 1;
                let start = c * self.granularity;
                let len = self.granularity.min(self.disk_len - start);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == start => *l += len,
                    _ => out.push((start, len)),
                }
            }
        }
        out
    }

    /// Forgets everything (after a full resync).
    pub fn clear(&self) {
        let mut b = self.bits.lock();
        b.words.iter_mut().for_each(|w| *w = 0);
        b.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_whole_clusters_and_merges_ranges() {
        let bm = DirtyBitmap::new(10 * 65536 + 100, 65536);
        bm.mark(65535, 2);
        bm.mark(3 * 65536, 1);
        bm.mark(10 * 65536 + 50, 1000);
        assert_eq!(bm.dirty_clusters(), 4);
        assert_eq!(
            bm.ranges(),
            vec![(0, 2 * 65536), (3 * 65536, 65536), (10 * 65536, 100)]
        );
        assert_eq!(bm.dirty_bytes(), 3 * 65536 + 100);
        bm.mark(0, 1);
        assert_eq!(bm.dirty_clusters(), 4, "marking twice counts once");
        bm.clear();
        assert_eq!(bm.ranges(), vec![]);
    }
}

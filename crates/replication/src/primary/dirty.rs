//! The dirty bitmap: which ranges of the primary's disk the secondary may be missing.
//!
//! A write is recorded here whenever it is not known to have reached the secondary: replication
//! not started, link down, a forward that failed, or a local write that failed part-way. The
//! bitmap lives as long as the primary node (it survives reconnects), so the resync sends only
//! these ranges.
//!
//! A resync copy is registered here while it is on its way ([`DirtyBitmap::begin_copy`]): its
//! bits are cleared only when the secondary acknowledged it, and not at all if the range was
//! marked again meanwhile (a newer write that failed must keep its bit).

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
    /// Copies on their way: (ticket, first cluster, end cluster, marked again meanwhile).
    copies: Vec<(u64, u64, u64, bool)>,
    next_ticket: u64,
}

/// A resync copy of a range, registered until [`DirtyBitmap::finish_copy`].
#[derive(Debug)]
#[must_use = "a copy must be finished, or its range stays registered"]
pub struct CopyTicket {
    id: u64,
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
                copies: Vec::new(),
                next_ticket: 0,
            }),
        }
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Marks every cluster touched by `offset..offset+len`.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_len {
            return;
        }
        let end = offset.saturating_add(len).min(self.disk_len);
        let (first, last) = (offset / self.granularity, end.div_ceil(self.granularity));
        let mut b = self.bits.lock();
        for copy in b.copies.iter_mut() {
            if copy.1 < last && first < copy.2 {
                copy.3 = true;
            }
        }
        for c in first..last {
            let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            if b.words[w] & bit == 0 {
                b.words[w] |= bit;
                b.count += 1;
            }
        }
    }

    /// Marks the whole disk (nothing is known of the secondary's content).
    pub fn mark_all(&self) {
        self.mark(0, self.disk_len);
    }

    /// The first dirty range starting at or after `from`, at most `max_len` bytes (rounded up
    /// to the granularity), starting and ending on cluster boundaries (or the disk's end). A
    /// cluster that `from` falls inside counts as behind it.
    pub fn next_dirty(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let clusters = self.disk_len.div_ceil(self.granularity);
        let max_clusters = max_len.div_ceil(self.granularity).max(1);
        let b = self.bits.lock();
        let is_set = |c: u64| b.words[(c / 64) as usize] & (1u64 << (c % 64)) != 0;
        let mut c = from.div_ceil(self.granularity);
        // Whole clean words are skipped at once.
        while c < clusters && !is_set(c) {
            if c.is_multiple_of(64) && b.words[(c / 64) as usize] == 0 {
                c += 64;
            } else {
                c += 1;
            }
        }
        if c >= clusters {
            return None;
        }
        let start = c;
        while c < clusters && c - start < max_clusters && is_set(c) {
            c += 1;
        }
        let offset = start * self.granularity;
        Some((offset, (c * self.granularity).min(self.disk_len) - offset))
    }

    /// Registers a resync copy of `offset..offset+len` about to be sent.
    pub fn begin_copy(&self, offset: u64, len: u64) -> CopyTicket {
        let end = offset.saturating_add(len).min(self.disk_len);
        let mut b = self.bits.lock();
        b.next_ticket += 1;
        let id = b.next_ticket;
        let range = (offset / self.granularity, end.div_ceil(self.granularity));
        b.copies.push((id, range.0, range.1, false));
        CopyTicket { id }
    }

    /// Ends a copy: with `acknowledged`, its clusters are clean unless marked since
    /// [`begin_copy`](Self::begin_copy). Returns whether it cleared them.
    pub fn finish_copy(&self, ticket: CopyTicket, acknowledged: bool) -> bool {
        let mut b = self.bits.lock();
        let Some(i) = b.copies.iter().position(|c| c.0 == ticket.id) else {
            return false;
        };
        let (_, first, last, marked_again) = b.copies.swap_remove(i);
        if !acknowledged || marked_again {
            return false;
        }
        for c in first..last {
            let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            if b.words[w] & bit != 0 {
                b.words[w] &= !bit;
                b.count -= 1;
            }
        }
        true
    }

    /// Number of dirty clusters.
    pub fn dirty_clusters(&self) -> u64 {
        self.bits.lock().count
    }

    /// Bytes covered by dirty clusters (the last cluster counted only up to the disk end).
    pub fn dirty_bytes(&self) -> u64 {
        // From the count, not a walk: status, metrics and checkpoints ask often, and the VM's
        // writes wait on the same lock.
        let b = self.bits.lock();
        let clusters = self.disk_len.div_ceil(self.granularity);
        let mut bytes = b.count * self.granularity;
        if clusters > 0 {
            let last = clusters - 1;
            if b.words[(last / 64) as usize] & (1u64 << (last % 64)) != 0 {
                bytes -= clusters * self.granularity - self.disk_len;
            }
        }
        bytes
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

    /// Forgets everything (the operator vouches that the disks are equal).
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

    #[test]
    fn next_dirty_walks_in_offset_order_in_bounded_aligned_pieces() {
        let bm = DirtyBitmap::new(200 * 4096 + 10, 4096);
        bm.mark(5000, 1);
        bm.mark(70 * 4096, 10 * 4096);
        bm.mark(200 * 4096 + 3, 1);
        assert_eq!(bm.next_dirty(0, 1 << 20), Some((4096, 4096)));
        assert_eq!(bm.next_dirty(8192, 4 * 4096), Some((70 * 4096, 4 * 4096)));
        assert_eq!(
            bm.next_dirty(74 * 4096, 1 << 20),
            Some((74 * 4096, 6 * 4096))
        );
        assert_eq!(bm.next_dirty(80 * 4096, 1 << 20), Some((200 * 4096, 10)));
        assert_eq!(bm.next_dirty(200 * 4096 + 10, 1 << 20), None);
    }

    #[test]
    fn an_acknowledged_copy_clears_its_bits() {
        let bm = DirtyBitmap::new(1 << 20, 4096);
        bm.mark(0, 3 * 4096);
        let t = bm.begin_copy(0, 2 * 4096);
        assert_eq!(
            bm.dirty_clusters(),
            3,
            "bits stay set while the copy is on its way"
        );
        assert!(bm.finish_copy(t, true));
        assert_eq!(bm.ranges(), vec![(2 * 4096, 4096)]);
    }

    #[test]
    fn a_range_marked_during_its_copy_stays_dirty() {
        let bm = DirtyBitmap::new(1 << 20, 4096);
        bm.mark(0, 2 * 4096);
        let t = bm.begin_copy(0, 2 * 4096);
        bm.mark(4096 + 100, 1);
        assert!(!bm.finish_copy(t, true));
        assert_eq!(bm.ranges(), vec![(0, 2 * 4096)]);
    }

    #[test]
    fn a_failed_copy_clears_nothing() {
        let bm = DirtyBitmap::new(1 << 20, 4096);
        bm.mark(0, 4096);
        let t = bm.begin_copy(0, 4096);
        assert!(!bm.finish_copy(t, false));
        assert_eq!(bm.dirty_clusters(), 1);
    }
}

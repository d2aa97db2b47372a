//! How the disk is cut up: copy-before-write clusters, and the smaller blocks in which the
//! active overlay tracks what the speculative VM wrote.
//!
//! Clusters are the unit of copy-before-write and of overlay placement (one slot per
//! cluster). Blocks exist because the VM writes in sectors: tracking the active overlay per
//! cluster would force a read-modify-write of a whole 64 KiB cluster on every first 4 KiB
//! write. A cluster has at most 128 blocks, so one cluster's allocation fits in two `u64`s;
//! a block is `max(512, cluster / 128)` bytes.

use std::ops::Range;

use crate::error::ReplicationError;

/// QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;
/// Smallest cluster size accepted (one sector).
pub const MIN_CLUSTER_SIZE: u64 = 512;
/// Largest cluster size accepted.
pub const MAX_CLUSTER_SIZE: u64 = 16 << 20;
/// Blocks per cluster, at most (the width of [`Blocks`]).
const MAX_BLOCKS: u64 = 128;
/// Smallest block: a sector.
const MIN_BLOCK: u64 = 512;

/// The disk's cluster and block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Disk length in bytes.
    pub len: u64,
    /// Cluster size (power of two).
    pub cluster: u64,
    /// Block size (power of two, divides `cluster`).
    pub block: u64,
}

impl Geometry {
    pub fn new(len: u64, cluster: u64) -> Result<Self, ReplicationError> {
        if !cluster.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster) {
            return Err(ReplicationError::InvalidClusterSize(cluster));
        }
        // Slots and cluster numbers are stored as u32 in the overlay maps; u32::MAX is a marker.
        if len.div_ceil(cluster) >= u64::from(u32::MAX) {
            return Err(ReplicationError::TooManyClusters {
                len,
                cluster_size: cluster,
            });
        }
        let block = (cluster / MAX_BLOCKS).max(MIN_BLOCK).min(cluster);
        Ok(Geometry {
            len,
            cluster,
            block,
        })
    }

    /// The cluster holding byte `offset`.
    pub fn cluster_of(&self, offset: u64) -> u64 {
        offset / self.cluster
    }

    /// First byte of cluster `c`.
    pub fn start(&self, c: u64) -> u64 {
        c * self.cluster
    }

    /// Bytes of cluster `c` inside the disk (the last cluster may be short).
    pub fn cluster_len(&self, c: u64) -> u64 {
        self.cluster.min(self.len.saturating_sub(self.start(c)))
    }

    /// Clusters touched by `offset..offset+len` (empty for `len == 0`).
    pub fn clusters(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            let c = self.cluster_of(offset);
            return c..c;
        }
        self.cluster_of(offset)..self.cluster_of(offset + len - 1) + 1
    }

    /// The part of cluster `c` inside `offset..offset+len`, as offsets within the cluster.
    pub fn within(&self, c: u64, offset: u64, len: u64) -> Range<u64> {
        let cs = self.start(c);
        let lo = offset.max(cs) - cs;
        let hi = (offset + len).min(cs + self.cluster_len(c)) - cs;
        lo..hi.max(lo)
    }

    /// Blocks intersecting `r` (offsets within a cluster).
    pub fn blocks_touching(&self, r: &Range<u64>) -> Range<u32> {
        if r.start >= r.end {
            return 0..0;
        }
        (r.start / self.block) as u32..r.end.div_ceil(self.block) as u32
    }

    /// Rounds `offset` down to a block boundary.
    pub fn block_floor(&self, offset: u64) -> u64 {
        offset - offset % self.block
    }

    /// Rounds `offset` up to a block boundary, or to the end of the disk.
    pub fn block_ceil(&self, offset: u64) -> u64 {
        offset
            .div_ceil(self.block)
            .saturating_mul(self.block)
            .min(self.len)
    }

    /// Byte range (within its cluster `c`) of blocks `b`, clipped to the disk.
    pub fn block_bytes(&self, c: u64, b: &Range<u32>) -> Range<u64> {
        let clen = self.cluster_len(c);
        (u64::from(b.start) * self.block).min(clen)..(u64::from(b.end) * self.block).min(clen)
    }
}

/// A set of blocks of one cluster (at most 128), as two words so that a map entry stays small.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Blocks([u64; 2]);

impl Blocks {
    pub const EMPTY: Blocks = Blocks([0, 0]);

    pub fn from_bits(b: u128) -> Self {
        Blocks([b as u64, (b >> 64) as u64])
    }

    pub fn bits(self) -> u128 {
        u128::from(self.0[0]) | (u128::from(self.0[1]) << 64)
    }

    /// Blocks `r.start..r.end`.
    pub fn range(r: Range<u32>) -> Self {
        if r.start >= r.end {
            return Blocks::EMPTY;
        }
        let n = r.end - r.start;
        let mask = if n >= 128 {
            u128::MAX
        } else {
            (1u128 << n) - 1
        };
        Blocks::from_bits(mask << r.start)
    }

    pub fn is_empty(self) -> bool {
        self.0 == [0, 0]
    }

    pub fn contains(self, i: u32) -> bool {
        i < 128 && self.bits() >> i & 1 == 1
    }

    pub fn union(self, o: Blocks) -> Blocks {
        Blocks::from_bits(self.bits() | o.bits())
    }

    pub fn minus(self, o: Blocks) -> Blocks {
        Blocks::from_bits(self.bits() & !o.bits())
    }

    /// Number of blocks in the set.
    #[cfg(test)]
    pub fn count(self) -> u32 {
        self.bits().count_ones()
    }

    /// Maximal runs of consecutive blocks, in order.
    pub fn runs(self) -> impl Iterator<Item = Range<u32>> {
        let mut b = self.bits();
        std::iter::from_fn(move || {
            if b == 0 {
                return None;
            }
            let s = b.trailing_zeros();
            let n = (!(b >> s)).trailing_zeros();
            let run = Blocks::range(s..s + n).bits();
            b &= !run;
            Some(s..s + n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_keeps_a_cluster_within_128_blocks() {
        assert_eq!(Geometry::new(1 << 30, 64 << 10).unwrap().block, 512);
        assert_eq!(Geometry::new(1 << 30, 1 << 20).unwrap().block, 8192);
        assert_eq!(Geometry::new(1 << 30, 512).unwrap().block, 512);
        assert!(Geometry::new(1 << 30, 3000).is_err());
        assert!(Geometry::new(1 << 30, 256).is_err());
    }

    #[test]
    fn clusters_and_within_clip_to_the_disk_end() {
        let g = Geometry::new(10_000, 4096).unwrap();
        assert_eq!(g.clusters(4000, 200), 0..2);
        assert_eq!(g.clusters(5, 0), 0..0);
        assert_eq!(g.cluster_len(2), 10_000 - 8192);
        assert_eq!(g.within(2, 8000, 5000), 0..(10_000 - 8192));
        assert_eq!(g.block_ceil(9_999), 10_000);
        assert_eq!(g.block_floor(9_999), 9_728);
    }

    #[test]
    fn runs_finds_maximal_runs_including_the_top_bit() {
        let b = Blocks::range(0..3)
            .union(Blocks::range(5..6))
            .union(Blocks::range(120..128));
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(runs, vec![0..3, 5..6, 120..128]);
        assert_eq!(
            Blocks::range(0..128).runs().collect::<Vec<_>>(),
            vec![0..128]
        );
        assert_eq!(b.count(), 12);
        assert!(b.contains(127) && !b.contains(4));
        assert_eq!(b.minus(Blocks::range(0..128)), Blocks::EMPTY);
    }
}

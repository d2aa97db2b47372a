//! Allocation extents, as NBD's `base:allocation` context describes them.

/// A run of bytes with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run.
    pub len: u64,
    /// Not allocated: reads come from below (or are zero at the bottom of a chain).
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

impl Extent {
    /// Allocated bytes that may hold anything.
    pub fn data(len: u64) -> Self {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }
    /// Unallocated bytes that read as zeroes (the bottom of a chain).
    pub fn hole(len: u64) -> Self {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }
    /// Allocated bytes known to read as zeroes (a qcow2 zero cluster).
    pub fn zero(len: u64) -> Self {
        Extent {
            len,
            hole: false,
            zero: true,
        }
    }
    /// Same allocation state (lengths aside).
    pub fn same_kind(&self, other: &Extent) -> bool {
        self.hole == other.hole && self.zero == other.zero
    }
}

/// Ordered extents; neighbours of the same kind are merged as they are pushed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentList(pub Vec<Extent>);

impl ExtentList {
    /// No extents yet.
    pub fn new() -> Self {
        ExtentList(Vec::new())
    }

    /// Appends an extent, merging it with the last one when they are of the same kind.
    pub fn push(&mut self, e: Extent) {
        if e.len == 0 {
            return;
        }
        match self.0.last_mut() {
            Some(last) if last.same_kind(&e) => last.len += e.len,
            _ => self.0.push(e),
        }
    }

    /// Total bytes described.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|e| e.len).sum()
    }

    /// The extents in order.
    pub fn iter(&self) -> impl Iterator<Item = &Extent> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_merges_neighbours_of_the_same_kind() {
        let mut l = ExtentList::new();
        l.push(Extent::data(10));
        l.push(Extent::data(5));
        l.push(Extent::hole(7));
        l.push(Extent::zero(0));
        assert_eq!(l.0, vec![Extent::data(15), Extent::hole(7)]);
        assert_eq!(l.total(), 22);
    }
}

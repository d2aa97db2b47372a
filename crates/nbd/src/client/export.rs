//! What negotiation settled about an export, and how the block layer sees it.

use blockdev::DevInfo;

use crate::proto::*;

/// Block size constraints the server advertised (NBD_INFO_BLOCK_SIZE), or the protocol's
/// defaults when it sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest request the server takes; offsets and lengths are multiples of it.
    pub min: u32,
    /// Size the server handles best (a hint).
    pub preferred: u32,
    /// Largest read or write payload the server takes.
    pub max: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        }
    }
}

/// What negotiation settled: the export and what the connection may do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name asked for.
    pub name: String,
    /// Length in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*` in [`crate::proto`]).
    pub flags: u16,
    /// Block size constraints.
    pub block_size: BlockSize,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// The server's id for `base:allocation`, when that context was negotiated.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    pub(super) fn new(name: &str) -> Self {
        ExportInfo {
            name: name.to_string(),
            size: 0,
            flags: 0,
            block_size: BlockSize::default(),
            structured_replies: false,
            base_allocation: None,
        }
    }

    /// Whether the server set transmission flag `flag` (flags count only with HAS_FLAGS).
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & FLAG_HAS_FLAGS != 0 && self.flags & flag == flag
    }

    /// Writes are refused.
    pub fn read_only(&self) -> bool {
        self.has_flag(FLAG_READ_ONLY)
    }

    /// The server takes flushes.
    pub fn can_flush(&self) -> bool {
        self.has_flag(FLAG_SEND_FLUSH)
    }

    /// The server takes FUA on writes, trims and write-zeroes.
    pub fn can_fua(&self) -> bool {
        self.has_flag(FLAG_SEND_FUA)
    }

    /// The server takes trims.
    pub fn can_trim(&self) -> bool {
        self.has_flag(FLAG_SEND_TRIM)
    }

    /// The server writes zeroes without a payload.
    pub fn can_write_zeroes(&self) -> bool {
        self.has_flag(FLAG_SEND_WRITE_ZEROES)
    }

    /// The server can refuse write-zeroes that would not be fast.
    pub fn can_fast_zero(&self) -> bool {
        self.can_write_zeroes() && self.has_flag(FLAG_SEND_FAST_ZERO)
    }

    /// The server takes prefetch (cache) requests.
    pub fn can_cache(&self) -> bool {
        self.has_flag(FLAG_SEND_CACHE)
    }

    /// A flush on one connection covers writes on every connection to the export.
    pub fn can_multi_conn(&self) -> bool {
        self.has_flag(FLAG_CAN_MULTI_CONN)
    }

    /// Largest read or write sent as one request: the server's maximum, at most 32 MiB, and a
    /// multiple of its minimum block size.
    pub fn max_payload(&self) -> u32 {
        let min = self.block_size.min.max(1);
        let max = self.block_size.max.min(MAX_PAYLOAD);
        (max / min * min).max(min)
    }

    /// The export as the block layer sees it.
    pub fn dev_info(&self) -> DevInfo {
        DevInfo {
            len: self.size,
            min_block: self.block_size.min,
            preferred_block: self.block_size.preferred,
            max_request: self.max_payload(),
            read_only: self.read_only(),
            can_discard: self.can_trim(),
            // Zeroes not sent over the network are cheaper even if the server writes them.
            fast_zero: self.can_write_zeroes(),
        }
    }
}

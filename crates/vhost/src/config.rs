//! What the device tells the guest: its virtio feature bits, its configuration space
//! (`struct virtio_blk_config`) and the limits the request parser enforces.

use blockdev::DevInfo;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The sector of the virtio-blk protocol: offsets and capacity count 512-byte units whatever
/// the block size.
pub const SECTOR: u64 = 512;

/// Queues a frontend may use (QEMU's `num-queues` up to this); one worker thread each.
pub const MAX_QUEUES: usize = 8;

/// Descriptors a queue may hold (QEMU's `queue-size` up to this).
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Data segments of one request (`seg_max`): two more descriptors carry the header and the
/// status. Linux sizes its requests by it, so a chain longer than this is malformed.
pub const SEG_MAX: u32 = 254;

/// Bytes of data in one read or write: the block layer's own limit, so one request is one
/// `BlockDev` call. Linux stays below it (seg_max times its 64 KiB segments is 16 MiB).
pub const MAX_DATA: u32 = blockdev::MAX_REQUEST;

/// Sectors of one discard or write-zeroes range (1 GiB): large enough that `blkdiscard` of a
/// disk takes few requests, small enough that one request cannot keep a queue busy for long.
pub const MAX_ZERO_SECTORS: u32 = 1 << 21;

/// Ranges in one discard or write-zeroes request.
pub const MAX_ZERO_SEGMENTS: u32 = 16;

/// The length of the serial a GET_ID request returns.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding
/// (the fields this device sets); a frontend asking for more gets zeroes.
pub const CONFIG_LEN: usize = 60;

/// The device as the guest sees it.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Capacity in bytes (a multiple of [`SECTOR`]; a device of another length shows its
    /// whole sectors only).
    pub len: u64,
    /// Writes, discards and write-zeroes are refused and VIRTIO_BLK_F_RO is offered.
    pub read_only: bool,
    /// The serial GET_ID returns (the export's name, cut at [`ID_BYTES`]).
    pub id: [u8; ID_BYTES],
}

impl DeviceConfig {
    /// The configuration of an export named `name` over a device described by `info`.
    pub fn new(name: &str, info: &DevInfo, read_only: bool) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        DeviceConfig {
            len: info.len,
            read_only: read_only || info.read_only,
            id,
        }
    }

    /// The virtio feature bits offered.
    pub fn features(&self) -> u64 {
        let mut bits = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits
    }

    /// The vhost-user protocol features: the config space (QEMU's vhost-user-blk requires it)
    /// and several queues.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    /// `struct virtio_blk_config`, little-endian, [`CONFIG_LEN`] bytes.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.len / SECTOR).to_le_bytes()); // capacity
        put(12, &SEG_MAX.to_le_bytes()); // seg_max
        put(20, &(SECTOR as u32).to_le_bytes()); // blk_size
        put(34, &(MAX_QUEUES as u16).to_le_bytes()); // num_queues (QEMU puts its own)
        put(36, &MAX_ZERO_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_ZERO_SEGMENTS.to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_ZERO_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_ZERO_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// `size` bytes of the config space from `offset`, zeroes past its end (a frontend built
    /// for a newer `virtio_blk_config` reads fields this device does not have as absent).
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let size = (size as usize).min(4096);
        let mut out = vec![0u8; size];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize).saturating_add(size).min(CONFIG_LEN);
        if start < end {
            out[..end - start].copy_from_slice(&space[start..end]);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A device of `len` bytes as the daemons' raw images describe themselves.
    pub(crate) fn info(len: u64, read_only: bool) -> DevInfo {
        DevInfo {
            len,
            min_block: 512,
            preferred_block: 4096,
            max_request: blockdev::MAX_REQUEST,
            read_only,
            can_discard: true,
            fast_zero: true,
        }
    }

    #[test]
    fn capacity_and_limits_are_where_virtio_blk_config_has_them() {
        let c = DeviceConfig::new("vm0", &info(64 << 20, false), false);
        let s = c.config_space();
        assert_eq!(u64::from_le_bytes(s[0..8].try_into().unwrap()), 131072);
        assert_eq!(u32::from_le_bytes(s[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(s[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(s[34..36].try_into().unwrap()), 8);
        assert_eq!(&c.id[..4], b"vm0\0");
        assert_eq!(c.read_config(0, 8), s[0..8].to_vec());
        assert_eq!(c.read_config(56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.read_config(100, 4), vec![0; 4]);
    }

    #[test]
    fn read_only_offers_ro_and_neither_discard_nor_write_zeroes() {
        let ro = DeviceConfig::new("d", &info(512, true), false).features();
        assert_ne!(ro & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            ro & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        let rw = DeviceConfig::new("d", &info(512, false), false).features();
        assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(rw & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_ne!(
            DeviceConfig::new("d", &info(512, false), true).features() & 1 << VIRTIO_BLK_F_RO,
            0
        );
    }
}

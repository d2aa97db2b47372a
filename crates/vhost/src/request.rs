//! A virtio-blk request from its descriptor chain: the header (type, sector) in the readable
//! part, data after it or in the writable part, the status in the last writable byte.
//!
//! Everything here is the guest's to choose, so every count and length is bounded and checked
//! against guest memory before a byte moves; a request that breaks a rule is refused with
//! VIRTIO_BLK_S_IOERR (or UNSUPP for a type this device does not know), never a panic. A chain
//! without a writable byte has nowhere to put a status and completes with nothing written.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::config::{
    DeviceConfig, ID_BYTES, MAX_DATA, MAX_ZERO_SECTORS, MAX_ZERO_SEGMENTS, SECTOR, SEG_MAX,
};

/// Descriptors in one chain: the data segments plus the header and the status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// The request header (`struct virtio_blk_outhdr`): type, ioprio, sector.
const HEADER_LEN: u64 = 16;

/// One range of a discard or write-zeroes request (`struct virtio_blk_discard_write_zeroes`).
const RANGE_LEN: u64 = 16;

/// A status byte of the protocol.
pub type Status = u8;
/// Done.
pub const S_OK: Status = VIRTIO_BLK_S_OK as u8;
/// Failed (the guest sees EIO).
pub const S_IOERR: Status = VIRTIO_BLK_S_IOERR as u8;
/// A request type this device does not do.
pub const S_UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as u8;

/// A run of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Bytes.
    pub len: u64,
}

/// Guest buffers in order, taken as one byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segments(pub Vec<Segment>);

impl Segments {
    /// Bytes in all the buffers.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|s| s.len).sum()
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` bytes (or all there are) and the rest.
    fn split_at(&self, n: u64) -> (Segments, Segments) {
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        let mut left = n;
        for s in &self.0 {
            if left >= s.len {
                head.push(*s);
                left -= s.len;
            } else if left > 0 {
                head.push(Segment {
                    addr: s.addr,
                    len: left,
                });
                tail.push(Segment {
                    addr: s.addr.unchecked_add(left),
                    len: s.len - left,
                });
                left = 0;
            } else {
                tail.push(*s);
            }
        }
        (Segments(head), Segments(tail))
    }

    /// Copies the buffers' bytes out of guest memory (the caller bounded their length).
    pub fn gather<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<Vec<u8>, vm_memory::GuestMemoryError> {
        let mut out = vec![0u8; self.len() as usize];
        let mut at = 0;
        for s in &self.0 {
            let end = at + s.len as usize;
            mem.read_slice(&mut out[at..end], s.addr)?;
            at = end;
        }
        Ok(out)
    }

    /// Copies `data` into the buffers, as far as both go; returns the bytes copied.
    pub fn scatter<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        data: &[u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut at = 0;
        for s in &self.0 {
            if at == data.len() {
                break;
            }
            let end = (at + s.len as usize).min(data.len());
            mem.write_slice(&data[at..end], s.addr)?;
            at = end;
        }
        Ok(at)
    }
}

/// A discard or write-zeroes range in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a well-formed request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read `dst.len()` bytes at `offset` into `dst`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Where the data goes.
        dst: Segments,
    },
    /// Write the bytes of `src` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Where the data is.
        src: Segments,
    },
    /// Make completed writes durable.
    Flush,
    /// Return the device's serial into `dst`.
    GetId {
        /// Where the serial goes (its first [`ID_BYTES`] bytes at most).
        dst: Segments,
    },
    /// Forget the ranges.
    Discard(Vec<Range>),
    /// Make the ranges read as zeroes; `unmap` lets the device deallocate them.
    WriteZeroes {
        /// The ranges.
        ranges: Vec<Range>,
        /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP was set on every range.
        unmap: bool,
    },
}

/// A parsed request: what to do and where its status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// More than [`MAX_DESCRIPTORS`] descriptors.
    TooManyDescriptors,
    /// A buffer outside guest memory.
    BadAddress,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// No writable byte for the status.
    NoStatus,
    /// Fewer than 16 readable bytes of header.
    ShortHeader,
    /// Data whose length is not a whole number of sectors, or that the type does not take.
    BadLength,
    /// More data than [`MAX_DATA`], or more ranges than [`MAX_ZERO_SEGMENTS`].
    TooLarge,
    /// Sectors past the end of the device.
    OutOfRange,
    /// A write-class request to a read-only device.
    ReadOnly,
    /// A request type or range flag this device does not do.
    Unsupported,
}

/// A refused chain: why, and where its status goes when it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub why: Malformed,
    /// The status byte's address, if the chain has a writable byte.
    pub status: Option<GuestAddress>,
}

impl Refused {
    /// The status the guest gets.
    pub fn status_code(&self) -> Status {
        match self.why {
            Malformed::Unsupported => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// Parses the chain `descs` (as the queue yields it) of a request to the device `cfg`,
/// reading the header and ranges from `mem`.
pub fn parse<M, I>(descs: I, mem: &M, cfg: &DeviceConfig) -> Result<Request, Refused>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    let mut refused = None;
    for (i, d) in descs.into_iter().enumerate() {
        if i == MAX_DESCRIPTORS {
            refused.get_or_insert(Malformed::TooManyDescriptors);
            break;
        }
        let seg = Segment {
            addr: d.addr(),
            len: u64::from(d.len()),
        };
        let access = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(seg.addr, seg.len as usize, access) {
            refused.get_or_insert(Malformed::BadAddress);
        }
        if seg.len == 0 {
            continue;
        }
        if d.is_write_only() {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                refused.get_or_insert(Malformed::ReadableAfterWritable);
            }
            readable.push(seg);
        }
    }
    // The status is the last writable byte, valid or not the rest may be.
    let status = writable.last_mut().and_then(|last| {
        last.len -= 1;
        last.addr.checked_add(last.len)
    });
    let refuse = |why| Refused { why, status };
    if let Some(why) = refused {
        return Err(refuse(why));
    }
    let status = status.ok_or(refuse(Malformed::NoStatus))?;
    let (header, out) = Segments(readable).split_at(HEADER_LEN);
    if header.len() < HEADER_LEN {
        return Err(refuse(Malformed::ShortHeader));
    }
    let header = header
        .gather(mem)
        .map_err(|_| refuse(Malformed::BadAddress))?;
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let in_ = Segments(writable.into_iter().filter(|s| s.len > 0).collect());
    let data_at = |len: u64| -> Result<u64, Refused> {
        if !len.is_multiple_of(SECTOR) {
            return Err(refuse(Malformed::BadLength));
        }
        if len > u64::from(MAX_DATA) {
            return Err(refuse(Malformed::TooLarge));
        }
        sector
            .checked_mul(SECTOR)
            .filter(|off| off.checked_add(len).is_some_and(|end| end <= cfg.len))
            .ok_or(refuse(Malformed::OutOfRange))
    };
    let writes = |command: Command| {
        if cfg.read_only {
            Err(refuse(Malformed::ReadOnly))
        } else {
            Ok(Request { command, status })
        }
    };
    match kind {
        VIRTIO_BLK_T_IN => {
            if !out.is_empty() {
                return Err(refuse(Malformed::BadLength));
            }
            let offset = data_at(in_.len())?;
            Ok(Request {
                command: Command::Read { offset, dst: in_ },
                status,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if !in_.is_empty() {
                return Err(refuse(Malformed::BadLength));
            }
            let offset = data_at(out.len())?;
            writes(Command::Write { offset, src: out })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request {
            command: Command::Flush,
            status,
        }),
        VIRTIO_BLK_T_GET_ID => {
            let (dst, _) = in_.split_at(ID_BYTES as u64);
            Ok(Request {
                command: Command::GetId { dst },
                status,
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let n = out.len() / RANGE_LEN;
            if !out.len().is_multiple_of(RANGE_LEN) || n == 0 || !in_.is_empty() {
                return Err(refuse(Malformed::BadLength));
            }
            if n > u64::from(MAX_ZERO_SEGMENTS) {
                return Err(refuse(Malformed::TooLarge));
            }
            let bytes = out.gather(mem).map_err(|_| refuse(Malformed::BadAddress))?;
            let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            let mut ranges = Vec::with_capacity(n as usize);
            let mut unmap = true;
            for r in bytes.chunks_exact(RANGE_LEN as usize) {
                let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
                // Discard has no flags; write-zeroes only UNMAP.
                let known = if zeroes {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !known != 0 {
                    return Err(refuse(Malformed::Unsupported));
                }
                unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                if sectors > MAX_ZERO_SECTORS {
                    return Err(refuse(Malformed::TooLarge));
                }
                let len = u64::from(sectors) * SECTOR;
                let offset = sector
                    .checked_mul(SECTOR)
                    .filter(|off| off.checked_add(len).is_some_and(|end| end <= cfg.len))
                    .ok_or(refuse(Malformed::OutOfRange))?;
                ranges.push(Range { offset, len });
            }
            writes(if zeroes {
                Command::WriteZeroes { ranges, unmap }
            } else {
                Command::Discard(ranges)
            })
        }
        _ => Err(refuse(Malformed::Unsupported)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn cfg(read_only: bool) -> DeviceConfig {
        DeviceConfig::new(
            "disk",
            &crate::config::tests::info(1 << 20, read_only),
            false,
        )
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) -> Descriptor {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        Descriptor::new(at, 16, 0, 0)
    }

    #[test]
    fn a_read_in_two_buffers_with_its_status_in_a_third() {
        let m = mem();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, 8),
            Descriptor::new(0x1000, 512, W, 0),
            Descriptor::new(0x2000, 1024, W, 0),
            Descriptor::new(0x3000, 1, W, 0),
        ];
        let r = parse(chain, &m, &cfg(false)).unwrap();
        assert_eq!(r.status, GuestAddress(0x3000));
        let Command::Read { offset, dst } = r.command else {
            panic!("{r:?}")
        };
        assert_eq!((offset, dst.len(), dst.0.len()), (4096, 1536, 2));
    }

    #[test]
    fn the_status_may_share_the_last_data_buffer() {
        let m = mem();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            Descriptor::new(0x1000, 513, W, 0),
        ];
        let r = parse(chain, &m, &cfg(false)).unwrap();
        assert_eq!(r.status, GuestAddress(0x1200));
        assert!(matches!(r.command, Command::Read { ref dst, .. } if dst.len() == 512));
    }

    #[test]
    fn malformed_chains_are_refused_with_a_status_where_there_is_one() {
        let m = mem();
        let c = cfg(false);
        let refused = |chain: Vec<Descriptor>| parse(chain, &m, &c).unwrap_err();
        let status = Descriptor::new(0x3000, 1, W, 0);
        // Past the end of the disk.
        let r = refused(vec![
            header(&m, 0, VIRTIO_BLK_T_IN, 2048),
            Descriptor::new(0x1000, 512, W, 0),
            status,
        ]);
        assert_eq!(
            (r.why, r.status),
            (Malformed::OutOfRange, Some(GuestAddress(0x3000)))
        );
        assert_eq!(r.status_code(), S_IOERR);
        // Sector overflow.
        assert_eq!(
            refused(vec![
                header(&m, 0, VIRTIO_BLK_T_OUT, u64::MAX),
                Descriptor::new(0x1000, 512, 0, 0),
                status
            ])
            .why,
            Malformed::OutOfRange
        );
        // Not whole sectors.
        assert_eq!(
            refused(vec![
                header(&m, 0, VIRTIO_BLK_T_OUT, 0),
                Descriptor::new(0x1000, 100, 0, 0),
                status
            ])
            .why,
            Malformed::BadLength
        );
        // Buffers outside guest memory.
        assert_eq!(
            refused(vec![
                header(&m, 0, VIRTIO_BLK_T_IN, 0),
                Descriptor::new(0xffff_0000, 512, W, 0),
                status
            ])
            .why,
            Malformed::BadAddress
        );
        // No status byte at all.
        let r = refused(vec![header(&m, 0, VIRTIO_BLK_T_FLUSH, 0)]);
        assert_eq!((r.why, r.status), (Malformed::NoStatus, None));
        // A short header.
        assert_eq!(
            refused(vec![Descriptor::new(0, 8, 0, 0), status]).why,
            Malformed::ShortHeader
        );
        // Readable after writable.
        assert_eq!(
            refused(vec![
                header(&m, 0, VIRTIO_BLK_T_IN, 0),
                status,
                Descriptor::new(0x1000, 512, 0, 0),
                status
            ])
            .why,
            Malformed::ReadableAfterWritable
        );
        // Too long a chain.
        let mut long = vec![header(&m, 0, VIRTIO_BLK_T_IN, 0)];
        long.extend((0..MAX_DESCRIPTORS).map(|_| Descriptor::new(0x1000, 512, W, 0)));
        assert_eq!(refused(long).why, Malformed::TooManyDescriptors);
        // An unknown type.
        let r = refused(vec![header(&m, 0, 99, 0), status]);
        assert_eq!((r.why, r.status_code()), (Malformed::Unsupported, S_UNSUPP));
    }

    #[test]
    fn write_zeroes_ranges_and_the_read_only_device() {
        let m = mem();
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&4u64.to_le_bytes());
        range[8..12].copy_from_slice(&8u32.to_le_bytes());
        range[12..16].copy_from_slice(&VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.to_le_bytes());
        m.write_slice(&range, GuestAddress(0x1000)).unwrap();
        let chain = || {
            vec![
                header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0),
                Descriptor::new(0x1000, 16, 0, 0),
                Descriptor::new(0x3000, 1, W, 0),
            ]
        };
        let r = parse(chain(), &m, &cfg(false)).unwrap();
        assert_eq!(
            r.command,
            Command::WriteZeroes {
                ranges: vec![Range {
                    offset: 2048,
                    len: 4096
                }],
                unmap: true
            }
        );
        assert_eq!(
            parse(chain(), &m, &cfg(true)).unwrap_err().why,
            Malformed::ReadOnly
        );
        // Discard takes no flags.
        let mut chain = chain();
        chain[0] = header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            parse(chain, &m, &cfg(false)).unwrap_err().why,
            Malformed::Unsupported
        );
    }
}

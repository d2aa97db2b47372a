//! The vhost-user-blk request parser (`vhost_blk::request::parse`,
//! `crates/vhost/src/request.rs`) on arbitrary descriptor chains over arbitrary guest memory:
//! what a guest fully controls.
//!
//! Input: byte 0 picks the device (bit 0: read-only; bit 1: a 4 KiB disk, else 1 MiB); byte 1
//! plus byte 0's upper six bits is the number of descriptors (to 318, past the parser's
//! bound); then 10 bytes per
//! descriptor (address u32 LE, length u32 LE, flags u16 LE: bit 1 device-writable); the rest
//! fills guest memory (64 KiB at address 0) from its start, headers and ranges included.
//!
//! Asserts:
//!  * the parser never panics;
//!  * a parsed request's status byte and data buffers lie in guest memory; reads and writes
//!    are whole sectors, at most `MAX_DATA` bytes, inside the device; discard and
//!    write-zeroes ranges are inside the device, at most `MAX_ZERO_SEGMENTS` of them; a
//!    read-only device gets no write-class request;
//!  * a chain of more than `MAX_DESCRIPTORS` descriptors is refused;
//!  * a refused chain gets IOERR or UNSUPP.
#![no_main]

use blockdev::DevInfo;
use libfuzzer_sys::fuzz_target;
use vhost_blk::config::{DeviceConfig, MAX_DATA, MAX_ZERO_SEGMENTS, SECTOR};
use vhost_blk::request::{Command, MAX_DESCRIPTORS, S_IOERR, S_UNSUPP, Segments, parse};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

const MEM: usize = 64 << 10;

fn in_memory(mem: &GuestMemoryMmap, segs: &Segments) {
    for s in &segs.0 {
        assert!(
            GuestMemory::check_range(mem, s.addr, s.len as usize, vm_memory::Permissions::Read),
            "{s:?} outside guest memory"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (mode, count) = (data[0], data[1] as usize + (data[0] >> 2) as usize);
    let len = if mode & 2 != 0 { 4096 } else { 1 << 20 };
    let info = DevInfo {
        len,
        min_block: 512,
        preferred_block: 4096,
        max_request: blockdev::MAX_REQUEST,
        read_only: mode & 1 != 0,
        can_discard: true,
        fast_zero: true,
    };
    let cfg = DeviceConfig::new("fuzz", &info, false);
    let mut rest = &data[2..];
    let mut descs = Vec::new();
    while descs.len() < count && rest.len() >= 10 {
        let addr = u32::from_le_bytes(rest[0..4].try_into().unwrap());
        let dlen = u32::from_le_bytes(rest[4..8].try_into().unwrap());
        let flags = u16::from_le_bytes(rest[8..10].try_into().unwrap());
        descs.push(Descriptor::new(u64::from(addr), dlen, flags, 0));
        rest = &rest[10..];
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(&rest[..rest.len().min(MEM)], GuestAddress(0))
        .unwrap();
    let n = descs.len();
    match parse(descs, &mem, &cfg) {
        Ok(req) => {
            assert!(n <= MAX_DESCRIPTORS);
            assert!(GuestMemory::check_range(
                &mem,
                req.status,
                1,
                vm_memory::Permissions::Write
            ));
            let within = |off: u64, l: u64| off.checked_add(l).is_some_and(|e| e <= cfg.len);
            match &req.command {
                Command::Read { offset, dst: segs } | Command::Write { offset, src: segs } => {
                    in_memory(&mem, segs);
                    assert!(segs.len().is_multiple_of(SECTOR));
                    assert!(segs.len() <= u64::from(MAX_DATA));
                    assert!(within(*offset, segs.len()));
                    if matches!(req.command, Command::Write { .. }) {
                        assert!(!cfg.read_only);
                    }
                }
                Command::GetId { dst } => in_memory(&mem, dst),
                Command::Flush => {}
                Command::Discard(ranges) | Command::WriteZeroes { ranges, .. } => {
                    assert!(!cfg.read_only);
                    assert!(!ranges.is_empty() && ranges.len() <= MAX_ZERO_SEGMENTS as usize);
                    for r in ranges {
                        assert!(within(r.offset, r.len));
                    }
                }
            }
        }
        Err(refused) => {
            assert!([S_IOERR, S_UNSUPP].contains(&refused.status_code()));
        }
    }
});

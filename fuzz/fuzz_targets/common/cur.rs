//! A big-endian reader over a byte slice, shared by the fuzz targets that replay the NBD wire
//! (`#[path]`-included; each target uses only some of the methods).
#![allow(dead_code)]

pub struct Cur<'a>(pub &'a [u8]);

impl<'a> Cur<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|s| u16::from_be_bytes(s.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_be_bytes(s.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|s| u64::from_be_bytes(s.try_into().unwrap()))
    }
    /// The next u64 without taking it.
    pub fn peek_u64(&self) -> Option<u64> {
        self.0
            .get(..8)
            .map(|s| u64::from_be_bytes(s.try_into().unwrap()))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

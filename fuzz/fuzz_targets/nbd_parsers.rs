//! The pure NBD parsers (request header, NBD_OPT_INFO/GO and meta-context payloads) on
//! arbitrary bytes: they may refuse, never panic, and what they accept re-encodes the same.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use nbd::proto::{InfoRequest, MetaContextRequest, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        let mut b = BytesMut::new();
        r.encode(&mut b);
        assert_eq!(&b[..], &data[..28]);
    }
    if let Ok(r) = InfoRequest::parse(Bytes::copy_from_slice(data)) {
        let mut b = BytesMut::new();
        r.encode(&mut b);
        assert_eq!(&b[..], data);
    }
    if let Ok(r) = MetaContextRequest::parse(Bytes::copy_from_slice(data)) {
        let mut b = BytesMut::new();
        r.encode(&mut b);
        assert_eq!(&b[..], data);
    }
});

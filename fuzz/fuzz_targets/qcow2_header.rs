//! qcow2 image files made of arbitrary bytes, opened and used through the block layer's qcow2
//! driver (`blockdev::Qcow2`, `crates/blockdev/src/qcow2.rs`), which checks the header and the
//! refcount structures (`crates/blockdev/src/qcow2/header.rs`) before the imago library sees
//! the image.
//!
//! Input: the whole image file. The seeds are small valid images (`seeds.py`: 512-byte and
//! 4 KiB clusters, v2 and v3, 1- to 64-bit refcounts, some with data) whose tables fit in
//! the first 4 KiB, so that mutations land on the header, the refcount table and blocks, and
//! the L1 and L2 tables. Two things are changed before the file is written, because imago
//! would otherwise open other files the header names: the "external data file" incompatible
//! bit is cleared (imago opens that file read-write), and the image is opened without a
//! backing image.
//!
//! Asserts: no panic (in our code or in imago, whose panics libFuzzer sees even on the I/O
//! pool's threads) and no abort (the stack overflow that a refcount table past the end of the
//! file caused on the first allocating write). An image is either refused at open or opened,
//! and then a read, two writes (one allocating at the start, one in the middle of the device),
//! block status, write-zeroes, discard, flush and close each return, successfully or with an
//! error.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use blockdev::{BlockDev, IoPool, Qcow2, Qcow2Backing, Qcow2Options, WriteFlags, ZeroFlags};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

/// Byte offset of the v3 header's incompatible feature bits, and the external data file bit.
const INCOMPATIBLE_FEATURES: usize = 72;
const EXTERNAL_DATA_FILE: u8 = 1 << 2;

/// A directory of this process's own for the image (relative names in the header would
/// resolve there), made for each input and removed after it.
fn image_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        base.join(format!("coloblk-fuzz-qcow2-{}", std::process::id()))
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn pool() -> &'static IoPool {
    static POOL: OnceLock<IoPool> = OnceLock::new();
    POOL.get_or_init(|| IoPool::new(2))
}

/// Every operation on a few small ranges; errors are fine, panics and aborts are not.
async fn exercise(dev: Qcow2) {
    let len = dev.len();
    let head = len.min(64 * 1024);
    if head > 0 {
        let _ = dev.read(0, head as usize).await;
        let n = head.min(4096) as usize;
        let _ = dev
            .write(0, Bytes::from(vec![0xa5; n]), WriteFlags::default())
            .await;
        let mid = (len / 2) & !511;
        let m = (len - mid).min(1000) as usize;
        let _ = dev
            .write(mid, Bytes::from(vec![0x5a; m]), WriteFlags { fua: true })
            .await;
        let _ = dev.block_status(0, head).await;
        let _ = dev.write_zeroes(0, head, ZeroFlags::default()).await;
        let _ = dev.discard(0, head).await;
    }
    let _ = dev.flush().await;
    let _ = dev.close().await;
}

fuzz_target!(|data: &[u8]| {
    let mut image = data.to_vec();
    if let Some(b) = image.get_mut(INCOMPATIBLE_FEATURES + 7) {
        *b &= !EXTERNAL_DATA_FILE;
    }
    let dir = image_dir();
    std::fs::create_dir_all(dir).expect("fuzz directory");
    let path = dir.join("image.qcow2");
    std::fs::write(&path, &image).expect("write the image");
    let opts = Qcow2Options {
        backing: Qcow2Backing::None,
        ..Default::default()
    };
    runtime().block_on(async {
        match Qcow2::open(&path, opts, pool().clone()) {
            Ok(dev) => exercise(dev).await,
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    });
    std::fs::remove_dir_all(dir).expect("remove the fuzz directory");
});

//! What a user reads when a disk cannot be used: the file, and the OS's words for the problem.

use std::path::Path;

use blockdev::{BlockDev, IoPool, Qcow2, Qcow2Options, RawFile, RawOptions, WriteFlags};
use bytes::Bytes;

/// What opening `p`, which does not exist, must say.
fn missing(p: &Path) -> String {
    format!(
        "open {}: No such file or directory (os error 2)",
        p.display()
    )
}

#[test]
fn opening_a_missing_raw_file_names_the_file_and_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.raw");

    let e = RawFile::open(&p, RawOptions::default(), IoPool::default()).unwrap_err();

    assert_eq!(e.to_string(), missing(&p));
}

#[test]
fn opening_a_missing_qcow2_image_names_the_file_and_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.qcow2");

    let e = Qcow2::open(&p, Qcow2Options::default(), IoPool::default()).unwrap_err();

    assert_eq!(e.to_string(), missing(&p));
}

#[tokio::test]
async fn writing_to_a_read_only_raw_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ro.raw");
    RawFile::create(&p, 1 << 20).unwrap();
    let opts = RawOptions {
        read_only: true,
        ..Default::default()
    };
    let dev = RawFile::open(&p, opts, IoPool::default()).unwrap();

    let e = dev
        .write(4096, Bytes::from_static(b"x"), WriteFlags::default())
        .await
        .unwrap_err();

    assert_eq!(
        e.to_string(),
        format!("write {} at offset 4096: device is read-only", p.display())
    );
}

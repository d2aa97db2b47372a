//! The qcow2 header and the refcount structures it names, checked before imago opens an image.
//!
//! imago 0.2.6 trusts much of what an image says. A refcount table past the end of the file
//! reads as zeroes there (nothing allocated, not even the header), and the first write that
//! allocates a cluster then writes a refcount block over the header and recurses until the
//! stack overflows, which aborts the whole process (docs/upstream/imago-refcount-table-offset.md).
//! So a bad image is refused here, at open, with the field it concerns. The checks are QEMU's
//! own open-time checks (block/qcow2.c, `qcow2_do_open`) plus those that keep imago's allocator
//! away from clusters in use:
//!
//! ```text
//!   field                      refused when
//!   magic, version             not "QFI\xfb"; not 2 or 3
//!   cluster_bits               outside 9..=21 (512 bytes to 2 MiB)
//!   header_length (v3)         below 104 or above the cluster size
//!   refcount_order (v3)        above 6 (64-bit refcounts)
//!   crypt_method               not 0: imago does not decrypt, reads would return ciphertext
//!   incompatible_features      any bit but "external data file" (dirty, corrupt, zstd, ...)
//!   refcount_table_clusters    0, or above QEMU's 8 MiB table limit
//!   refcount_table_offset      0 (the header), unaligned, or the table ends past end of file
//!   l1_size                    above QEMU's 32 MiB table limit, or too small for the size
//!   l1_table_offset            unaligned; for a non-empty table 0 or ends past end of file
//!   nb_snapshots               above QEMU's 65536; snapshots_offset unaligned
//!   refcount table entries     entry 0 empty (nothing counts the header); a block past the end
//!   refcount of cluster 0      zero: the allocator would hand the header out as free
//! ```
//!
//! Everything is read with plain positional reads before imago touches the file, and nothing
//! is written.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{BlockError, ErrorKind, Op, Result};

/// qcow2 magic, "QFI\xfb".
const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Length of a v2 header; v3 headers are at least [`V3_HEADER_LEN`].
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;

/// QEMU's limits (block/qcow2.h): table sizes in bytes, snapshot count.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_SNAPSHOTS: u32 = 65536;

/// The one incompatible feature imago implements (bit 2).
const EXTERNAL_DATA_FILE: u64 = 1 << 2;

/// Names of the incompatible feature bits the spec defines.
const INCOMPATIBLE_NAMES: [&str; 5] = [
    "dirty (refcounts need a repair: qemu-img check -r all)",
    "corrupt (qemu-img check -r all)",
    "external data file",
    "non-zlib compression type",
    "extended L2 entries",
];

/// Bits 0-8 of a refcount table entry are reserved; the rest is the block's offset.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// The facts about a checked header that the driver needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeaderFacts {
    pub version: u32,
    pub cluster_size: u64,
}

/// The header fields the checks look at, in the order they appear on disk.
#[derive(Debug)]
struct Header {
    version: u32,
    cluster_bits: u32,
    size: u64,
    crypt_method: u32,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
    incompatible_features: u64,
    refcount_order: u32,
    header_length: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Why an image is refused, before the file's name is added.
enum Refusal {
    Io(io::Error),
    Invalid(String),
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        Refusal::Io(e)
    }
}

type Check<T> = std::result::Result<T, Refusal>;

/// Refuses with a message naming the field and its value.
fn bad<T>(field: &str, value: impl std::fmt::Display, why: impl std::fmt::Display) -> Check<T> {
    Err(Refusal::Invalid(format!("{field} = {value}: {why}")))
}

/// Reads and checks the header of the qcow2 image at `path` and the refcount structures it
/// names. Blocking.
pub(super) fn check_image(path: &Path) -> Result<HeaderFacts> {
    let to_error = |r: Refusal| match r {
        Refusal::Io(e) => super::io_error(e, Op::Open, 0, path),
        Refusal::Invalid(why) => BlockError::new(ErrorKind::InvalidArgument, Op::Open, 0)
            .path(path)
            .with_io(io::Error::new(io::ErrorKind::InvalidData, why)),
    };
    let mut file = File::open(path).map_err(|e| to_error(e.into()))?;
    check_file(&mut file).map_err(to_error)
}

fn check_file(file: &mut File) -> Check<HeaderFacts> {
    // The end of a block device is only known by seeking there; its metadata says 0.
    let file_len = file.seek(SeekFrom::End(0))?;
    let header = read_header(file, file_len)?;
    check_fields(&header, file_len)?;
    check_refcounts(file, &header, file_len)?;
    Ok(HeaderFacts {
        version: header.version,
        cluster_size: 1 << header.cluster_bits,
    })
}

/// Parses the fixed part of the header (v2, or v3 through `header_length`).
fn read_header(file: &File, file_len: u64) -> Check<Header> {
    let mut b = [0u8; V3_HEADER_LEN];
    let n = (file_len as usize).min(b.len());
    file.read_exact_at(&mut b[..n], 0)?;
    if n < 8 || b[..4] != MAGIC {
        return Err(Refusal::Invalid("not a qcow2 image".into()));
    }
    let version = be32(&b, 4);
    if version != 2 && version != 3 {
        return bad("version", version, "only qcow2 versions 2 and 3 exist");
    }
    let needed = if version == 2 {
        V2_HEADER_LEN
    } else {
        V3_HEADER_LEN
    };
    if n < needed {
        return Err(Refusal::Invalid(format!(
            "the file ({file_len} bytes) is shorter than a qcow2 v{version} header"
        )));
    }
    let (incompatible_features, refcount_order, header_length) = if version == 2 {
        (0, 4, V2_HEADER_LEN as u32)
    } else {
        (be64(&b, 72), be32(&b, 96), be32(&b, 100))
    };
    Ok(Header {
        version,
        cluster_bits: be32(&b, 20),
        size: be64(&b, 24),
        crypt_method: be32(&b, 32),
        l1_size: be32(&b, 36),
        l1_table_offset: be64(&b, 40),
        refcount_table_offset: be64(&b, 48),
        refcount_table_clusters: be32(&b, 56),
        nb_snapshots: be32(&b, 60),
        snapshots_offset: be64(&b, 64),
        incompatible_features,
        refcount_order,
        header_length,
    })
}

/// The checks that need nothing but the header and the file's length.
fn check_fields(h: &Header, file_len: u64) -> Check<()> {
    if !(9..=21).contains(&h.cluster_bits) {
        return bad(
            "cluster_bits",
            h.cluster_bits,
            "must be 9 to 21 (clusters of 512 bytes to 2 MiB)",
        );
    }
    let cluster = 1u64 << h.cluster_bits;
    if h.version == 3 && !(V3_HEADER_LEN as u64..=cluster).contains(&u64::from(h.header_length)) {
        return bad(
            "header_length",
            h.header_length,
            format_args!("must be {V3_HEADER_LEN} to the cluster size ({cluster})"),
        );
    }
    if h.refcount_order > 6 {
        return bad(
            "refcount_order",
            h.refcount_order,
            "must be 0 to 6 (refcounts of 1 to 64 bits)",
        );
    }
    if h.crypt_method != 0 {
        return bad(
            "crypt_method",
            h.crypt_method,
            "encrypted images are not supported",
        );
    }
    check_features(h.incompatible_features)?;
    check_reftable_field(h, file_len)?;
    check_l1_fields(h, file_len)?;
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return bad(
            "nb_snapshots",
            h.nb_snapshots,
            format_args!("more than QEMU's limit of {MAX_SNAPSHOTS}"),
        );
    }
    if h.nb_snapshots > 0 {
        check_aligned("snapshots_offset", h.snapshots_offset, cluster)?;
    }
    Ok(())
}

fn check_features(incompatible: u64) -> Check<()> {
    let unsupported = incompatible & !EXTERNAL_DATA_FILE;
    if unsupported == 0 {
        return Ok(());
    }
    let names: Vec<String> = (0..64)
        .filter(|bit| unsupported & (1 << bit) != 0)
        .map(|bit| match INCOMPATIBLE_NAMES.get(bit) {
            Some(name) => format!("bit {bit}, {name}"),
            None => format!("bit {bit}, unknown"),
        })
        .collect();
    bad(
        "incompatible_features",
        format_args!("{incompatible:#x}"),
        format_args!("not supported: {}", names.join("; ")),
    )
}

fn check_aligned(field: &str, offset: u64, cluster: u64) -> Check<()> {
    if offset.is_multiple_of(cluster) {
        return Ok(());
    }
    bad(
        field,
        format_args!("{offset:#x}"),
        format_args!("not aligned to the {cluster}-byte cluster size"),
    )
}

/// Checks that a table of `len` bytes at `offset` is cluster aligned, leaves the header alone
/// and ends inside the file.
fn check_table(
    field: &str,
    what: &str,
    offset: u64,
    len: u64,
    cluster: u64,
    file_len: u64,
) -> Check<()> {
    check_aligned(field, offset, cluster)?;
    let value = format_args!("{offset:#x}");
    if offset == 0 {
        return bad(
            field,
            value,
            format_args!("the {what} would overlap the header"),
        );
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => bad(
            field,
            value,
            format_args!(
                "the {what} ({len} bytes) ends past the end of the file ({file_len} bytes)"
            ),
        ),
    }
}

fn check_reftable_field(h: &Header, file_len: u64) -> Check<()> {
    let cluster = 1u64 << h.cluster_bits;
    let clusters = u64::from(h.refcount_table_clusters);
    if clusters == 0 {
        return bad(
            "refcount_table_clusters",
            0,
            "the image has no refcount table",
        );
    }
    if clusters > MAX_REFTABLE_BYTES / cluster {
        return bad(
            "refcount_table_clusters",
            clusters,
            format_args!("the table would exceed QEMU's limit of {MAX_REFTABLE_BYTES} bytes"),
        );
    }
    check_table(
        "refcount_table_offset",
        "refcount table",
        h.refcount_table_offset,
        clusters * cluster,
        cluster,
        file_len,
    )
}

fn check_l1_fields(h: &Header, file_len: u64) -> Check<()> {
    let cluster = 1u64 << h.cluster_bits;
    let l1_size = u64::from(h.l1_size);
    if l1_size > MAX_L1_BYTES / 8 {
        return bad(
            "l1_size",
            l1_size,
            format_args!("the table would exceed QEMU's limit of {MAX_L1_BYTES} bytes"),
        );
    }
    // One L1 entry maps one L2 table of cluster/8 entries, each mapping one cluster.
    let l1_span_bits = 2 * h.cluster_bits - 3;
    let needed = h.size.div_ceil(1 << l1_span_bits);
    if l1_size < needed {
        return bad(
            "l1_size",
            l1_size,
            format_args!("the virtual size ({} bytes) needs {needed} entries", h.size),
        );
    }
    if l1_size == 0 {
        // An empty table is never read; imago still wants the offset aligned.
        return check_aligned("l1_table_offset", h.l1_table_offset, cluster);
    }
    check_table(
        "l1_table_offset",
        "L1 table",
        h.l1_table_offset,
        l1_size * 8,
        cluster,
        file_len,
    )
}

/// Checks the refcount table's entries and that the header's own cluster is counted: imago's
/// allocator takes a missing refcount block, or one past the end of the file, for clusters
/// that are all free.
fn check_refcounts(file: &File, h: &Header, file_len: u64) -> Check<()> {
    let cluster = 1u64 << h.cluster_bits;
    let mut table = vec![0u8; (u64::from(h.refcount_table_clusters) * cluster) as usize];
    file.read_exact_at(&mut table, h.refcount_table_offset)?;
    for (i, raw) in table.chunks_exact(8).enumerate() {
        let entry = be64(raw, 0);
        let block = entry & REFTABLE_OFFSET_MASK;
        let field = format!("refcount table entry {i}");
        if block == 0 {
            if i == 0 {
                return bad(
                    &field,
                    format_args!("{entry:#x}"),
                    "no refcount block counts the header's cluster",
                );
            }
            continue;
        }
        if !block.is_multiple_of(cluster) {
            return bad(
                &field,
                format_args!("{entry:#x}"),
                format_args!("refcount block not aligned to the {cluster}-byte cluster size"),
            );
        }
        if block.checked_add(cluster).is_none_or(|end| end > file_len) {
            return bad(
                &field,
                format_args!("{entry:#x}"),
                format_args!("refcount block ends past the end of the file ({file_len} bytes)"),
            );
        }
    }
    let first_block = be64(&table, 0) & REFTABLE_OFFSET_MASK;
    if header_refcount(file, first_block, h.refcount_order)? == 0 {
        return bad(
            "refcount table entry 0",
            format_args!("{first_block:#x}"),
            "its refcount block says the header's cluster is free",
        );
    }
    Ok(())
}

/// The refcount of cluster 0: the first entry of the refcount block at `block`.
fn header_refcount(file: &File, block: u64, refcount_order: u32) -> io::Result<u64> {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, block)?;
    let bits = 1u32 << refcount_order;
    Ok(if bits < 8 {
        // Sub-byte refcounts are packed from the least significant bit of each byte.
        u64::from(b[0] & ((1u8 << bits) - 1))
    } else {
        let bytes = (bits / 8) as usize;
        b[..bytes]
            .iter()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
    })
}

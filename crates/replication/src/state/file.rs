//! Small state files written atomically and read back only when whole.
//!
//! ```text
//!   write NAME.tmp --fsync--> rename to NAME --fsync the directory
//!   NAME = "coloblk-state <version> <blake3 of the body, hex>\n" + body
//! ```
//!
//! The first line carries the format version and a digest of the rest, so a file that was cut
//! short, overwritten by something else, or edited by hand is refused with its path named,
//! never read as if it were valid.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::StateError;

/// The format of every state file this build writes.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: &str = "coloblk-state";

/// Writes `body` to `dir/name` so that a crash leaves either the old file or the new one.
pub fn write_atomic(dir: &Path, name: &str, body: &[u8]) -> Result<(), StateError> {
    write_replacing(dir, name, body, true)
}

/// The same against a crash of the process only: no fsync, so after a crash of the host the
/// file may be the old one, the new one, absent, or damaged (its digest then refuses it). For
/// files whose content a host crash makes worthless anyway (the merge record: the overlays it
/// describes were never flushed), where an fsync would only cost time.
pub fn write_atomic_unsynced(dir: &Path, name: &str, body: &[u8]) -> Result<(), StateError> {
    write_replacing(dir, name, body, false)
}

fn write_replacing(dir: &Path, name: &str, body: &[u8], sync: bool) -> Result<(), StateError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let io = |e: io::Error, what: &str| StateError::io(&path, what, e);
    let mut f = File::create(&tmp).map_err(|e| io(e, "creating"))?;
    let head = format!("{MAGIC} {FORMAT_VERSION} {}\n", blake3::hash(body).to_hex());
    f.write_all(head.as_bytes())
        .and_then(|()| f.write_all(body))
        .map_err(|e| io(e, "writing"))?;
    if sync {
        f.sync_all().map_err(|e| io(e, "syncing"))?;
    }
    drop(f);
    fs::rename(&tmp, &path).map_err(|e| io(e, "renaming into place"))?;
    if !sync {
        return Ok(());
    }
    sync_dir(dir).map_err(|e| io(e, "syncing the directory of"))
}

/// Reads `dir/name`: `None` if there is none, its body if it is whole and of this format.
pub fn read_checked(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, StateError> {
    let path = dir.join(name);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::io(&path, "reading", e)),
    };
    let corrupt = |why: String| StateError::Corrupt {
        path: path.clone(),
        why,
    };
    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
        return Err(corrupt("no header line (cut short?)".into()));
    };
    let head =
        std::str::from_utf8(&data[..nl]).map_err(|_| corrupt("header is not text".into()))?;
    let mut words = head.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(corrupt(format!(
            "not a coloblk state file (header '{head}')"
        )));
    }
    let version: u32 = words
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt(format!("no format version in header '{head}'")))?;
    if version != FORMAT_VERSION {
        return Err(StateError::Version {
            path: path.clone(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body = &data[nl + 1..];
    let want = words.next().unwrap_or("");
    if blake3::hash(body).to_hex().as_str() != want {
        return Err(corrupt(
            "its digest does not match its content (torn or edited)".into(),
        ));
    }
    Ok(Some(body.to_vec()))
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_and_any_damage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_checked(d.path(), "s").unwrap(), None);
        write_atomic(d.path(), "s", b"{\"a\":1}").unwrap();
        assert_eq!(
            read_checked(d.path(), "s").unwrap().as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert!(!d.path().join("s.tmp").exists());
        write_atomic_unsynced(d.path(), "u", b"unsynced").unwrap();
        assert_eq!(
            read_checked(d.path(), "u").unwrap().as_deref(),
            Some(&b"unsynced"[..])
        );
        let whole = fs::read(d.path().join("s")).unwrap();
        // Cut short, one byte changed, another version, not ours at all.
        let cut = whole[..whole.len() - 1].to_vec();
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let v2 = String::from_utf8(whole.clone())
            .unwrap()
            .replacen(" 1 ", " 2 ", 1);
        for (bad, says) in [
            (cut, "does not match"),
            (flipped, "does not match"),
            (b"garbage".to_vec(), "no header line"),
            (b"{\"a\":1}\n".to_vec(), "not a coloblk state file"),
            (v2.into_bytes(), "format version 2"),
        ] {
            fs::write(d.path().join("s"), &bad).unwrap();
            let e = read_checked(d.path(), "s").unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(e.contains(&d.path().join("s").display().to_string()), "{e}");
        }
    }
}

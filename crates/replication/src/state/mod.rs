//! State that survives the process: per disk, a directory holding its generations (`state`)
//! and, on a primary, the write log (`log`).
//!
//! ```text
//!   IMAGE.coloblk/            (default: beside the image; --state-dir DIR/<disk> otherwise)
//!     lock                    held (flock) while a daemon uses the directory
//!     state                   generations and role, JSON, written atomically (file.rs)
//!     log                     the primary's extents that may differ (log.rs)
//! ```
//!
//! The state names the image it belongs to (device, inode, size) and refuses another: a state
//! directory copied or left beside a replaced image must not vouch for it.

mod file;
mod generation;
mod log;

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use file::{FORMAT_VERSION, read_checked, sync_dir, write_atomic, write_atomic_unsynced};
pub use generation::{Gen, GenView, Outcome, PROTOCOL, decide};
pub use log::{EXTENT, ExtentLog, Recorded};

/// A state directory or file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file system refused.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("writing", ...).
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The content is not whole or not ours.
    #[error("{} is damaged: {why}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Written by another version of coloblk.
    #[error(
        "{} has format version {found}; this coloblk reads version {supported}",
        path.display()
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// Ours.
        supported: u32,
    },
    /// The state belongs to another image.
    #[error(
        "{} belongs to another image ({theirs}), not {image} ({ours}): remove the directory \
         to start over (the next connection then compares the disks in full)",
        dir.display(),
        image = image.display()
    )]
    OtherImage {
        /// The state directory.
        dir: PathBuf,
        /// The image given.
        image: PathBuf,
        /// The state's record of its image.
        theirs: String,
        /// The image's identity.
        ours: String,
    },
    /// Another process uses the directory.
    #[error("{} is in use by another coloblk process", dir.display())]
    InUse {
        /// The state directory.
        dir: PathBuf,
    },
}

impl StateError {
    pub(crate) fn io(path: &Path, what: &str, source: io::Error) -> Self {
        StateError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        }
    }
}

/// Which image a state belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// Bytes of the disk (the virtual size for an image format).
    pub size: u64,
}

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {} inode {} size {}",
            self.dev, self.ino, self.size
        )
    }
}

/// Everything a disk's `state` file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskState {
    /// The image this state belongs to.
    pub image: ImageId,
    /// What the disk says of itself to a peer.
    #[serde(flatten)]
    pub view: GenView,
    /// A failover merge began and has not finished: the disk is half-merged.
    pub merging: bool,
    /// The host's boot id when the state was last saved (a host restart changes it).
    #[serde(default)]
    pub boot: Option<String>,
}

/// This host's boot id (changes at every boot), if the kernel tells it.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// A disk's state directory, locked for this process while the value lives.
pub struct StateDir {
    dir: PathBuf,
    image: ImageId,
    _lock: File,
    state: DiskState,
}

impl StateDir {
    /// The default directory of `image`: `IMAGE.coloblk` beside it.
    pub fn default_for(image: &Path) -> PathBuf {
        let mut name = image.file_name().unwrap_or_default().to_os_string();
        name.push(".coloblk");
        image.with_file_name(name)
    }

    /// Opens (creating it if needed) the state directory `dir` of `image`, whose disk is
    /// `size` bytes. A state written for another image, a damaged one, or a directory another
    /// process holds is refused.
    pub fn open(dir: &Path, image: &Path, size: u64) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(|e| StateError::io(dir, "creating", e))?;
        let lock_path = dir.join("lock");
        let lock =
            File::create(&lock_path).map_err(|e| StateError::io(&lock_path, "creating", e))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StateError::InUse {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(StateError::io(&lock_path, "locking", e.into())),
        }
        let meta = fs::metadata(image).map_err(|e| StateError::io(image, "reading", e))?;
        let id = ImageId {
            dev: meta.dev(),
            ino: meta.ino(),
            size,
        };
        let state = match read_checked(dir, "state")? {
            Some(body) => {
                let s: DiskState =
                    serde_json::from_slice(&body).map_err(|e| StateError::Corrupt {
                        path: dir.join("state"),
                        why: format!("not a disk state: {e}"),
                    })?;
                if s.image != id {
                    return Err(StateError::OtherImage {
                        dir: dir.to_path_buf(),
                        image: image.to_path_buf(),
                        theirs: s.image.to_string(),
                        ours: id.to_string(),
                    });
                }
                s
            }
            None => DiskState {
                image: id,
                view: GenView {
                    protocol: PROTOCOL,
                    ..Default::default()
                },
                merging: false,
                boot: None,
            },
        };
        let me = StateDir {
            dir: dir.to_path_buf(),
            image: id,
            _lock: lock,
            state,
        };
        Ok(me)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The state as last saved (or as new).
    pub fn state(&self) -> &DiskState {
        &self.state
    }

    /// Changes the state and saves it atomically before returning; on failure the state in
    /// memory stays what is on disk.
    pub fn update(&mut self, change: impl FnOnce(&mut DiskState)) -> Result<(), StateError> {
        let mut next = self.state.clone();
        change(&mut next);
        next.image = self.image;
        next.view.protocol = PROTOCOL;
        next.boot = boot_id();
        if next == self.state && self.dir.join("state").exists() {
            return Ok(());
        }
        let body = serde_json::to_vec_pretty(&next).expect("a state always serialises");
        write_atomic(&self.dir, "state", &body)?;
        self.state = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_belongs_to_one_image_and_one_process() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("a.raw");
        fs::write(&image, b"x").unwrap();
        let dir = StateDir::default_for(&image);
        assert_eq!(dir, d.path().join("a.raw.coloblk"));
        let mut s = StateDir::open(&dir, &image, 1).unwrap();
        s.update(|st| st.view.current = Some(Gen(7))).unwrap();
        let e = StateDir::open(&dir, &image, 1).err().unwrap().to_string();
        assert!(e.contains("in use by another coloblk process"), "{e}");
        drop(s);
        let s = StateDir::open(&dir, &image, 1).unwrap();
        assert_eq!(s.state().view.current, Some(Gen(7)));
        drop(s);
        // Another image at the same path (new inode), or another size: refused.
        fs::write(d.path().join("b.raw"), b"x").unwrap();
        fs::rename(d.path().join("b.raw"), &image).unwrap();
        let e = StateDir::open(&dir, &image, 1).err().unwrap().to_string();
        assert!(e.contains("belongs to another image"), "{e}");
        let e = StateDir::open(&dir, &image, 2).err().unwrap().to_string();
        assert!(e.contains("belongs to another image"), "{e}");
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("a.raw");
        fs::write(&image, b"x").unwrap();
        let e = StateDir::open(Path::new("/proc/coloblk-state"), &image, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("creating /proc/coloblk-state"), "{e}");
    }
}

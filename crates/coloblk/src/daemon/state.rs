//! A daemon's persistent state per disk (see `replication::state`): where the directory is,
//! the primary's write log, and the generation moves of each role.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use parking_lot::Mutex;
use replication::primary::PrimaryNode;
use replication::state::{ExtentLog, Gen, GenView, StateDir};
use tracing::{info, warn};

use crate::disk_spec::DiskSpec;

/// One disk's state directory, shared by the parts of a daemon that move its generations.
pub type DiskState = Arc<Mutex<StateDir>>;

/// Opens the state directory of `spec` (`DIR/NAME` with `--state-dir DIR`, else beside the
/// image), whose disk is `len` bytes.
pub fn open(spec: &DiskSpec, state_dir: Option<&Path>, len: u64) -> anyhow::Result<DiskState> {
    let dir = match state_dir {
        Some(d) => d.join(&spec.name),
        None => {
            // Beside a block device is /dev: a tmpfs, gone at the next boot with everything
            // the state must survive.
            use std::os::unix::fs::FileTypeExt;
            if std::fs::metadata(&spec.path).is_ok_and(|m| m.file_type().is_block_device()) {
                return Err(coloblk::UsageError(format!(
                    "disk '{}': {} is a block device; give --state-dir DIR (its state cannot \
                     live beside it in /dev, which does not survive a reboot)",
                    spec.name,
                    spec.path.display()
                ))
                .into());
            }
            StateDir::default_for(&spec.path)
        }
    };
    let st = StateDir::open(&dir, &spec.path, len).with_context(|| {
        format!(
            "disk '{}': its state directory {} cannot be used (--state-dir chooses another)",
            spec.name,
            dir.display()
        )
    })?;
    Ok(Arc::new(Mutex::new(st)))
}

/// What the disk says of itself to a peer.
pub fn view(st: &DiskState) -> GenView {
    st.lock().state().view.clone()
}

/// Makes `node` a primary with state: its write log (whose ranges since the last checkpoint
/// become dirty now: the secondary may lack them), and a new generation at the first write it
/// serves without its secondary.
pub fn attach_primary(node: &PrimaryNode, st: &DiskState, name: &str) -> anyhow::Result<()> {
    let dir = st.lock().path().to_path_buf();
    {
        let mut s = st.lock();
        s.update(|s| {
            if !s.view.was_primary {
                // A secondary's disk becoming a primary's (a promotion): it keeps where it
                // failed over from, and starts its own line.
                s.view.was_primary = true;
                s.view.base = None;
                s.view.synced_at = None;
                s.view.current = Some(Gen::new());
            }
            s.view.current.get_or_insert_with(Gen::new);
            s.view.discard = false;
        })
        .with_context(|| format!("disk '{name}': saving its state"))?;
    }
    let log = ExtentLog::open(&dir, blockdev::BlockDev::len(node))
        .with_context(|| format!("disk '{name}': its write log"))?;
    let ranges = log.ranges();
    if !ranges.is_empty() {
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        info!(
            disk = name,
            bytes, "the write log names ranges written since the last checkpoint: dirty"
        );
        for (o, l) in ranges {
            node.dirty().mark(o, l);
        }
    }
    let state = st.clone();
    let disk = name.to_string();
    node.set_write_log(log, move || {
        let mut s = state.lock();
        let v = &s.state().view;
        if v.base.is_some() && v.current == v.base {
            warn!(
                disk,
                "serving writes without the secondary: a new generation"
            );
            s.update(|s| s.view.current = Some(Gen::new()))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    Ok(())
}

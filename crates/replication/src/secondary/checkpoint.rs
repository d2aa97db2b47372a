//! The control operations of the stage machine: start, checkpoint, get_error, stop.
//!
//! | op \ stage      | NONE            | RUNNING              | FAILOVER | FAILOVER_FAILED      | DONE    |
//! |-----------------|-----------------|----------------------|----------|----------------------|---------|
//! | start(mode)     | checks, empties, RUNNING | running or done | ignored | running or done      | ignored |
//! | checkpoint      | backup cancelled| empty (refused on sticky error) | ignored | backup cancelled | ignored |
//! | get_error       | not running     | iff error            | iff error| always               | iff error |
//! | stop(false)     | not running     | empty, DONE          | ignored  | not running          | ignored |
//! | stop(true)      | not running     | FAILOVER + merge     | ignored  | FAILOVER + merge (retry) | ignored |
//!
//! Each operation holds the gate exclusive, so it runs with no request in flight: a
//! checkpoint therefore also waits for every replica write it must not overtake.

use super::failover;
use super::{Mode, Node, ReplicationError, Stage};
use std::sync::Arc;

impl Node {
    /// Checks a start. `Ok(false)`: ignored (FAILOVER/DONE, continuous replication).
    pub(crate) fn check_start(&self, mode: Mode) -> Result<bool, ReplicationError> {
        match self.stage() {
            Stage::Failover | Stage::Done => return Ok(false),
            Stage::None => {}
            Stage::Running | Stage::FailoverFailed => return Err(ReplicationError::RunningOrDone),
        }
        if mode != Mode::Secondary {
            return Err(ReplicationError::InvalidMode {
                needs: Mode::Secondary.number(),
                got: mode.number(),
            });
        }
        let len = self.geo.len;
        if self.active.store.disk_len() != len || self.hidden.store.disk_len() != len {
            return Err(ReplicationError::LengthMismatch);
        }
        if !self.active.store.can_make_empty() || !self.hidden.store.can_make_empty() {
            return Err(ReplicationError::MakeEmptyUnsupported);
        }
        Ok(true)
    }

    pub(crate) async fn start(&self, mode: Mode) -> Result<(), ReplicationError> {
        let _gate = self.gate.write().await;
        if !self.check_start(mode)? {
            return Ok(());
        }
        // The initial checkpoint: whatever the overlays held before is not ours to trust.
        self.empty_overlays(false).await?;
        {
            let mut st = self.status.lock();
            st.error = None;
            st.failed_over = false;
        }
        self.progress.reset(0);
        self.set_stage(Stage::Running);
        Ok(())
    }

    pub(crate) async fn undo_start(&self) -> Result<(), ReplicationError> {
        let _gate = self.gate.write().await;
        if self.stage() != Stage::Running {
            return Ok(());
        }
        let r = self.empty_overlays(true).await;
        self.set_stage(Stage::None);
        r
    }

    /// Checks a checkpoint. `Ok(false)`: ignored (FAILOVER/DONE).
    pub(crate) fn check_checkpoint(&self) -> Result<bool, ReplicationError> {
        let st = self.status.lock();
        match st.stage {
            Stage::Failover | Stage::Done => Ok(false),
            Stage::None | Stage::FailoverFailed => Err(ReplicationError::BackupCancelled),
            Stage::Running if st.error.is_some() => Err(ReplicationError::IoError),
            Stage::Running => Ok(true),
        }
    }

    pub(crate) async fn checkpoint(&self) -> Result<(), ReplicationError> {
        let _gate = self.gate.write().await;
        if !self.check_checkpoint()? {
            return Ok(());
        }
        self.empty_overlays(true).await
    }

    pub(crate) fn get_error(&self) -> Result<(), ReplicationError> {
        let st = self.status.lock();
        match st.stage {
            Stage::None => Err(ReplicationError::NotRunning),
            _ if st.error.is_some() => Err(ReplicationError::IoError),
            _ => Ok(()),
        }
    }

    pub(crate) async fn stop(self: &Arc<Self>, failover: bool) -> Result<(), ReplicationError> {
        let _gate = self.gate.write().await;
        match (self.stage(), failover) {
            (Stage::Failover | Stage::Done, _) => Ok(()),
            (Stage::None, _) | (Stage::FailoverFailed, false) => Err(ReplicationError::NotRunning),
            (Stage::Running | Stage::FailoverFailed, true) => {
                failover::begin(self).await;
                Ok(())
            }
            (Stage::Running, false) => {
                // QEMU cancels its backup job first and then fails to empty the overlays
                // (docs/qemu-replication.md §6.3.1); we really discard them, so the top path serves the disk.
                self.empty_overlays(true).await?;
                self.set_stage(Stage::Done);
                Ok(())
            }
        }
    }

    /// Forgets the copied set and both overlays: copy bitmap first, then active, then hidden
    /// (QEMU's order). The maps are cleared whatever happens, so the view is the disk even if
    /// a store fails to give its space back; that failure is still reported. `known`: the
    /// maps describe everything in the stores (false at start, where old content may remain).
    pub(crate) async fn empty_overlays(&self, known: bool) -> Result<(), ReplicationError> {
        let hidden_used = self.hidden.clear(self.geo.cluster);
        let active_used = self.active.clear(self.geo.cluster);
        let ra = self
            .active
            .store
            .make_empty(known.then_some(&active_used[..]))
            .await;
        let rh = self
            .hidden
            .store
            .make_empty(known.then_some(&hidden_used[..]))
            .await;
        ra.map_err(ReplicationError::MakeActiveEmpty)?;
        rh.map_err(ReplicationError::MakeHiddenEmpty)?;
        Ok(())
    }
}

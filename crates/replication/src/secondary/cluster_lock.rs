//! Per-cluster async reader/writer locks, created on demand and dropped when unused.
//!
//! Two tables use this: the epoch's copy-before-write table (top reads that fall through to
//! the secondary disk hold clusters shared; the copy of a cluster into the hidden overlay holds
//! it exclusive) and the active overlay's table (VM writes hold clusters shared, or exclusive
//! when they read-modify-write a partial block; the failover merge holds them exclusive).
//!
//! Deadlock freedom: a caller locks its clusters in ascending order, in one call; a task
//! that needs both tables takes the active table first. tokio's `RwLock` is fair, so a waiting
//! copy is not starved by a stream of readers.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

type Cell = Arc<RwLock<()>>;

/// The lock table.
#[derive(Debug, Default)]
pub(crate) struct ClusterLocks {
    cells: Mutex<HashMap<u64, Cell>>,
}

enum Held {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

/// Clusters held by one request; released (and unused cells dropped) on drop.
pub(crate) struct ClusterGuard<'a> {
    table: &'a ClusterLocks,
    held: Vec<(u64, Cell, Held)>,
}

impl ClusterLocks {
    /// Locks `clusters` (ascending, no duplicates), each shared or exclusive as paired.
    pub async fn lock(&self, clusters: Vec<(u64, bool)>) -> ClusterGuard<'_> {
        let mut guard = ClusterGuard {
            table: self,
            held: Vec::with_capacity(clusters.len()),
        };
        for (c, exclusive) in clusters {
            debug_assert!(
                guard.held.last().is_none_or(|(p, _, _)| *p < c),
                "clusters not ascending"
            );
            let cell = self.cells.lock().entry(c).or_default().clone();
            let held = if exclusive {
                Held::Exclusive(cell.clone().write_owned().await)
            } else {
                Held::Shared(cell.clone().read_owned().await)
            };
            guard.held.push((c, cell, held));
        }
        guard
    }

    /// Locks `clusters` (ascending) shared.
    pub async fn shared(&self, clusters: &[u64]) -> ClusterGuard<'_> {
        self.lock(clusters.iter().map(|&c| (c, false)).collect())
            .await
    }

    /// Locks `clusters` (ascending) exclusive.
    pub async fn exclusive(&self, clusters: &[u64]) -> ClusterGuard<'_> {
        self.lock(clusters.iter().map(|&c| (c, true)).collect())
            .await
    }

    /// Cells currently in the table (held or awaited).
    #[cfg(test)]
    pub fn cells(&self) -> usize {
        self.cells.lock().len()
    }
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let mut cells = self.table.cells.lock();
        for (c, cell, held) in self.held.drain(..) {
            drop(held);
            // The table and `cell` are the only owners left: nobody holds or awaits it. New
            // owners are created only under the table lock, which we hold.
            if Arc::strong_count(&cell) == 2 {
                cells.remove(&c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_for_shared_and_cells_are_dropped() {
        let locks = Arc::new(ClusterLocks::default());
        let r = locks.shared(&[1, 2]).await;
        let l2 = locks.clone();
        let w = tokio::spawn(async move {
            let _g = l2.exclusive(&[2, 3]).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        drop(r);
        w.await.unwrap();
        assert_eq!(locks.cells(), 0);
    }
}

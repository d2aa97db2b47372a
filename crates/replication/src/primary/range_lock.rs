//! Serialises overlapping writes, so that they complete locally and enter the forwarding queue
//! in the same order: otherwise two racing writes to one block could land on the primary in one
//! order and on the secondary in the other, and the disks would differ after a checkpoint.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The set of byte ranges currently held.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, Arc<Notify>)>>,
}

/// A held range, released on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    start: u64,
    end: u64,
    notify: Arc<Notify>,
}

impl RangeLock {
    /// Waits until no held range overlaps `offset..offset+len`, then holds it.
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let (start, end) = (offset, offset + len.max(1));
        loop {
            let wait = {
                let mut held = self.held.lock();
                match held.iter().find(|(s, e, _)| *s < end && start < *e) {
                    Some((_, _, n)) => {
                        // Register interest before dropping the list lock: the holder wakes
                        // waiters under that lock, so no wake-up is lost.
                        let mut fut = Box::pin(n.clone().notified_owned());
                        fut.as_mut().enable();
                        Some(fut)
                    }
                    None => {
                        let notify = Arc::new(Notify::new());
                        held.push((start, end, notify.clone()));
                        return RangeGuard {
                            lock: self,
                            start,
                            end,
                            notify,
                        };
                    }
                }
            };
            if let Some(w) = wait {
                w.await;
            }
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock();
        if let Some(i) = held.iter().position(|(s, e, n)| {
            *s == self.start && *e == self.end && Arc::ptr_eq(n, &self.notify)
        }) {
            held.swap_remove(i);
        }
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(0, 100).await;
        let _disjoint = tokio::time::timeout(Duration::from_secs(1), lock.lock(100, 10))
            .await
            .unwrap();
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(50, 10).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "an overlapping range must wait");
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}

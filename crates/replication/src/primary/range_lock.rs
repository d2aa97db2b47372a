//! Serialises overlapping writes, so that they complete locally and enter the forwarding queue
//! in the same order: otherwise two racing writes to one block could land on the primary in one
//! order and on the secondary in the other, and the disks would differ after a checkpoint.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// A held range; its waiters' wake-up is made only when someone has to wait (overlaps are
/// rare, and most writes should cost no allocation here).
struct Held {
    id: u64,
    start: u64,
    end: u64,
    waiters: Option<Arc<Notify>>,
}

/// The set of byte ranges currently held.
#[derive(Default)]
pub struct RangeLock {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    held: Vec<Held>,
    next_id: u64,
}

/// A held range, released on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Waits until no held range overlaps `offset..offset+len` (a zero length counts as one
    /// byte), then holds it.
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let (start, end) = (offset, offset.saturating_add(len.max(1)));
        loop {
            let wait = {
                let mut st = self.state.lock();
                match st.held.iter_mut().find(|h| h.start < end && start < h.end) {
                    Some(h) => {
                        let n = h.waiters.get_or_insert_with(Default::default).clone();
                        let mut fut = Box::pin(n.notified_owned());
                        fut.as_mut().enable();
                        fut
                    }
                    None => {
                        st.next_id += 1;
                        let id = st.next_id;
                        st.held.push(Held {
                            id,
                            start,
                            end,
                            waiters: None,
                        });
                        return RangeGuard { lock: self, id };
                    }
                }
            };
            wait.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut st = self.lock.state.lock();
            match st.held.iter().position(|h| h.id == self.id) {
                Some(i) => st.held.swap_remove(i).waiters,
                None => None,
            }
        };
        if let Some(n) = waiters {
            n.notify_waiters();
        }
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

    /// Every waiter on a released range goes on, one after another where they overlap each
    /// other, and the lock ends empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn all_waiters_of_a_released_range_go_on_in_turn() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(0, 4096).await;
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiters: Vec<_> = (0..8u64)
            .map(|i| {
                let (lock, inside) = (lock.clone(), inside.clone());
                tokio::spawn(async move {
                    let _g = lock.lock(i * 512, 1024).await;
                    // Neighbours overlap, so at most every other range (four) can be held at once.
                    let now = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    assert!(now <= 4, "{now} overlapping holders");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        drop(g);
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .unwrap()
                .unwrap();
        }
        assert!(lock.state.lock().held.is_empty());
    }
}

//! The one accept loop every listener uses: the NBD exports, the control socket, the metrics
//! endpoint.
//!
//! ```text
//!   wait for a free slot (at most max_connections open) --> accept --> spawn serve(conn)
//!        ^                                                    |             |
//!        |                        error: back off 10 ms..1 s -'             |
//!        '------------------- slot freed when serve(conn) ends -------------'
//! ```
//!
//! At the bound the loop stops accepting rather than accepting and closing: waiting clients
//! stay in the kernel's listen queue, which costs this process no descriptor and no CPU however
//! fast they come, so a flood on one listener cannot take the descriptors or the time that the
//! other listeners (the VM's export above all) need. A waiting client is served as soon as a
//! slot frees; the protocols' own handshake and idle timeouts make sure slots do free.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::addr::Stream;
use crate::listener::{Listener, Peer};

/// An accepted connection.
pub struct Connection {
    /// The connected stream.
    pub stream: Stream,
    /// Who connected.
    pub peer: Peer,
}

/// Accepts connections on a listener and serves each in its own task, with at most
/// `max_connections` open at once.
pub struct Acceptor {
    name: &'static str,
    max_connections: usize,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Acceptor {
    /// An acceptor named `name` in logs ("control", "metrics", "nbd"), bounded to
    /// `max_connections` open connections (at least one).
    pub fn new(name: &'static str, max_connections: usize) -> Self {
        let max_connections = max_connections.max(1);
        Acceptor {
            name,
            max_connections,
            slots: Arc::new(Semaphore::new(max_connections)),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Stops accepting when `stop` is cancelled (connections already open go on).
    pub fn with_stop(mut self, stop: CancellationToken) -> Self {
        self.stop = stop;
        self
    }

    /// Spawns the connections' tasks on `tasks`, so that their owner can wait for them.
    pub fn with_tasks(mut self, tasks: TaskTracker) -> Self {
        self.tasks = tasks;
        self
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.max_connections - self.slots.available_permits()
    }

    /// Accepts until the stop token is cancelled, calling `serve` for each connection and
    /// running the future it returns in a task of its own.
    pub async fn run<F, Fut>(&self, listener: &Listener, mut serve: F)
    where
        F: FnMut(Connection) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut backoff = Backoff::default();
        let mut at_bound = false;
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    if std::mem::take(&mut at_bound) {
                        info!(listener = self.name, "below the connection bound again");
                    }
                    slot
                }
                Err(_) => {
                    if !at_bound {
                        warn!(
                            listener = self.name,
                            max = self.max_connections,
                            "connection bound reached: new clients wait until one closes"
                        );
                        at_bound = true;
                    }
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        slot = self.slots.clone().acquire_owned() => {
                            slot.expect("the slots semaphore is never closed")
                        }
                    }
                }
            };
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    let served = serve(Connection { stream, peer });
                    self.tasks.spawn(async move {
                        served.await;
                        drop(slot);
                    });
                }
                // Out of descriptors, say: wait rather than spin, and go on.
                Err(e) => {
                    let wait = backoff.next_wait();
                    warn!(
                        listener = self.name,
                        "accept failed: {e}; retrying in {wait:?}"
                    );
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// Waits between failed accepts: 10 ms, doubling to 1 s, back to 10 ms after a success.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn next_wait(&mut self) -> Duration {
        let wait = Self::FIRST.saturating_mul(1 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        wait.min(Self::MAX)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.next_wait().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(10));
    }

    /// Serves each client by echoing one byte, then holding the connection until it closes.
    async fn echo_once(c: Connection) {
        let mut s = c.stream;
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
            while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
        }
    }

    async fn ping(s: &mut Stream) -> bool {
        let mut b = [7u8];
        s.write_all(&b).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut b)).await;
        matches!(r, Ok(Ok(_)))
    }

    #[tokio::test]
    async fn at_the_bound_a_new_client_waits_until_one_closes() {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::Unix(dir.path().join("s.sock"));
        let listener = Listener::bind(&addr).await.unwrap();
        let acceptor = Arc::new(Acceptor::new("test", 2));
        let a = acceptor.clone();
        tokio::spawn(async move { a.run(&listener, echo_once).await });
        let mut first = addr.connect().await.unwrap();
        let mut second = addr.connect().await.unwrap();
        assert!(ping(&mut first).await && ping(&mut second).await);

        let mut third = addr.connect().await.unwrap();
        assert!(!ping(&mut third).await, "served beyond the bound");
        assert_eq!(acceptor.open_connections(), 2);
        drop(first);

        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), third.read_exact(&mut b)).await;
        assert!(matches!(r, Ok(Ok(_))), "the waiting client was not served");
    }

    #[tokio::test]
    async fn stop_ends_the_loop_and_open_connections_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::Unix(dir.path().join("s.sock"));
        let listener = Listener::bind(&addr).await.unwrap();
        let stop = CancellationToken::new();
        let acceptor = Acceptor::new("test", 4).with_stop(stop.clone());
        let run = tokio::spawn(async move { acceptor.run(&listener, echo_once).await });
        let mut open = addr.connect().await.unwrap();
        assert!(ping(&mut open).await);

        stop.cancel();

        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the loop did not stop")
            .unwrap();
        assert!(addr.connect().await.is_err(), "still accepting after stop");
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(200), open.read(&mut b)).await;
        assert!(r.is_err(), "the open connection was closed: {r:?}");
    }
}

//! The bounded pool that runs blocking disk calls off the tokio workers.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::{BlockError, ErrorKind, Op, Result};

/// Runs blocking closures on tokio's blocking threads, at most `limit` at once.
///
/// Bounding matters: an NBD client with hundreds of requests in flight must not turn into
/// hundreds of threads. Cloning shares the bound.
#[derive(Clone, Debug)]
pub struct IoPool {
    permits: Arc<Semaphore>,
}

impl Default for IoPool {
    fn default() -> Self {
        IoPool::new(64)
    }
}

impl IoPool {
    /// A pool running at most `limit` calls at once.
    pub fn new(limit: usize) -> Self {
        IoPool {
            permits: Arc::new(Semaphore::new(limit.max(1))),
        }
    }

    /// Runs `f` on a blocking thread and waits for it.
    pub async fn run<T, F>(&self, op: Op, offset: u64, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| BlockError::new(ErrorKind::Shutdown, op, offset))?;
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r,
            Err(e) => Err(BlockError::new(ErrorKind::Io(None), op, offset)
                .context(format!("I/O thread failed: {e}"))),
        }
    }
}

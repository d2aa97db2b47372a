//! Peer processes for tests against real programs (qemu-nbd, nbdkit, qemu-io, ...): started
//! with their stderr in a log file, waited for until they listen, killed and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Is `tool` on PATH?
pub fn have(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
}

/// Fails the test when a peer binary is missing: scripts/test installs every peer, so a
/// missing one is a broken setup, not a reason to pass silently.
pub fn require(tools: &[&str]) {
    for tool in tools {
        assert!(
            have(tool),
            "{tool} is not installed: run scripts/test, which installs the test peers"
        );
    }
}

/// A server process, killed and reaped on drop. Its stderr goes to a log file in the test's
/// directory, shown when it fails to start.
pub struct Peer {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Peer {
    /// Starts `cmd`, named `name` in messages, its stderr in `dir/<name>.log`.
    pub fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Peer {
        let log = dir.join(format!("{name}.log"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Peer {
            child,
            name: name.to_string(),
            log,
        }
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `probe` connects (the server listens), failing if the server exits.
    pub async fn wait_ready(&mut self, probe: impl Fn() -> bool) {
        let start = Instant::now();
        while !probe() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited with {status} before listening:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} never listened",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the unix socket `sock` accepts.
    pub async fn wait_unix(&mut self, sock: &Path) {
        self.wait_ready(|| std::os::unix::net::UnixStream::connect(sock).is_ok())
            .await;
    }

    /// SIGKILL: the server vanishes without a word, as a crashed host would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

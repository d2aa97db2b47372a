//! The link of one primary disk to its secondary, kept by a task: it connects whenever the link
//! is down (with backoff), decides what the secondary must receive before the disk counts as
//! protected, tells the secondary when that sync makes its disk unusable, and fences the
//! primary when the secondary has taken over.
//!
//! ```text
//!   down --connect NBD + ask the peer--> plan --set link--> up --link lost--> down
//!                         |                                   |
//!                         '--peer failed over--> fenced <-----' (errors: ask the peer again)
//! ```
//!
//! What a (re)connection sends, in COLO's terms:
//!
//! | situation | plan |
//! |---|---|
//! | first link to this secondary | the disk's `sync=` (checksum, full or none) |
//! | the same secondary process as before (its instance) | the dirty bitmap only: its buffer still holds everything since the last checkpoint |
//! | another process (it restarted) | checksum: the bitmap is probably exact, but nothing proves it |
//! | the same process, still holding an old connection after 30 s | checksum (its requests may still land) |
//! | a peer without our commands (qemu-nbd, QEMU) | `full`, every time: nothing tells what it kept |
//!
//! Before a checksum or full sync the secondary is told (`replication-sync-begin`) that its
//! disk is no usable copy until the next checkpoint; a bitmap resync needs no such notice, since
//! copy-before-write keeps those copies out of what a failover keeps.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use nbd::addr::SocketAddr;
use nbd::client::{ClientConfig, NbdClient};
use net::tls::ClientStream;
use parking_lot::Mutex;
use qmp::QmpClient;
use replication::primary::{ChecksumReport, Digest, PrimaryNode, RemoteDigests};
use replication::state::{GenView, Outcome, decide};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::control::Events;
use crate::control::status::Status;

/// Shortest and longest pause between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// While the link is up, how often the keeper looks at it.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// While forwarding errors stand, how often the keeper asks the peer whether it took over.
const PEER_CHECK_EVERY: Duration = Duration::from_secs(2);
/// A link that stayed up this long resets the backoff (a link that drops at once does not).
const STABLE_LINK: Duration = Duration::from_secs(5);
/// How long the keeper waits for the secondary to finish the old connection's requests.
const OLD_CONNECTION_GRACE: Duration = Duration::from_secs(30);
/// The peer's status, digest and checkpoint commands.
pub(super) const PEER_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A control session with a secondary: connected, greeted and negotiated within `timeout`.
pub(super) async fn peer_session(
    addr: &SocketAddr,
    timeout: Duration,
) -> anyhow::Result<QmpClient<ClientStream>> {
    let label = format!("the secondary's control socket {addr}");
    let tls = super::security::current().client();
    let connect = net::tls::connect(addr, tls.as_deref());
    Ok(QmpClient::connect(label, connect, timeout).await?)
}
/// The names of the commands a peer's control socket offers: QEMU's monitor and ours both
/// answer `query-commands`, so this tells a coloblk secondary from QEMU's COLO secondary.
pub(super) async fn peer_commands(c: &mut QmpClient<ClientStream>) -> anyhow::Result<Vec<String>> {
    let list = c
        .execute_timeout("query-commands", json!({}), PEER_COMMAND_TIMEOUT)
        .await
        .context("the peer's commands")?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect())
}

/// Bytes per digest of a checksum sync (a multiple of the dirty bitmap's granularity).
const CHECKSUM_BLOCK: u64 = 64 << 10;

/// How a disk's first sync with a secondary compares the two disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Digests of both sides; only blocks that differ are copied.
    Checksum,
    /// Everything is copied (holes as write-zeroes).
    Full,
    /// The operator vouches that the disks are identical.
    None,
}

impl SyncMode {
    /// The option's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Checksum => "checksum",
            SyncMode::Full => "full",
            SyncMode::None => "none",
        }
    }
}

/// Where a disk's secondary is.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its replica export.
    pub uri: String,
    /// Its control socket, if the primary may talk to it.
    pub peer: Option<SocketAddr>,
}

/// What the keeper does with a connection it just made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Bitmap,
    Checksum,
    Full,
}

/// Settings every disk's keeper shares.
pub struct LinkConfig {
    /// Request timeout of the NBD link (and its handshake).
    pub link_timeout: Duration,
    /// Connect and handshake of the peer's control socket.
    pub peer_timeout: Duration,
    /// Fence the primary when its secondary has taken over.
    pub fence_on_promoted: bool,
    /// Where QMP events go.
    pub events: Arc<Events>,
    /// Called when a link came up or a resync ended (protection may have changed).
    pub on_change: Box<dyn Fn() + Send + Sync>,
}

/// The keeper's state, for status.
struct State {
    target: Target,
    /// How the first sync with this target compares the disks.
    sync: SyncMode,
    /// Bumped when the target changes: a link made for an older target is dropped.
    generation: u64,
    link: String,
    error: Option<String>,
    verified: bool,
    /// The first sync with this target is done (or under way).
    first_done: bool,
    /// The secondary process (instance) the bitmap is exact for.
    synced_instance: Option<u64>,
    /// The last checksum comparison.
    compared: Option<ChecksumReport>,
}

/// One primary disk and its link.
pub struct DiskLink {
    /// The disk's name (its export, and its name on the secondary).
    pub name: String,
    /// The replication node.
    pub node: PrimaryNode,
    /// The disk's persistent state (generations, write log).
    pub disk_state: Option<super::state::DiskState>,
    state: Mutex<State>,
    changed: Notify,
}

/// What the status shows of a link: `up`, `connecting` or `peer-promoted`, the last error,
/// and whether the peer answered our commands.
pub struct LinkStatus {
    /// The state.
    pub link: String,
    /// Why it is not up.
    pub error: Option<String>,
    /// The peer is a coloblk secondary that answered.
    pub verified: bool,
    /// The last checksum comparison.
    pub compared: Option<ChecksumReport>,
}

impl DiskLink {
    /// A disk whose keeper is not running yet.
    pub fn new(
        name: String,
        node: PrimaryNode,
        sync: SyncMode,
        target: Target,
        disk_state: Option<super::state::DiskState>,
    ) -> Arc<Self> {
        Arc::new(DiskLink {
            name,
            node,
            disk_state,
            state: Mutex::new(State {
                target,
                sync,
                generation: 0,
                link: "connecting".into(),
                error: None,
                verified: false,
                first_done: false,
                synced_instance: None,
                compared: None,
            }),
            changed: Notify::new(),
        })
    }

    /// Starts the keeper.
    pub fn spawn(self: &Arc<Self>, config: Arc<LinkConfig>) {
        tokio::spawn(self.clone().run(config));
    }

    /// How the first sync with the current target compares the disks.
    pub fn sync(&self) -> SyncMode {
        self.state.lock().sync
    }

    /// Points the disk at another secondary: the link is dropped (writes are dirty from now
    /// on) and the keeper connects to the new one as to a new secondary, first synced as
    /// `sync` says.
    pub fn retarget(&self, target: Target, sync: SyncMode) {
        {
            let mut st = self.state.lock();
            st.target = target;
            st.sync = sync;
            st.generation += 1;
            st.first_done = false;
            st.synced_instance = None;
            st.verified = false;
            st.link = "connecting".into();
            st.error = None;
        }
        self.node.clear_link();
        self.changed.notify_one();
    }

    /// The link as status shows it.
    pub fn status(&self) -> LinkStatus {
        let st = self.state.lock();
        LinkStatus {
            link: st.link.clone(),
            error: st.error.clone(),
            verified: st.verified,
            compared: st.compared,
        }
    }

    /// Compares the disk with its secondary's (digests), marking what differs dirty for the
    /// resync: DRBD's online verify. Needs a link up to a coloblk secondary.
    pub async fn verify(&self, config: &LinkConfig) -> anyhow::Result<ChecksumReport> {
        let peer = self.state.lock().target.peer.clone();
        let peer = peer.context("verify needs --peer-control (the secondary's digests)")?;
        anyhow::ensure!(self.node.link_up(), "the link to the secondary is down");
        let p = self.peer_state(&peer, config).await?;
        anyhow::ensure!(
            p.verified,
            "the peer at {peer} has no replication-digest (not a coloblk secondary)"
        );
        let digests = PeerDigests {
            client: tokio::sync::Mutex::new(p.client),
            disk: self.name.clone(),
        };
        let r = self
            .node
            .checksum_sync(&digests, CHECKSUM_BLOCK)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        if r.differing_bytes > 0 {
            // The secondary's disk held what the primary's does not: no usable copy until the
            // resync has repaired it and a checkpoint says so.
            let mut p = self.peer_state(&peer, config).await?;
            p.client
                .execute_timeout(
                    "replication-sync-begin",
                    json!({"disk": self.name}),
                    PEER_COMMAND_TIMEOUT,
                )
                .await?;
        }
        self.state.lock().compared = Some(r);
        Ok(r)
    }

    /// The control socket of the disk's current secondary, if the primary may talk to it.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.state.lock().target.peer.clone()
    }

    fn set_state(&self, link: &str, error: Option<String>) {
        let mut st = self.state.lock();
        st.link = link.into();
        st.error = error;
    }

    async fn run(self: Arc<Self>, config: Arc<LinkConfig>) {
        let mut backoff = BACKOFF_MIN;
        let mut linked_generation = None;
        let mut linked_at = std::time::Instant::now();
        let mut peer_checked = std::time::Instant::now() - PEER_CHECK_EVERY;
        loop {
            if self.node.fenced() {
                return;
            }
            let (target, generation) = {
                let st = self.state.lock();
                (st.target.clone(), st.generation)
            };
            if self.node.link_up() && linked_generation == Some(generation) {
                // Up: look again now and then; errors may mean the peer took over.
                let _ = tokio::time::timeout(WATCH_EVERY, self.changed.notified()).await;
                if self.node.status().error.is_some()
                    && peer_checked.elapsed() >= PEER_CHECK_EVERY
                    && let Some(peer) = &target.peer
                {
                    peer_checked = std::time::Instant::now();
                    if let Ok(Some(_)) = self.peer_state(peer, &config).await.map(|p| p.promoted) {
                        self.promoted(&config);
                    }
                }
                continue;
            }
            if linked_generation.is_some() && linked_at.elapsed() >= STABLE_LINK {
                backoff = BACKOFF_MIN;
            }
            match self.connect(&target, generation, &config).await {
                Ok(Connected::Linked) => {
                    linked_generation = Some(generation);
                    linked_at = std::time::Instant::now();
                    (config.on_change)();
                }
                Ok(Connected::Promoted) => {
                    self.promoted(&config);
                    if self.node.fenced() {
                        return;
                    }
                    // `continue` mode: wait for another target.
                    self.changed.notified().await;
                }
                Err(e) => {
                    let e = coloblk::error_chain(e.as_ref());
                    let first = self.state.lock().error.as_ref() != Some(&e);
                    if first {
                        warn!(disk = %self.name, "secondary unreachable, retrying: {e}");
                    }
                    self.set_state("connecting", Some(e));
                    let _ = tokio::time::timeout(backoff, self.changed.notified()).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn promoted(&self, config: &LinkConfig) {
        if self.state.lock().link == "peer-promoted" {
            return;
        }
        self.set_state(
            "peer-promoted",
            Some("the secondary has failed over: it serves the VM now".into()),
        );
        warn!(disk = %self.name, "the secondary has failed over and serves the VM");
        config.events.emit(
            "REPLICATION_PEER_PROMOTED",
            json!({"disk": self.name, "fenced": config.fence_on_promoted}),
        );
        self.node.clear_link();
        if config.fence_on_promoted {
            self.node.fence();
        }
    }

    /// Asks the peer's control socket what it is.
    async fn peer_state(&self, peer: &SocketAddr, config: &LinkConfig) -> anyhow::Result<Peer> {
        let mut c = peer_session(peer, config.peer_timeout).await?;
        let ours = peer_commands(&mut c)
            .await?
            .iter()
            .any(|n| n == "replication-digest");
        if !ours {
            return Ok(Peer {
                verified: false,
                instance: None,
                promoted: None,
                old_connection: false,
                client: c,
            });
        }
        let status = c
            .execute_timeout("query-replication", json!({}), PEER_COMMAND_TIMEOUT)
            .await?;
        let status = match serde_json::from_value(status).context("the peer's status")? {
            Status::Secondary(s) => s,
            // A peer that answers as a primary has been promoted: it serves the VM now.
            Status::Primary(_) => {
                return Ok(Peer {
                    verified: true,
                    instance: None,
                    promoted: Some(()),
                    old_connection: false,
                    client: c,
                });
            }
        };
        let Some(disk) = status.disks.iter().find(|d| d.name == self.name) else {
            anyhow::bail!("the secondary at {peer} has no disk '{}'", self.name);
        };
        Ok(Peer {
            verified: true,
            instance: Some(status.instance),
            promoted: status.failed_over.then_some(()),
            old_connection: disk.primary_connected,
            client: c,
        })
    }

    /// Asks the peer, connects the replica export, and sets the link with what must be sent.
    async fn connect(
        &self,
        target: &Target,
        generation: u64,
        config: &LinkConfig,
    ) -> anyhow::Result<Connected> {
        // The peer first: one that took over must be found even when its replica export is
        // gone, and requests of the old connection it still finishes must land before the new
        // link's copies (they would overwrite them otherwise).
        // An old connection the secondary never saw close (its end went silent in a network
        // partition, say) must not keep the link down for good: past the grace, the link comes
        // up with a full comparison, which does not trust the bitmap.
        let mut unsure = false;
        let mut peer = match &target.peer {
            Some(addr) => {
                let deadline = std::time::Instant::now() + OLD_CONNECTION_GRACE;
                loop {
                    let p = self.peer_state(addr, config).await?;
                    if p.promoted.is_some() {
                        return Ok(Connected::Promoted);
                    }
                    if !p.old_connection || std::time::Instant::now() >= deadline {
                        unsure = p.old_connection;
                        break Some(p);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            None => None,
        };
        let cfg = ClientConfig {
            request_timeout: Some(config.link_timeout),
            handshake_timeout: Some(config.link_timeout),
            tls: super::security::current().client(),
            ..Default::default()
        };
        let link = NbdClient::connect_uri(&target.uri, cfg)
            .await
            .with_context(|| format!("cannot reach the secondary at {}", target.uri))?;
        let (first_done, synced, sync) = {
            let st = self.state.lock();
            (st.first_done, st.synced_instance, st.sync)
        };
        let verified = peer.as_ref().is_some_and(|p| p.verified);
        let instance = peer.as_ref().and_then(|p| p.instance);
        let (outcome, host_restarted) = match self.compare_generations(peer.as_mut()).await? {
            Some((o, h)) => (Some(o), h),
            None => (None, false),
        };
        match &outcome {
            Some(Outcome::PeerNewer(g)) => {
                warn!(disk = %self.name, "the secondary failed over from generation {g}: it is newer than this disk");
                return Ok(Connected::Promoted);
            }
            Some(Outcome::SplitBrain(g)) => {
                config.events.emit(
                    "REPLICATION_SPLIT_BRAIN",
                    json!({"disk": self.name, "generation": g.to_string()}),
                );
                anyhow::bail!(
                    "split brain: both disks served as a primary after their last shared \
                     generation {g}; nothing is copied. Run replication-discard-changes (coloblk \
                     ctl discard-changes --disk {}) on the side whose changes are to be discarded",
                    self.name
                );
            }
            _ => {}
        }
        let plan = match (first_done, verified) {
            // The secondary's disk is this one's as of the last checkpoint (its state says so):
            // the write log and the dirty bitmap name everything that may differ.
            _ if outcome == Some(Outcome::Bitmap) && !unsure => {
                // A secondary whose host restarted may have lost writes it acknowledged: the
                // write log holds every write since the last checkpoint's flush. After a
                // process restart its page cache kept them, and the dirty bitmap (with the
                // log's ranges, if this primary restarted) is exact.
                if host_restarted && let Some(log) = self.node.write_log() {
                    for (o, l) in log.ranges() {
                        self.node.dirty().mark(o, l);
                    }
                    self.node.covers_unflushed();
                }
                Some(Plan::Bitmap)
            }
            // An old primary rejoining: its writes after the failover point are void.
            _ if outcome == Some(Outcome::Rejoin) => Some(Plan::Checksum),
            (false, true) => match sync {
                SyncMode::Checksum => Some(Plan::Checksum),
                SyncMode::Full => Some(Plan::Full),
                SyncMode::None => None,
            },
            // Without digests a checksum cannot be done: everything goes.
            (false, false) => match sync {
                SyncMode::None => None,
                _ => Some(Plan::Full),
            },
            (true, true) if instance == synced && !unsure => Some(Plan::Bitmap),
            (true, true) => Some(Plan::Checksum),
            // Nothing tells what an unverified peer kept (a host crash loses its page cache).
            (true, false) => match sync {
                SyncMode::None => None,
                _ => Some(Plan::Full),
            },
        };
        if let (Some(Plan::Checksum | Plan::Full), Some(p)) = (plan, peer.as_mut())
            && p.verified
        {
            p.client
                .execute_timeout(
                    "replication-sync-begin",
                    json!({"disk": self.name}),
                    PEER_COMMAND_TIMEOUT,
                )
                .await
                .context("telling the secondary a sync begins")?;
        }
        {
            // Set the link under the state lock, for the target this connect was made for:
            // a retarget meanwhile drops it (its plan was for another secondary).
            let mut st = self.state.lock();
            anyhow::ensure!(
                st.generation == generation,
                "the disk was pointed at another secondary"
            );
            if plan == Some(Plan::Full) {
                self.node.mark_all_dirty();
                self.node.covers_unflushed();
            }
            self.node
                .set_link(Arc::new(link))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            st.first_done = true;
            st.synced_instance = instance;
            st.verified = verified;
            st.link = "up".into();
            st.error = None;
        }
        let plan_name = match plan {
            None => "none (the operator vouches)",
            Some(Plan::Bitmap) => "the dirty bitmap",
            Some(Plan::Checksum) => "a checksum comparison",
            Some(Plan::Full) => "a full copy",
        };
        info!(disk = %self.name, replica = %target.uri, "link up; the secondary gets {plan_name}");
        config.events.emit(
            "REPLICATION_LINK_UP",
            json!({"disk": self.name, "sync": plan.map_or("none", |p| match p {
                Plan::Bitmap => "bitmap",
                Plan::Checksum => "checksum",
                Plan::Full => "full",
            })}),
        );
        if plan == Some(Plan::Checksum)
            && let Some(p) = peer
        {
            let digests = PeerDigests {
                client: tokio::sync::Mutex::new(p.client),
                disk: self.name.clone(),
            };
            match self.node.checksum_sync(&digests, CHECKSUM_BLOCK).await {
                Ok(r) => {
                    info!(
                        disk = %self.name,
                        compared = r.compared_bytes,
                        differing = r.differing_bytes,
                        "checksum comparison done"
                    );
                    self.state.lock().compared = Some(r);
                    // Every block was compared: whatever a refused flush lost was found.
                    self.node.covers_unflushed();
                }
                Err(e) => {
                    // Unsure what differs: everything goes.
                    warn!(disk = %self.name, "checksum comparison failed ({e}); copying everything");
                    self.node.mark_all_dirty();
                }
            }
        }
        Ok(Connected::Linked)
    }
}

impl DiskLink {
    /// What the generations of both disks say this connection must do; none when either side
    /// keeps no state (then the sync mode and what this process saw decide).
    async fn compare_generations(
        &self,
        peer: Option<&mut Peer>,
    ) -> anyhow::Result<Option<(Outcome, bool)>> {
        let (Some(st), Some(p)) = (&self.disk_state, peer) else {
            return Ok(None);
        };
        if !p.verified {
            return Ok(None);
        }
        let theirs = match p
            .client
            .execute_timeout(
                "replication-generations",
                json!({"disk": self.name}),
                PEER_COMMAND_TIMEOUT,
            )
            .await
        {
            Ok(v) => serde_json::from_value::<GenView>(v)
                .context("the secondary's generations are not readable")?,
            // An older secondary, or one without state: nothing proves a relation.
            Err(e) => {
                info!(disk = %self.name, "the secondary gives no generations ({e})");
                return Ok(None);
            }
        };
        let ours = super::state::view(st);
        let outcome = decide(&ours, &theirs);
        info!(disk = %self.name, ?outcome, ours = ?ours, theirs = ?theirs, "generations compared");
        Ok(Some((outcome, theirs.host_restarted)))
    }
}

/// What [`DiskLink::connect`] achieved.
enum Connected {
    Linked,
    Promoted,
}

/// What the peer's control socket said.
struct Peer {
    verified: bool,
    instance: Option<u64>,
    promoted: Option<()>,
    /// The secondary still serves a primary connection to this disk (an old one of ours).
    old_connection: bool,
    client: QmpClient<ClientStream>,
}

/// The secondary's digests, over its control socket.
struct PeerDigests {
    client: tokio::sync::Mutex<QmpClient<ClientStream>>,
    disk: String,
}

#[async_trait]
impl RemoteDigests for PeerDigests {
    async fn digests(&self, offset: u64, len: u64, block: u64) -> Result<Vec<Digest>, String> {
        let mut out = Vec::new();
        let mut at = offset;
        // The peer answers at most MAX_DIGEST_RANGE per command.
        while at < offset + len {
            let n = (offset + len - at).min(crate::control::MAX_DIGEST_RANGE);
            let reply = self
                .client
                .lock()
                .await
                .execute_timeout(
                    "replication-digest",
                    json!({"disk": self.disk, "offset": at, "length": n, "block": block}),
                    PEER_COMMAND_TIMEOUT,
                )
                .await
                .map_err(|e| format!("the secondary's digests: {e}"))?;
            for d in reply["digests"].as_array().into_iter().flatten() {
                out.push(parse_digest(d.as_str().unwrap_or(""))?);
            }
            at += n;
        }
        Ok(out)
    }
}

fn parse_digest(hex: &str) -> Result<Digest, String> {
    let bad = || format!("the secondary sent a malformed digest '{hex}'");
    if hex.len() != 32 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut d = [0u8; 16];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_from_hex_and_malformed_ones_are_refused() {
        let d = parse_digest("000102030405060708090a0b0c0d0eff").unwrap();
        assert_eq!(d[0], 0);
        assert_eq!(d[15], 0xff);
        for bad in [
            "",
            "00",
            "zz0102030405060708090a0b0c0d0eff",
            "é0102030405060708090a0b0c0d0e",
        ] {
            assert!(parse_digest(bad).is_err(), "{bad}");
        }
    }
}

//! One writer at a time on an export that says so ([`Export::single_writer`]): the secondary's
//! replica export takes one primary.
//!
//! ```text
//!   NBD_OPT_GO on a single-writer export --> Claims::claim(export, identity)
//!       nobody holds it            --> granted
//!       the same identity holds it --> granted; the old connection is evicted (it stops reading,
//!                                      finishes what it read) and the new one enters
//!                                      transmission once it is gone: a primary reconnecting
//!                                      after its old connection died unseen (a partition)
//!       another identity holds it  --> NBD_REP_ERR_POLICY naming the holder
//! ```
//!
//! The identity is the client certificate's name over TLS; without TLS every client has the same
//! (no) identity, so the newest connection wins: only TLS makes "one primary" mean something,
//! which is why the daemon requires it on the replica listener.
//!
//! [`Export::single_writer`]: super::Export::single_writer

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// Who holds which single-writer export, for one server.
#[derive(Default)]
pub(super) struct Claims {
    holders: Mutex<HashMap<String, Holder>>,
    next: AtomicU64,
}

struct Holder {
    id: u64,
    identity: Option<String>,
    peer: String,
    evict: CancellationToken,
    released: CancellationToken,
}

/// A connection's hold on an export, released when the connection's session is dropped.
pub(super) struct Claim {
    claims: Arc<Claims>,
    export: String,
    id: u64,
    /// Cancelled when a newer connection of the same identity takes over.
    pub(super) evict: CancellationToken,
    released: CancellationToken,
    /// The evicted connection's release, to wait for before transmission starts.
    pub(super) previous: Option<CancellationToken>,
}

impl Claims {
    /// Claims `export` for a client known as `identity` (its certificate's name) at `peer`;
    /// `Err` says who holds it.
    pub(super) fn claim(
        self: &Arc<Self>,
        export: &str,
        identity: Option<&str>,
        peer: &str,
    ) -> Result<Claim, String> {
        let mut holders = self.holders.lock();
        let previous = match holders.get(export) {
            Some(old) if old.identity.as_deref() == identity => {
                old.evict.cancel();
                Some(old.released.clone())
            }
            Some(old) => {
                let who = old
                    .identity
                    .as_deref()
                    .unwrap_or("an unauthenticated client");
                return Err(format!(
                    "export '{export}' takes one writer (one primary) and '{who}' at {} is \
                     connected; a second is refused",
                    old.peer
                ));
            }
            None => None,
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (evict, released) = (CancellationToken::new(), CancellationToken::new());
        holders.insert(
            export.to_string(),
            Holder {
                id,
                identity: identity.map(str::to_string),
                peer: peer.to_string(),
                evict: evict.clone(),
                released: released.clone(),
            },
        );
        Ok(Claim {
            claims: self.clone(),
            export: export.to_string(),
            id,
            evict,
            released,
            previous,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut holders = self.claims.holders.lock();
        if holders.get(&self.export).is_some_and(|h| h.id == self.id) {
            holders.remove(&self.export);
        }
        self.released.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_identity_is_refused_while_the_holder_is_connected() {
        let claims = Arc::new(Claims::default());
        let a = claims.claim("vm0", Some("CN=a"), "10.0.0.1:1").unwrap();

        let err = claims
            .claim("vm0", Some("CN=b"), "10.0.0.2:1")
            .err()
            .unwrap();

        assert_eq!(
            err,
            "export 'vm0' takes one writer (one primary) and 'CN=a' at 10.0.0.1:1 is connected; \
             a second is refused"
        );
        assert!(claims.claim("vm1", Some("CN=b"), "10.0.0.2:1").is_ok());
        drop(a);
        assert!(claims.claim("vm0", Some("CN=b"), "10.0.0.2:1").is_ok());
    }

    #[test]
    fn the_same_identity_evicts_the_old_connection_and_waits_for_it() {
        let claims = Arc::new(Claims::default());
        let old = claims.claim("vm0", Some("CN=a"), "10.0.0.1:1").unwrap();

        let new = claims.claim("vm0", Some("CN=a"), "10.0.0.1:2").unwrap();

        assert!(old.evict.is_cancelled());
        let previous = new.previous.clone().unwrap();
        assert!(!previous.is_cancelled());
        drop(old);
        assert!(previous.is_cancelled());
        // The old claim's drop did not release the new holder's hold.
        assert!(claims.claim("vm0", Some("CN=b"), "x").is_err());
    }
}

//! Exports: the named devices a server offers, and the set that holds them.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockdev::BlockDev;
use parking_lot::RwLock;

use crate::proto::*;

/// One named export.
pub struct Export {
    /// The name clients ask for.
    pub name: String,
    /// Free text that NBD_OPT_LIST and NBD_INFO_DESCRIPTION show.
    pub description: String,
    /// The device behind the export.
    pub dev: Arc<dyn BlockDev>,
    /// Refuse writes even if the device would take them.
    pub read_only: bool,
    /// One client at a time (per client identity; see `claim.rs`): a second identity is
    /// refused at NBD_OPT_GO, the same identity replaces its old connection.
    pub single_writer: bool,
}

impl Export {
    /// A writable export of `dev` named `name`, without a description.
    pub fn new(name: impl Into<String>, dev: Arc<dyn BlockDev>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            dev,
            read_only: false,
            single_writer: false,
        }
    }

    pub(super) fn is_read_only(&self) -> bool {
        self.read_only || self.dev.info().read_only
    }

    /// Transmission flags advertised for this export.
    pub(super) fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_DF
            | FLAG_SEND_CACHE
            // Every connection shares one BlockDev, so a flush on one covers writes completed
            // on all of them: what multi-conn requires.
            | FLAG_CAN_MULTI_CONN;
        if self.is_read_only() {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        flags
    }
}

/// The exports a server offers; shared, so exports can be added and removed while it runs.
#[derive(Clone, Default)]
pub struct ExportSet(Arc<RwLock<BTreeMap<String, Arc<Export>>>>);

impl ExportSet {
    /// An empty set.
    pub fn new() -> Self {
        ExportSet::default()
    }

    /// Adds (or replaces) an export.
    pub fn add(&self, export: Export) {
        self.0.write().insert(export.name.clone(), Arc::new(export));
    }

    /// Removes an export; connections already open to it keep it until they close.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.0.write().remove(name)
    }

    /// Looks an export up. The empty name means the only export when there is just one,
    /// as clients that do not name an export (qemu-nbd's default) expect.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let map = self.0.read();
        if let Some(e) = map.get(name) {
            return Some(e.clone());
        }
        if name.is_empty() && map.len() == 1 {
            return map.values().next().cloned();
        }
        None
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.0.read().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemoryDev;

    #[test]
    fn empty_name_means_the_only_export() {
        let set = ExportSet::new();
        set.add(Export::new("disk", Arc::new(MemoryDev::new(1 << 20))));
        assert_eq!(set.get("").unwrap().name, "disk");
        set.add(Export::new("other", Arc::new(MemoryDev::new(512))));
        assert!(set.get("").is_none());
    }
}

//! What the cluster watcher needs of the streams bucket: its last revision, which commits
//! this replica made itself, and adopting the outbox of a replica that died before publishing.

use super::*;

impl NatsStore {
    pub fn streams_bucket(&self) -> &kv::Store {
        &self.streams
    }

    /// The streams bucket's last revision: a watcher started later skips what is older.
    pub async fn last_revision(&self) -> Result<u64, StoreError> {
        self.streams
            .status()
            .await
            .map(|s| s.info.state.last_sequence)
            .map_err(|e| backend("bucket status", e))
    }

    /// Whether this replica committed `key` at `revision` (consumes the mark).
    pub fn committed_here(&self, key: &str, revision: u64) -> bool {
        let mut local = lock(&self.local);
        match local.iter().position(|(k, r)| k == key && *r == revision) {
            Some(i) => {
                local.remove(i);
                true
            }
            None => false,
        }
    }

    pub(super) fn mark_local(&self, key: &str, revision: u64) {
        let mut local = lock(&self.local);
        local.push_back((key.to_string(), revision));
        if local.len() > 4096 {
            local.pop_front();
        }
    }

    /// Makes this replica publish `key`'s outbox (a replica that committed it died first).
    pub fn adopt_outbox(&self, key: &str) {
        lock(&self.dirty).insert(key.to_string());
    }
}

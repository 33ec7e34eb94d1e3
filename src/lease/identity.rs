//! The lease store as a [`CredentialRevoker`]: a decommission revokes every
//! lease whose holder token belonged to the identity, through the normal
//! revocation path (marked `revoking` under the write lock, the expiry entry
//! moved to now, the sleeper woken: it drops the user on the target, retries
//! while the target is down, and forgets the lease only once the user is
//! gone).
//!
//! There is no per-identity index: both calls read every lease record once.
//! A decommission is rare and the records are small; a full read of 100,000
//! leases is one scan of `leases/rec/`.

use crate::lifecycle::{CredentialKind, CredentialRevoker};

use super::{LeaseError, LeaseStore};

impl LeaseStore {
    /// The ids of the leases held by tokens of `identity`, and of those how
    /// many are not yet being revoked.
    fn leases_of_identity(&self, identity: &str) -> Result<(Vec<String>, u32), LeaseError> {
        let mut ids = Vec::new();
        let mut live = 0u32;
        for record in self.list("", false)? {
            if record.identity == identity {
                if !record.revoking {
                    live = live.saturating_add(1);
                }
                ids.push(record.id);
            }
        }
        Ok((ids, live))
    }

    /// Marks every lease of `identity` for revocation now and wakes the
    /// sleeper; returns how many leases it found (those already marked by
    /// the revocation of the identity's tokens included: they end with this
    /// identity too). A lease already revoked and forgotten is not found, so
    /// asking again after the sleeper has done its work answers 0.
    pub fn revoke_identity(&self, identity: &str, now_ms: u64) -> Result<u32, LeaseError> {
        let (ids, _) = self.leases_of_identity(identity)?;
        let mut found = 0u32;
        for id in &ids {
            if self.mark_revoking(id, now_ms)?.is_some() {
                found = found.saturating_add(1);
            }
        }
        if found > 0 {
            self.inner.wake.notify_one();
        }
        Ok(found)
    }

    /// How many leases of `identity` are live (not yet being revoked).
    pub fn count_identity(&self, identity: &str) -> Result<u32, LeaseError> {
        Ok(self.leases_of_identity(identity)?.1)
    }
}

impl CredentialRevoker for LeaseStore {
    fn kind(&self) -> CredentialKind {
        CredentialKind::Lease
    }

    fn revoke_identity(&self, identity: &str, now_ms: u64) -> Result<u32, String> {
        LeaseStore::revoke_identity(self, identity, now_ms).map_err(|e| e.to_string())
    }

    fn count_identity(&self, identity: &str) -> Result<u32, String> {
        LeaseStore::count_identity(self, identity).map_err(|e| e.to_string())
    }
}

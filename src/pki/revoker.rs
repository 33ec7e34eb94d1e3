//! The PKI as a [`CredentialRevoker`]: a decommission revokes every valid
//! certificate issued to the identity (one whose SAN matched its binding,
//! or one its tokens asked for); the serials enter the CRL and the
//! client-certificate trust store refuses them from then on.

use std::sync::Arc;

use crate::clock::Clock;
use crate::lifecycle::{CredentialKind, CredentialRevoker};

use super::PkiStore;

/// The certificates of an identity, for the lifecycle.
pub struct IdentityCerts {
    store: Arc<PkiStore>,
    clock: Clock,
}

impl IdentityCerts {
    pub fn new(store: Arc<PkiStore>, clock: Clock) -> Self {
        Self { store, clock }
    }
}

impl CredentialRevoker for IdentityCerts {
    fn kind(&self) -> CredentialKind {
        CredentialKind::Certificate
    }

    fn revoke_identity(&self, identity: &str, now_ms: u64) -> Result<u32, String> {
        self.store
            .revoke_identity(identity, now_ms)
            .map_err(|e| e.to_string())
    }

    fn count_identity(&self, identity: &str) -> Result<u32, String> {
        let serials = self
            .store
            .valid_serials_of_identity(identity, self.clock.now_ms())
            .map_err(|e| e.to_string())?;
        Ok(u32::try_from(serials.len()).unwrap_or(u32::MAX))
    }
}

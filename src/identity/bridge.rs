//! The token, certificate and policy stores as this module sees them.

use super::{CertificateRevoker, IdentityError, PolicyCatalog, TokenRevoker};
use crate::pki::PkiStore;
use crate::policy_store::PolicyStore;
use crate::token::TokenStore;

impl TokenRevoker for TokenStore {
    fn revoke_identity(&self, identity: &str, now_ms: u64) -> Result<u32, IdentityError> {
        TokenStore::revoke_identity(self, identity, now_ms)
            .map_err(|e| IdentityError::Tokens(e.to_string()))
    }
}

impl CertificateRevoker for PkiStore {
    fn revoke_issued_for(&self, identities: &[&str], now_ms: u64) -> Result<u32, IdentityError> {
        PkiStore::revoke_issued_for_any(self, identities, now_ms)
            .map_err(|e| IdentityError::Certificates(e.to_string()))
    }
}

impl PolicyCatalog for PolicyStore {
    fn policy_exists(&self, name: &str) -> Result<bool, IdentityError> {
        if name == crate::policy::ROOT_POLICY {
            return Ok(true);
        }
        self.exists(name)
            .map_err(|e| IdentityError::Tokens(e.to_string()))
    }
}

//! The rotation broker's one question about authority, answered from the
//! policy store and the identity inventory: may the identity that set a
//! rotation policy still read the secret it names
//! ([`crate::rotation::reads::ReadCheck`])?
//!
//! Owns no storage prefix; it reads policies through `PolicyStore`,
//! identities through `IdentityStore` and tokens through `TokenStore`, and
//! writes nothing.

use std::sync::Arc;

use crate::clock::Clock;
use crate::identity::IdentityStore;
use crate::policy::Capability;
use crate::policy_store::PolicyStore;
use crate::rotation::reads::{ReadCheck, ReadRefused, Setter};
use crate::token::TokenStore;

/// The identity of the root token and of the tokens it issues; never an
/// identity of the inventory (`IdentityName` refuses it).
const ROOT_IDENTITY: &str = "root";

/// Answers [`ReadCheck`] with the setter's policies as they are now.
pub struct SetterReads {
    policies: PolicyStore,
    identities: Arc<IdentityStore>,
    tokens: TokenStore,
    clock: Clock,
}

impl SetterReads {
    pub fn new(
        policies: PolicyStore,
        identities: Arc<IdentityStore>,
        tokens: TokenStore,
        clock: Clock,
    ) -> Self {
        Self {
            policies,
            identities,
            tokens,
            clock,
        }
    }

    /// The policies the setter holds now: those its token held when it set
    /// the policy and, for an identity of the inventory, that the identity
    /// (enabled, unexpired) still holds. `root` is the root token's
    /// identity, never one of the inventory: its recorded policies stand,
    /// while the setting token is live if the policy records its accessor.
    fn held_now(&self, setter: &Setter, resource: &str) -> Result<Vec<String>, ReadRefused> {
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(identity = %setter.identity, error = %e, "cannot check a rotation setter's grants");
            ReadRefused::Unavailable(resource.to_owned())
        };
        // A recorded accessor (a root-lineage token without the `root`
        // policy) lends its authority only while that token is live.
        if !setter.accessor.is_empty() {
            let live = self
                .tokens
                .lookup_accessor(&setter.accessor, self.clock.now_ms())
                .map_err(|e| unavailable(&e))?;
            if live.is_none() {
                return Err(ReadRefused::TokenGone(setter.accessor.clone()));
            }
        }
        if setter.identity == ROOT_IDENTITY {
            return Ok(setter.policies.clone());
        }
        let record = self
            .identities
            .get(&setter.identity)
            .map_err(|e| unavailable(&e))?
            .ok_or_else(|| ReadRefused::NoIdentity(setter.identity.clone()))?;
        if !record.is_active(self.clock.now_ms()) {
            return Err(ReadRefused::Inactive(setter.identity.clone()));
        }
        Ok(setter
            .policies
            .iter()
            .filter(|p| record.policies.contains(p))
            .cloned()
            .collect())
    }
}

impl ReadCheck for SetterReads {
    fn may_read(&self, setter: &Setter, resource: &str) -> Result<(), ReadRefused> {
        let held = self.held_now(setter, resource)?;
        let set = self.policies.compiled_set(&held).map_err(|e| {
            tracing::warn!(identity = %setter.identity, error = %e, "cannot compile a rotation setter's policies");
            ReadRefused::Unavailable(resource.to_owned())
        })?;
        match set.authorize(resource, Capability::Read) {
            Some(_) => Ok(()),
            None => Err(ReadRefused::Denied {
                identity: setter.identity.clone(),
                resource: resource.to_owned(),
            }),
        }
    }
}

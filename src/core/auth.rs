//! The authentication and authorisation seam: every RPC but status and
//! unseal passes through `Gate::authenticate` and `Gate::authorize`.
//!
//! Storage prefix `auth/` (through the barrier only):
//! - `auth/token/<hex keyed hash>`: a token record (`TokenRecord`).
//!
//! Tokens are stored only as HMAC-SHA256 under a key derived from the
//! keyring, so the data folder alone does not let anyone test a guessed
//! token offline, and a lookup by hash never compares secret bytes.
//!
//! The foundation knows only the root token made by `init`; the identity,
//! token and policy system replaces the body of this module, not its callers.

use std::sync::{Arc, RwLock};

use prost::Message;
use zeroize::Zeroizing;

use crate::barrier::{Barrier, BarrierError};
use crate::policy::Capability;
use crate::token::format::TokenSecret;

const TOKEN_PREFIX: &str = "auth/token/";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send 'authorization: Bearer <token>'")]
    MissingToken,
    #[error("the token is not valid")]
    BadToken,
    #[error("permission denied")]
    Denied,
    #[error("stored token record is corrupt")]
    Corrupt,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

/// A stored token; found by the keyed hash of the token text.
#[derive(Clone, PartialEq, Message)]
pub struct TokenRecord {
    #[prost(string, tag = "1")]
    pub accessor: String,
    #[prost(string, tag = "2")]
    pub identity: String,
    #[prost(string, repeated, tag = "3")]
    pub policies: Vec<String>,
    #[prost(uint64, tag = "4")]
    pub created_at_ms: u64,
}

/// Who is calling, as established by `Gate::authenticate`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: String,
    pub accessor: String,
    pub policies: Vec<String>,
}

/// Proof that a caller may use a capability on a resource. Only
/// `Gate::authorize` makes one; domain actions that need a check take it.
#[derive(Debug)]
pub struct Authorized {
    resource: String,
    capability: Capability,
}

impl Authorized {
    pub fn resource(&self) -> &str {
        &self.resource
    }

    pub fn capability(&self) -> Capability {
        self.capability
    }
}

pub struct Gate {
    barrier: Arc<Barrier>,
    /// HMAC key for token hashes; present while unsealed.
    hash_key: RwLock<Option<ring::hmac::Key>>,
}

impl Gate {
    pub fn new(barrier: Arc<Barrier>) -> Self {
        Self {
            barrier,
            hash_key: RwLock::new(None),
        }
    }

    /// Loads the token hash key after an unseal.
    pub fn on_unseal(&self) -> Result<(), AuthError> {
        let key = self.barrier.derive_key("auth/token-hash")?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_slice());
        *self.hash_key.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
        Ok(())
    }

    pub fn on_seal(&self) {
        *self.hash_key.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn token_key(&self, token: &str) -> Result<String, AuthError> {
        let guard = self.hash_key.read().unwrap_or_else(|e| e.into_inner());
        let key = guard
            .as_ref()
            .ok_or(AuthError::Barrier(BarrierError::Sealed))?;
        let tag = ring::hmac::sign(key, token.as_bytes());
        Ok(format!("{TOKEN_PREFIX}{}", hex::encode(tag.as_ref())))
    }

    /// Makes the root token: policy `root`, no expiry. Shown once by `init`.
    pub fn create_root_token(&self, now_ms: u64) -> Result<TokenSecret, AuthError> {
        let token = TokenSecret::generate().map_err(|_| AuthError::Corrupt)?;
        let record = TokenRecord {
            accessor: crate::token::format::new_accessor().map_err(|_| AuthError::Corrupt)?,
            identity: "root".into(),
            policies: vec!["root".into()],
            created_at_ms: now_ms,
        };
        self.barrier
            .put(&self.token_key(token.expose())?, &record.encode_to_vec())?;
        Ok(token)
    }

    /// Finds the caller a token belongs to.
    pub fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        if TokenSecret::parse(token).is_err() {
            return Err(AuthError::BadToken);
        }
        let raw: Zeroizing<Vec<u8>> = self
            .barrier
            .get(&self.token_key(token)?)?
            .ok_or(AuthError::BadToken)?;
        let record = TokenRecord::decode(raw.as_slice()).map_err(|_| AuthError::Corrupt)?;
        Ok(Caller {
            identity: record.identity,
            accessor: record.accessor,
            policies: record.policies,
        })
    }

    /// Checks a capability on a resource against the caller's policies.
    pub fn authorize(
        &self,
        caller: &Caller,
        capability: Capability,
        resource: &str,
    ) -> Result<Authorized, AuthError> {
        if caller.policies.iter().any(|p| p == "root") {
            return Ok(Authorized {
                resource: resource.to_owned(),
                capability,
            });
        }
        Err(AuthError::Denied)
    }
}

//! Federation: delegated tokens for agents (RFC 8693) and keyward as an
//! OIDC issuer of identity tokens.
//!
//! - `delegation`: the rules of an exchange (who may act, which policies,
//!   how long), pure; the tokens themselves live in `token` (`tokens/`).
//!
//! Storage prefix `federation/` (through the barrier only): the OIDC
//! signing keys and roles (`federation/keys/`, `federation/roles/`). This
//! module must not touch any other prefix; it reads tokens and identities
//! through their modules' public calls only.

pub mod delegation;

use std::sync::RwLock;

use crate::config::FederationConfig;

/// The federation settings and state of one vault.
pub struct Federation {
    config: RwLock<FederationConfig>,
}

impl Default for Federation {
    fn default() -> Self {
        Self::new(FederationConfig::default())
    }
}

impl Federation {
    pub fn new(config: FederationConfig) -> Self {
        Self {
            config: RwLock::new(config),
        }
    }

    /// The settings now in force.
    pub fn config(&self) -> FederationConfig {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_config(&self, config: FederationConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

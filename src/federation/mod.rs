//! Federation: delegated tokens for agents (RFC 8693) and keyward as an
//! OIDC issuer of identity tokens.
//!
//! - `delegation`: the rules of an exchange (who may act, which policies,
//!   how long), pure; the tokens themselves live in `token` (`tokens/`).
//!
//! Storage prefix `federation/` (through the barrier only): the OIDC
//! signing keys and roles (`federation/keys/`, `federation/roles/`), and
//! the governance figures (`federation/figures`, see `figures`). This
//! module must not touch any other prefix; it reads tokens and identities
//! through their modules' public calls only.

pub mod delegation;
pub mod figures;
pub mod issuer;

use std::sync::{Arc, RwLock};

use crate::barrier::Barrier;
use crate::clock::{Clock, Shutdown};
use crate::config::FederationConfig;
use crate::metrics::Metrics;

/// The federation settings and state of one vault.
pub struct Federation {
    config: RwLock<FederationConfig>,
    /// Signing keys and roles (`federation/`).
    pub issuer: issuer::Issuer,
    clock: Clock,
    /// Identity tokens and delegations counted for governance and
    /// `/metrics`, persisted under `federation/figures`.
    pub figures: figures::Figures,
}

impl Federation {
    pub fn new(barrier: Arc<Barrier>, clock: Clock, metrics: &Metrics) -> Self {
        Self {
            config: RwLock::new(FederationConfig::default()),
            figures: figures::Figures::new(barrier.clone(), metrics),
            issuer: issuer::Issuer::new(barrier),
            clock,
        }
    }

    /// The discovery document and the JWKS as published now.
    pub fn discovery(&self) -> Result<(String, String), issuer::IssuerError> {
        let issuer_url = self
            .config()
            .issuer
            .ok_or(issuer::IssuerError::NotConfigured)?;
        let keys = self.issuer.keys()?;
        Ok((
            issuer::discovery_json(&issuer_url, &["ES256", "EdDSA"]),
            issuer::jwks_json(&keys, self.clock.now_ms()),
        ))
    }

    /// Counts an identity token of `role` for `audience`.
    pub fn count_issued(&self, role: &str, audience: &str) {
        self.figures.count_issued(role, audience);
    }

    /// Counts a delegated token made for `agent`, acting for `delegator`.
    pub fn count_exchange(&self, agent: &str, delegator: &str) {
        self.figures.count_delegation(agent, delegator);
    }

    /// The background task `oidc-key-rotation`: a new signing key every
    /// `oidc_provider.rotation_period`, and keys whose tokens have all
    /// expired removed; sleeps on the one clock, so tests advance it.
    pub async fn run_rotation(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            let config = self.config();
            let period_ms = u64::try_from(config.rotation_period.as_millis()).unwrap_or(u64::MAX);
            let now = self.clock.now_ms();
            // Sealed, or no key yet: look again later.
            let next = match self.issuer.next_rotation_ms(period_ms) {
                Ok(Some(due)) if due <= now => {
                    if let Err(e) = self.issuer.rotate(&config.algorithm, now) {
                        tracing::warn!(error = %e, "scheduled OIDC key rotation failed");
                    }
                    let _ = self.issuer.prune(now);
                    now.saturating_add(60_000)
                }
                Ok(Some(due)) => {
                    let _ = self.issuer.prune(now);
                    due.min(now.saturating_add(3_600_000))
                }
                _ => now.saturating_add(60_000),
            };
            tokio::select! {
                _ = self.clock.sleep_until_ms(next) => {}
                _ = shutdown.wait() => return,
            }
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

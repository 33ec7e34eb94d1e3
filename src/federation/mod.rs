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
pub mod issuer;

use std::sync::{Arc, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

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
    /// `keyward_oidc_identity_tokens_total{role,audience}`.
    issued: Family<Vec<(String, String)>, Counter>,
    /// `keyward_delegations_total{agent_kind}`.
    exchanged: Family<Vec<(String, String)>, Counter>,
}

impl Federation {
    pub fn new(barrier: Arc<Barrier>, clock: Clock, metrics: &Metrics) -> Self {
        let issued = Family::<Vec<(String, String)>, Counter>::default();
        let exchanged = Family::<Vec<(String, String)>, Counter>::default();
        metrics.register(
            "keyward_oidc_identity_tokens",
            "Identity tokens (JWTs) issued, by OIDC role and audience",
            issued.clone(),
        );
        metrics.register(
            "keyward_delegations",
            "Delegated tokens made by token exchange, by the actor's kind",
            exchanged.clone(),
        );
        Self {
            config: RwLock::new(FederationConfig::default()),
            issuer: issuer::Issuer::new(barrier),
            clock,
            issued,
            exchanged,
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
        self.issued
            .get_or_create(&vec![
                ("role".to_owned(), role.to_owned()),
                ("audience".to_owned(), audience.to_owned()),
            ])
            .inc();
    }

    /// Counts a delegated token made for an actor of `kind`.
    pub fn count_exchange(&self, kind: &str) {
        self.exchanged
            .get_or_create(&vec![("agent_kind".to_owned(), kind.to_owned())])
            .inc();
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

//! Core: the parts of one vault wired together, and the request life cycle
//! (authenticate -> authorize -> act -> audit) that `api` drives.
//!
//! Owns no storage prefix of its own; it calls the domain modules. It knows
//! nothing of protobuf or gRPC status codes.

pub mod auth;
pub mod call;
mod report;
pub mod usage;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::audit::{AuditError, AuditLog};
use crate::barrier::{Barrier, BarrierError, SealStatus, UnsealShare};
use crate::identity::login::{Login, ThrottleConfig};
use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use crate::oidc::JwksCache;
use crate::policy_store::PolicyStore;
use crate::rotation::{Broker, BrokerOptions, RotationDeps};
use crate::secrets::{DataLimits, SecretStore};
use crate::token::format::TokenSecret;
use crate::token::TokenStore;

pub use auth::{AuthError, Authorized, Caller, Gate};
pub use usage::{IdentityUsage, Usage};

/// Milliseconds since the Unix epoch; the one place the core reads the clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// What `init` hands back once: the unseal shares and the root token.
pub struct InitOutput {
    pub shares: Vec<UnsealShare>,
    pub root_token: TokenSecret,
}

/// Resolves once `signal` (from `Core::shutdown_signal`) turns `true`, or
/// its sender is gone. Holds no guard across an await, so it is `Send`.
pub async fn until_stopped(signal: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = signal.wait_for(|stopping| *stopping).await;
}

pub struct Core {
    pub barrier: Arc<Barrier>,
    pub gate: Gate,
    pub tokens: TokenStore,
    pub policies: PolicyStore,
    pub usage: Usage,
    pub secrets: Arc<SecretStore>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    /// Serialises init, unseal, seal and key rotation.
    seal_lock: tokio::sync::Mutex<()>,
    /// The identity inventory, secret-ids, bindings and OIDC issuers.
    pub identities: IdentityStore,
    /// Login checks and their brute-force state (in memory).
    pub login: Login,
    /// The rotation broker (issue 4): policies, runs, the scheduler's state.
    pub rotation: Broker,
    /// Set once when the server begins to shut down; long-running tasks
    /// and streams (scheduler, workers, `Watch`) select on it.
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Core {
    pub fn new(
        barrier: Arc<Barrier>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
        limits: DataLimits,
    ) -> Self {
        let policies = PolicyStore::new(barrier.clone());
        let tokens = TokenStore::new(barrier.clone(), Arc::new(policies.clone()));
        let usage = Usage::new(barrier.clone());
        let secrets = Arc::new(SecretStore::new(barrier.clone(), limits));
        let audit = Arc::new(audit);
        let rotation_deps = RotationDeps {
            secrets: secrets.clone(),
            audit: audit.clone(),
            barrier: barrier.clone(),
            clock: crate::clock::Clock::system(),
        };
        Self {
            gate: Gate::new(
                tokens.clone(),
                policies.clone(),
                usage.clone(),
                crate::clock::Clock::system(),
            ),
            tokens,
            policies,
            usage,
            secrets,
            identities: IdentityStore::new(barrier.clone()),
            rotation: Broker::new(rotation_deps, &metrics, BrokerOptions::default()),
            shutdown: tokio::sync::watch::channel(false).0,
            barrier,
            audit,
            metrics,
            seal_lock: tokio::sync::Mutex::new(()),
            login: Login::new(JwksCache::files_only(), ThrottleConfig::default()),
        }
    }

    pub fn status(&self) -> SealStatus {
        self.barrier.status()
    }

    pub fn is_sealed(&self) -> bool {
        self.barrier.status().sealed
    }

    /// Initialises the vault, writes the root token, and seals again.
    pub async fn init(&self, shares: u8, threshold: u8) -> Result<InitOutput, CoreError> {
        let _guard = self.seal_lock.lock().await;
        let shares = self.barrier.init(shares, threshold)?;
        let root = self
            .gate
            .on_unseal()
            .and_then(|()| self.gate.create_root_token(now_ms()));
        let durable = self.barrier.durable().await;
        self.gate.on_seal();
        self.barrier.seal();
        let root_token = root?;
        durable?;
        Ok(InitOutput { shares, root_token })
    }

    /// Gives one unseal share; at the threshold the vault opens.
    pub async fn unseal(&self, share: &str) -> Result<SealStatus, CoreError> {
        let _guard = self.seal_lock.lock().await;
        let status = self.barrier.unseal(share)?;
        if !status.sealed {
            self.after_unseal()?;
        }
        Ok(status)
    }

    pub async fn reset_unseal(&self) -> SealStatus {
        let _guard = self.seal_lock.lock().await;
        self.barrier.reset_unseal();
        self.barrier.status()
    }

    fn after_unseal(&self) -> Result<(), CoreError> {
        let loaded = self
            .gate
            .on_unseal()
            .map_err(CoreError::from)
            .and_then(|()| Ok(self.usage.load()?))
            .and_then(|()| Ok(self.barrier.derive_key("audit/hmac")?))
            .map(|key| self.audit.set_hmac_key(Some(key)));
        if loaded.is_err() {
            self.gate.on_seal();
            self.barrier.seal();
        } else {
            self.rotation.on_unseal();
        }
        self.metrics.set_sealed(self.barrier.status().sealed);
        loaded
    }

    /// Tells long-running tasks and streams that the server is stopping.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
        self.rotation.on_seal();
    }

    /// A receiver that turns `true` when shutdown begins (await it with
    /// [`until_stopped`]).
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub async fn seal(&self) {
        let _guard = self.seal_lock.lock().await;
        self.persist_usage().await;
        self.gate.on_seal();
        self.audit.set_hmac_key(None);
        self.barrier.seal();
        self.metrics.set_sealed(true);
        self.rotation.on_seal();
    }

    pub async fn rotate_key(&self) -> Result<u32, CoreError> {
        let _guard = self.seal_lock.lock().await;
        let term = self.barrier.rotate_key()?;
        self.barrier.durable().await?;
        Ok(term)
    }

    /// Writes the usage table (changed identities only) and waits for disk.
    /// A failure is logged: usage is advisory and must not block a seal.
    pub async fn persist_usage(&self) {
        if self.is_sealed() {
            return;
        }
        let written = match self.usage.persist() {
            Ok(n) => self.barrier.durable().await.map(|()| n),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not persist token usage");
        }
    }

    /// Refreshes the gauges that are read, not counted.
    pub fn refresh_gauges(&self) {
        let status = self.barrier.status();
        self.metrics.set_sealed(status.sealed);
        self.metrics
            .set_barrier_encryptions(status.key_term, status.term_encryptions);
        self.refresh_governance_gauges();
    }

    /// Trusts `ca` (PEM) for fetching OIDC issuers' key sets over HTTPS.
    pub fn set_oidc_ca(
        &mut self,
        ca: Option<&std::path::Path>,
    ) -> Result<(), crate::oidc::OidcError> {
        self.login = Login::new(JwksCache::new(ca)?, ThrottleConfig::default());
        Ok(())
    }
}

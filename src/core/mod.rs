//! Core: the parts of one vault wired together, and the request life cycle
//! (authenticate -> authorize -> act -> audit) that `api` drives.
//!
//! Owns no storage prefix of its own; it calls the domain modules. It knows
//! nothing of protobuf or gRPC status codes.

pub mod auth;
pub mod call;
pub mod offload;
mod reads;
mod report;
pub mod usage;

use std::sync::Arc;

use crate::audit::{AuditError, AuditLog};
use crate::barrier::{Barrier, BarrierError, SealStatus, UnsealShare};
use crate::clock::{Clock, Shutdown};
use crate::identity::login::{Login, ThrottleConfig};
use crate::identity::IdentityStore;
use crate::lifecycle::{Lifecycle, LifecycleDeps, ReadSet};
use crate::metrics::Metrics;
use crate::oidc::JwksCache;
use crate::pki::trust::ClientTrust;
use crate::pki::PkiStore;
use crate::policy_store::PolicyStore;
use crate::rotation::{Broker, BrokerOptions, RotationDeps};
use crate::secrets::{DataLimits, SecretStore};
use crate::token::format::TokenSecret;
use crate::token::TokenStore;

pub use auth::{AuthError, Authorized, Caller, Gate};
pub use usage::{IdentityUsage, Usage};

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
    pub identities: Arc<IdentityStore>,
    /// Login checks and their brute-force state (in memory).
    pub login: Arc<Login>,
    /// The rotation broker (issue 4): policies, runs, the scheduler's state.
    pub rotation: Arc<Broker>,
    /// Leases of dynamic credentials (issue 12), and their sleeper.
    pub leases: crate::lease::LeaseStore,
    /// Dynamic roles and the issue of credentials under a lease.
    pub dynamic: crate::dynamic::DynamicStore,
    /// The PKI (issue 12): CA, roles, inventory, and the run-time trust
    /// store of client certificates.
    pub pki: Arc<PkiStore>,
    /// `oidc.jwks_dir` (see [`Core::set_oidc`]).
    oidc_jwks_dir: Option<std::path::PathBuf>,
    /// The one clock every part of this vault reads.
    clock: Clock,
    /// The server's shutdown, for long streams (`Watch`) and workers.
    shutdown: Shutdown,
    /// Per identity, the secret paths it read (issue 13; see `lifecycle::reads`).
    pub reads: ReadSet,
    /// Decommission, attestation, suggestions (issue 13).
    pub lifecycle: Lifecycle,
    /// Delegation rules and the OIDC issuer (`federation/`).
    pub federation: Arc<crate::federation::Federation>,
    /// Anomaly detection (issue 13): the seam's queue, the events, the stream.
    pub anomalies: crate::anomaly::Anomalies,
    /// The turns of listings and reports on the blocking pool
    /// ([`Call::off_thread`](call::Call::off_thread)).
    pub offload: offload::Offloads,
}

impl Core {
    /// Wires the parts together. `clock` is the time every part reads;
    /// `shutdown` is the server's signal (see `server`).
    pub fn new(
        barrier: Arc<Barrier>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
        limits: DataLimits,
        clock: Clock,
        shutdown: Shutdown,
    ) -> Self {
        let policies = PolicyStore::new(barrier.clone());
        let tokens = TokenStore::new(barrier.clone(), Arc::new(policies.clone()), clock.clone());
        let usage = Usage::new(barrier.clone());
        let secrets = Arc::new(SecretStore::new(barrier.clone(), limits));
        let audit = Arc::new(audit);
        let identities = Arc::new(IdentityStore::new(barrier.clone()));
        let barrier_for_pki = barrier.clone();
        let federation = Arc::new(crate::federation::Federation::new(
            barrier.clone(),
            clock.clone(),
            &metrics,
        ));
        let rotation_deps = RotationDeps {
            secrets: secrets.clone(),
            audit: audit.clone(),
            barrier: barrier.clone(),
            clock: clock.clone(),
            reads: Arc::new(reads::SetterReads::new(
                policies.clone(),
                identities.clone(),
                tokens.clone(),
                clock.clone(),
            )),
        };
        let leases = crate::lease::LeaseStore::new(barrier.clone(), clock.clone());
        // A lease ends with its token: every revoke tells the lease store.
        tokens.set_revoke_listener(Arc::new(leases.clone()));
        crate::lease::LeaseGauges::register(&metrics, leases.clone());
        let dynamic = crate::dynamic::DynamicStore::new(
            barrier.clone(),
            secrets.clone(),
            leases.clone(),
            clock.clone(),
        );
        let rotation = Arc::new(Broker::new(
            rotation_deps,
            &metrics,
            BrokerOptions::default(),
        ));
        // Dynamic roles on a plugin find it among the broker's providers.
        let plugins: std::sync::Weak<dyn crate::dynamic::Plugins> =
            Arc::downgrade(&rotation) as std::sync::Weak<Broker>;
        dynamic.set_plugins(plugins);
        let reads = ReadSet::new(barrier.clone());
        let anomalies = crate::anomaly::Anomalies::new(&metrics);
        let pki = Arc::new(PkiStore::new(barrier_for_pki, Arc::new(ClientTrust::new())));
        let lifecycle = Lifecycle::new(LifecycleDeps {
            barrier: barrier.clone(),
            audit: audit.clone(),
            clock: clock.clone(),
            identities: identities.clone(),
            tokens: Arc::new(tokens.clone()),
            policies: policies.clone(),
            secrets: secrets.clone(),
            broker: Broker::clone(&rotation),
            reads: reads.clone(),
            // A decommission revokes the identity's leases and certificates.
            revokers: vec![
                Arc::new(leases.clone()),
                Arc::new(crate::pki::revoker::IdentityCerts::new(
                    pki.clone(),
                    clock.clone(),
                )),
            ],
        });
        let login = Arc::new(login_for(&barrier, JwksCache::files_only()));
        Self {
            leases,
            dynamic,
            gate: Gate::new(
                tokens.clone(),
                policies.clone(),
                usage.clone(),
                clock.clone(),
            ),
            tokens,
            policies,
            usage,
            secrets,
            identities,
            rotation,
            barrier,
            audit,
            metrics,
            seal_lock: tokio::sync::Mutex::new(()),
            login,
            pki,
            oidc_jwks_dir: None,
            federation,
            clock,
            shutdown,
            reads,
            lifecycle,
            anomalies,
            offload: offload::Offloads::new(),
        }
    }

    /// The clock every part of this vault reads.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The server's shutdown signal: long streams select on
    /// [`Shutdown::wait`] and end when it fires.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.shutdown.clone()
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
            .and_then(|()| self.gate.create_root_token(self.clock.now_ms()));
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

    /// An operator's unseal call: `Some(share)` gives a share, `None`
    /// resets the progress. Only while the vault is sealed, decided under
    /// the seal lock, so no seal can come between the check and the act:
    /// then `before` runs first (the call's request record; its error
    /// stops the call, which acts on nothing). On an unsealed vault nothing
    /// changes and `before` does not run.
    pub async fn unseal_if_sealed<E>(
        &self,
        share: Option<&str>,
        before: impl FnOnce() -> Result<(), E>,
    ) -> Result<Result<SealStatus, CoreError>, E> {
        let _guard = self.seal_lock.lock().await;
        if !self.is_sealed() {
            return Ok(Ok(self.status()));
        }
        before()?;
        Ok(match share {
            Some(share) => self
                .barrier
                .unseal(share)
                .map_err(CoreError::from)
                .and_then(|status| {
                    if !status.sealed {
                        self.after_unseal()?;
                    }
                    Ok(status)
                }),
            None => {
                self.barrier.reset_unseal();
                Ok(self.barrier.status())
            }
        })
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
            self.pki.on_seal();
            self.secrets.on_seal();
        } else {
            self.rotation.on_unseal();
            // The PKI's CA joins the client-certificate trust store.
            if let Err(e) = self.pki.refresh_trust(self.clock.now_ms()) {
                tracing::error!(error = %e, "PKI trust store not loaded at unseal");
            }
            // The federation figures (advisory: an unseal does not fail on them).
            if let Err(e) = self.federation.figures.load() {
                tracing::warn!(error = %e, "federation figures not loaded at unseal");
            }
        }
        self.metrics.set_sealed(self.barrier.status().sealed);
        loaded
    }

    pub async fn seal(&self) {
        let _guard = self.seal_lock.lock().await;
        self.persist_usage().await;
        self.gate.on_seal();
        self.federation.issuer.on_seal();
        self.audit.set_hmac_key(None);
        self.barrier.seal();
        // After the barrier: the PKI keeps nothing it parses meanwhile.
        self.pki.on_seal();
        self.metrics.set_sealed(true);
        self.rotation.on_seal();
        // Pooled admin connections logged in with secrets: closed at seal.
        self.dynamic.on_seal();
        // Last, off the runtime: emptying the scan index waits for a Match
        // reading it (whose reads now fail on the sealed barrier).
        let secrets = self.secrets.clone();
        if tokio::task::spawn_blocking(move || secrets.on_seal())
            .await
            .is_err()
        {
            tracing::error!("the discovery scan's index was not emptied at seal");
        }
    }

    pub async fn rotate_key(&self) -> Result<u32, CoreError> {
        let _guard = self.seal_lock.lock().await;
        let term = self.barrier.rotate_key()?;
        self.barrier.durable().await?;
        Ok(term)
    }

    /// Writes the usage table (changed identities only) and waits for disk.
    pub async fn persist_usage(&self) {
        self.usage.flush().await;
        self.reads.flush().await;
        self.federation.figures.flush().await;
    }

    /// How OIDC key sets are loaded: the CA trusted for HTTPS, the folder
    /// key set files must be under, whether private hosts are fetched from.
    pub fn set_oidc(
        &mut self,
        oidc: &crate::config::OidcConfig,
    ) -> Result<(), crate::oidc::OidcError> {
        let jwks = JwksCache::new(oidc.ca_file.as_deref())?
            .with_jwks_dir(oidc.jwks_dir.as_deref())
            .danger_allow_private_hosts(oidc.allow_private_hosts);
        self.login = Arc::new(login_for(&self.barrier, jwks));
        self.oidc_jwks_dir = oidc.jwks_dir.clone();
        Ok(())
    }

    /// What the anomaly worker uses (see `anomaly::Anomalies::run`).
    pub fn anomaly_deps(&self) -> crate::anomaly::AnomalyDeps {
        crate::anomaly::AnomalyDeps {
            barrier: self.barrier.clone(),
            audit: self.audit.clone(),
            clock: self.clock.clone(),
            identities: self.identities.clone(),
            tokens: self.tokens.clone(),
            login: self.login.clone(),
        }
    }

    /// `oidc.jwks_dir`: the folder an issuer's `--jwks-file` must be under.
    pub fn oidc_jwks_dir(&self) -> Option<&std::path::Path> {
        self.oidc_jwks_dir.as_deref()
    }
}

/// The login methods; on a shared store (etcd) their throttle counts are
/// shared with the other nodes (`identity::shared_throttle`).
fn login_for(barrier: &Arc<Barrier>, jwks: JwksCache) -> Login {
    let login = Login::new(jwks, ThrottleConfig::default());
    if !barrier.is_shared_store() {
        return login;
    }
    login.with_shared(Arc::new(
        crate::identity::shared_throttle::SharedThrottle::new(
            barrier.clone(),
            ThrottleConfig::default(),
            crate::identity::shared_throttle::SharedThrottleConfig::default(),
        ),
    ))
}

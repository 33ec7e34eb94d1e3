//! The authentication and authorisation seam: every RPC but status and
//! unseal passes through `Gate::authenticate` and `Gate::authorize`.
//!
//! Owns no storage prefix: tokens live in `crate::token::TokenStore`
//! (`tokens/`), policies in `crate::policy_store::PolicyStore` (`policies/`),
//! usage in `super::usage::Usage` (`usage/`). This module wires them into
//! one decision per request and must not read or write storage itself.
//!
//! `authenticate` reads the token (two barrier reads; a counted use also
//! writes) and takes the compiled policy set of its policy list from the
//! cache; `authorize` is then one allocation-free `PolicySet::check` and an
//! in-memory usage note.

use std::net::IpAddr;
use std::sync::Arc;

use crate::barrier::BarrierError;
use crate::clock::Clock;
use crate::policy::Capability;
use crate::policy_store::{CompiledSet, PolicyStore, PolicyStoreError};
use crate::token::format::TokenSecret;
use crate::token::{TokenError, TokenRequest, TokenStore};

use super::usage::Usage;

/// The one proof of a policy check, minted by `policy` through
/// [`Gate::authorize`]; re-exported here, where requests get it.
pub use crate::policy::Authorized;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send 'authorization: Bearer <token>'")]
    MissingToken,
    #[error("the token is not valid")]
    BadToken,
    #[error("the token is not valid from this source address")]
    SourceNotAllowed,
    #[error("permission denied")]
    Denied,
    /// A `may_act` token, good for `token exchange` by the agent it names
    /// and for nothing else.
    #[error(
        "this token is exchange-only: only the identity it names may use it, with 'token exchange'"
    )]
    ExchangeOnly,
    #[error("stored token record is corrupt")]
    Corrupt,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

impl From<TokenError> for AuthError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Invalid | TokenError::NotFound => AuthError::BadToken,
            TokenError::SourceNotAllowed => AuthError::SourceNotAllowed,
            TokenError::Barrier(b) => AuthError::Barrier(b),
            _ => AuthError::Corrupt,
        }
    }
}

impl From<PolicyStoreError> for AuthError {
    fn from(e: PolicyStoreError) -> Self {
        match e {
            PolicyStoreError::Barrier(b) => AuthError::Barrier(b),
            _ => AuthError::Corrupt,
        }
    }
}

/// Who is calling, as established by `Gate::authenticate`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: String,
    pub accessor: String,
    pub policies: Vec<String>,
    /// 0 when the token never expires.
    pub expires_at_ms: u64,
    /// This call used up one of a limited token's uses: the count is written
    /// but must be made durable before acting (`Call::begin` does).
    pub counted_use: bool,
    /// This call spent the last use of a limited token, which revoked it:
    /// a check after a wait ([`Gate::recheck`]) finds the token gone, and
    /// checks what it hung from instead.
    pub last_use: Option<Arc<LastUse>>,
    /// The compiled policies of the token (for a delegated token, both the
    /// subject's and the actor's sides).
    pub set: Arc<CompiledSet>,
    /// A delegated token: who acts, for whom (`identity` is the subject).
    pub actor: Option<ActorChain>,
    /// The token's audit HMAC kept with its verified-token cache entry
    /// (`None` unless this call was a cache hit); only for this caller's own
    /// token.
    pub audit_mac: Option<Arc<crate::audit::TokenMac>>,
    /// This request's cache fence held (taken once, at its start): caches
    /// of stored records may answer it (`storage::coherence`). Always true
    /// on a store this process owns.
    pub fresh: bool,
}

/// What [`Gate::recheck`] reads of a token whose last use the call spent.
#[derive(Debug)]
pub struct LastUse {
    /// The token's parent (a delegated token's subject token); empty for a
    /// token without one.
    parent_accessor: String,
    /// A delegated token's actor-side policies.
    actor_policies: Vec<String>,
}

/// The actor chain of a delegated token (RFC 8693 `act`), for the audit
/// record of every request made with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorChain {
    pub actor_identity: String,
    pub actor_accessor: String,
    /// The subject's token (the delegated token's parent).
    pub subject_accessor: String,
}

impl ActorChain {
    fn of(record_actor: &str, actor_accessor: &str, parent: &str) -> Option<Self> {
        (!actor_accessor.is_empty()).then(|| ActorChain {
            actor_identity: record_actor.to_owned(),
            actor_accessor: actor_accessor.to_owned(),
            subject_accessor: parent.to_owned(),
        })
    }
}

impl Caller {
    /// Who the turns of long works are counted for (`core::offload`): the
    /// actor of a delegated token, so that an agent acting for several
    /// subjects is one caller and spends none of its subjects' turns; else
    /// the token's identity.
    pub fn turn_owner(&self) -> &str {
        self.actor
            .as_ref()
            .map_or(self.identity.as_str(), |a| a.actor_identity.as_str())
    }

    pub fn is_root(&self) -> bool {
        self.actor.is_none()
            && self
                .policies
                .iter()
                .any(|p| p == crate::policy::ROOT_POLICY)
    }
}

pub struct Gate {
    tokens: TokenStore,
    policies: PolicyStore,
    usage: Usage,
    clock: Clock,
}

impl Gate {
    pub fn new(tokens: TokenStore, policies: PolicyStore, usage: Usage, clock: Clock) -> Self {
        Self {
            tokens,
            policies,
            usage,
            clock,
        }
    }

    /// Loads the token hash key after an unseal (and moves a foundation root
    /// token into the token store).
    pub fn on_unseal(&self) -> Result<(), AuthError> {
        self.tokens.on_unseal(self.clock.now_ms())?;
        Ok(())
    }

    pub fn on_seal(&self) {
        self.tokens.on_seal();
    }

    /// Makes the root token: policy `root`, no expiry. Shown once by `init`.
    pub fn create_root_token(&self, now_ms: u64) -> Result<TokenSecret, AuthError> {
        let issued = self.tokens.issue(
            TokenRequest {
                identity: "root".into(),
                policies: vec![crate::policy::ROOT_POLICY.into()],
                ttl: std::time::Duration::ZERO,
                max_ttl: std::time::Duration::ZERO,
                hard_expiry_ms: None,
                uses: 0,
                cidrs: Vec::new(),
                parent_accessor: None,
                method: "root",
            },
            now_ms,
        )?;
        Ok(issued.token)
    }

    /// Finds the caller a token belongs to: known, not expired, allowed from
    /// `source`; a limited token's use is counted.
    pub fn authenticate(&self, token: &str, source: Option<IpAddr>) -> Result<Caller, AuthError> {
        // One cache fence for the whole request, taken at its start: the
        // token and policy caches answer only if it holds (on etcd, once the
        // store's watch has delivered every change acknowledged before now).
        self.authenticate_fenced(token, source, self.tokens.cache_fence())
    }

    /// [`Self::authenticate`] for a request whose cache fence was taken at
    /// its start (`Barrier::cache_fence_async` in the request seam).
    pub fn authenticate_fenced(
        &self,
        token: &str,
        source: Option<IpAddr>,
        fresh: bool,
    ) -> Result<Caller, AuthError> {
        let now = self.clock.now_ms();
        let used = self.tokens.use_token_fenced(token, source, now, fresh)?;
        // Here, where every call's token is authenticated, so that no
        // handler can forget it: an exchange-only token acts for nobody
        // (`token exchange` reads it as the subject token, not through here).
        if used.record.is_exchange_only() {
            return Err(AuthError::ExchangeOnly);
        }
        let set = self.set_of(
            &used.record.policies,
            &used.record.actor_policies,
            used.record.is_delegated(),
            fresh,
        )?;
        self.usage.record(&used.record.identity, None, now);
        Ok(Caller {
            actor: ActorChain::of(
                &used.record.actor_identity,
                &used.record.actor_accessor,
                &used.record.parent_accessor,
            ),
            identity: used.record.identity.clone(),
            accessor: used.record.accessor.clone(),
            policies: used.record.policies.clone(),
            expires_at_ms: used.record.expires_at_ms,
            counted_use: used.counted,
            last_use: used.last_use.then(|| {
                Arc::new(LastUse {
                    parent_accessor: used.record.parent_accessor.clone(),
                    actor_policies: used.record.actor_policies.clone(),
                })
            }),
            set,
            audit_mac: used.audit_mac,
            fresh,
        })
    }

    /// The compiled set of a token: for a delegated one, its own (the
    /// subject's side) and its actor's policies, both of which must allow.
    fn set_of(
        &self,
        policies: &[String],
        actor_policies: &[String],
        delegated: bool,
        fresh: bool,
    ) -> Result<Arc<CompiledSet>, AuthError> {
        Ok(if delegated {
            (self.policies).delegated_set_fenced(policies, actor_policies, fresh)?
        } else {
            self.policies.compiled_set_fenced(policies, fresh)?
        })
    }

    /// The caller as its token stands now: `BadToken` once the token was
    /// revoked (or its identity disabled, which revokes its tokens) or has
    /// expired; otherwise the caller with the token's current policies,
    /// compiled afresh. No use of a limited token is counted. For
    /// long-lived calls (`Watch`) that must not outlive their authority.
    pub fn refresh(&self, caller: &Caller) -> Result<Caller, AuthError> {
        let now = self.clock.now_ms();
        let info = self
            .tokens
            .lookup_accessor(&caller.accessor, now)?
            .ok_or(AuthError::BadToken)?;
        if !info.may_act.is_empty() {
            return Err(AuthError::ExchangeOnly);
        }
        let delegated = !info.actor_accessor.is_empty();
        let fresh = self.tokens.cache_fence();
        let set = self.set_of(&info.policies, &info.actor_policies, delegated, fresh)?;
        Ok(Caller {
            actor: ActorChain::of(
                &info.actor_identity,
                &info.actor_accessor,
                &info.parent_accessor,
            ),
            identity: info.identity,
            accessor: info.accessor,
            policies: info.policies,
            expires_at_ms: info.expires_at_ms,
            counted_use: false,
            last_use: None,
            set,
            audit_mac: None,
            fresh,
        })
    }

    /// [`Self::refresh`] for a call that checks its caller again after it
    /// waited for a turn (`Call::off_thread`). A call that spent the last
    /// use of its token, which revoked the token, is that token's one call:
    /// it is not refused for the token being gone. The tokens it hung from
    /// must still stand (its parent, a delegated token's subject token, and
    /// a delegated token's actor token), and its policies are compiled
    /// again as they stand now.
    pub fn recheck(&self, caller: &Caller) -> Result<Caller, AuthError> {
        let Some(last) = &caller.last_use else {
            return self.refresh(caller);
        };
        let now = self.clock.now_ms();
        let parent = Some(last.parent_accessor.as_str()).filter(|a| !a.is_empty());
        let actor = caller.actor.as_ref().map(|a| a.actor_accessor.as_str());
        for accessor in [parent, actor].into_iter().flatten() {
            self.tokens
                .lookup_accessor(accessor, now)?
                .ok_or(AuthError::BadToken)?;
        }
        let fresh = self.tokens.cache_fence();
        let set = self.set_of(
            &caller.policies,
            &last.actor_policies,
            caller.actor.is_some(),
            fresh,
        )?;
        Ok(Caller {
            set,
            fresh,
            ..caller.clone()
        })
    }

    /// Checks a capability on a resource against the caller's policies and
    /// hands back the proof a domain write requires. A refusal is the same
    /// whether or not the resource exists.
    pub fn authorize(
        &self,
        caller: &Caller,
        capability: Capability,
        resource: &str,
    ) -> Result<Authorized, AuthError> {
        match caller.set.authorize(resource, capability) {
            Some((proof, grant)) => {
                self.usage
                    .record(&caller.identity, Some(grant), self.clock.now_ms());
                Ok(proof)
            }
            None => Err(AuthError::Denied),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::barrier::{Barrier, BarrierOptions};
    use crate::policy::Policy;
    use crate::storage::SledBackend;

    fn gate() -> (tempfile::TempDir, Gate, TokenStore, PolicyStore, Usage) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path()).unwrap();
        let barrier = Arc::new(Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap());
        let shares = barrier.init(1, 1).unwrap();
        barrier.unseal(&shares[0].0).unwrap();
        let policies = PolicyStore::new(barrier.clone());
        let tokens = TokenStore::new(
            barrier.clone(),
            Arc::new(policies.clone()),
            crate::clock::Clock::system(),
        );
        let usage = Usage::new(barrier);
        let gate = Gate::new(
            tokens.clone(),
            policies.clone(),
            usage.clone(),
            Clock::system(),
        );
        gate.on_unseal().unwrap();
        (dir, gate, tokens, policies, usage)
    }

    #[test]
    fn the_turns_of_a_delegated_token_are_its_actors() {
        let (_d, gate, ..) = gate();
        let root = gate.create_root_token(Clock::system().now_ms()).unwrap();
        let caller = gate.authenticate(root.expose(), None).unwrap();
        assert_eq!(caller.turn_owner(), "root");
        let delegated = Caller {
            identity: "subject".to_owned(),
            actor: Some(ActorChain {
                actor_identity: "agent".to_owned(),
                actor_accessor: "acc-agent".to_owned(),
                subject_accessor: "acc-subject".to_owned(),
            }),
            ..caller
        };
        assert_eq!(delegated.turn_owner(), "agent");
    }

    #[test]
    fn root_token_may_do_anything() {
        let (_d, gate, ..) = gate();
        let root = gate.create_root_token(Clock::system().now_ms()).unwrap();
        let caller = gate.authenticate(root.expose(), None).unwrap();
        assert!(caller.is_root());
        assert_eq!(caller.identity, "root");
        let proof = gate
            .authorize(&caller, Capability::Destroy, "secret/a/b")
            .unwrap();
        assert!(proof.grants(Capability::Destroy, "secret/a/b"));
        gate.authorize(&caller, Capability::Admin, "sys/seal")
            .unwrap();
    }

    #[test]
    fn policies_decide_and_usage_records_the_rule() {
        let (_d, gate, tokens, policies, usage) = gate();
        let root = gate.create_root_token(Clock::system().now_ms()).unwrap();
        let root = gate.authenticate(root.expose(), None).unwrap();
        let proof = gate
            .authorize(&root, Capability::Write, "policy/app")
            .unwrap();
        policies
            .put(
                &proof,
                &Policy::parse(
                    "app",
                    "[[rule]]\npath = \"secret/app/db\"\ncapabilities = [\"read\"]\n",
                )
                .unwrap(),
            )
            .unwrap();
        let issued = tokens
            .issue(
                TokenRequest {
                    identity: "svc".into(),
                    policies: vec!["app".into()],
                    ttl: std::time::Duration::from_secs(60),
                    max_ttl: std::time::Duration::ZERO,
                    hard_expiry_ms: None,
                    uses: 0,
                    cidrs: vec![],
                    parent_accessor: None,
                    method: "token",
                },
                Clock::system().now_ms(),
            )
            .unwrap();
        let caller = gate.authenticate(issued.token.expose(), None).unwrap();
        gate.authorize(&caller, Capability::Read, "secret/app/db")
            .unwrap();
        for (cap, res) in [
            (Capability::Read, "secret/app/db-admin"),
            (Capability::Write, "secret/app/db"),
            (Capability::Read, "secret/app/db/x"),
        ] {
            assert!(matches!(
                gate.authorize(&caller, cap, res),
                Err(AuthError::Denied)
            ));
        }
        let snap = usage.snapshot();
        let svc: Vec<_> = snap.iter().filter(|u| u.identity != "root").collect();
        assert_eq!(svc.len(), 1);
        assert_eq!(svc[0].identity, "svc");
        assert_eq!(
            svc[0].exercised,
            vec![("app".to_owned(), "secret/app/db".to_owned())]
        );
        // Revocation is immediate.
        assert_eq!(tokens.revoke_identity("svc", 0).unwrap(), 1);
        assert!(matches!(
            gate.authenticate(issued.token.expose(), None),
            Err(AuthError::BadToken)
        ));
    }
}

//! The rules of a token exchange (RFC 8693), pure: what an agent (the
//! actor) may receive for a subject's exchange-only token.
//!
//! The delegated token's rights are the intersection of three policy sets:
//! the policies requested (a subset of the subject token's, as for any
//! child), checked with the actor token's policies, and both sides skip
//! rules written `delegated = false`; a deny on either side refuses. It
//! never holds `root` on the subject's side, so the actor's policies always
//! bind it. Its life ends by the earliest of: the requested TTL,
//! `delegation.max_ttl`, the subject token's expiry, the actor token's
//! expiry.

use std::time::Duration;

use crate::policy::ROOT_POLICY;
use crate::token::TokenInfo;

/// Why an exchange (or the minting of an exchange-only token) was refused.
/// Messages name the rule and never carry a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DelegationError {
    #[error("the subject token is not valid (unknown, expired or revoked)")]
    SubjectInvalid,
    #[error("the subject token is not exchange-only: its holder mints one with 'token issue --may-act IDENTITY'")]
    NotExchangeOnly,
    #[error("the subject token names another identity as its actor (may_act)")]
    NotNamedActor,
    #[error("a delegated token cannot be exchanged again, nor act as the actor of an exchange")]
    Chained,
    #[error("identity kind '{kind}' may not act for others (delegation.actor_kinds is {allowed})")]
    ActorKind { kind: String, allowed: String },
    #[error("the actor must be an identity of the inventory, enabled and not past its expiry")]
    ActorUnknown,
    #[error("a delegated token never carries root: name the policies to delegate with --policy")]
    Root,
    #[error("policy '{0}' is not held by the subject token")]
    NotSubset(String),
}

/// The actor (the caller of the exchange) as the exchange sees it.
#[derive(Debug, Clone)]
pub struct Actor<'a> {
    pub identity: &'a str,
    pub accessor: &'a str,
    /// The inventory kind; `None` when the identity is not in the inventory
    /// (the root lineage), disabled or past its expiry.
    pub kind: Option<&'a str>,
    /// The caller's own token is delegated.
    pub delegated: bool,
}

/// What to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangePlan {
    /// The subject: the delegated token acts for it.
    pub identity: String,
    /// The subject side's policies.
    pub policies: Vec<String>,
    pub ttl: Duration,
    /// The subject token's expiry (ms): the delegated token ends by it.
    pub hard_expiry_ms: u64,
    pub uses: u32,
    /// The subject's (exchange-only) token.
    pub parent_accessor: String,
    pub actor_accessor: String,
}

/// Refuses an actor whose kind is not in `actor_kinds`.
pub fn check_actor_kind(kind: Option<&str>, actor_kinds: &[String]) -> Result<(), DelegationError> {
    let Some(kind) = kind else {
        return Err(DelegationError::ActorUnknown);
    };
    if actor_kinds.iter().any(|k| k == kind) {
        Ok(())
    } else {
        Err(DelegationError::ActorKind {
            kind: kind.to_owned(),
            allowed: if actor_kinds.is_empty() {
                "empty".to_owned()
            } else {
                actor_kinds.join(", ")
            },
        })
    }
}

/// Decides an exchange. `subject` is the subject token as looked up (None:
/// unknown, expired or revoked); `requested` the policies asked for (empty:
/// the subject token's); `ttl` the life asked for (None: the ceiling).
pub fn plan(
    subject: Option<&TokenInfo>,
    actor: &Actor<'_>,
    requested: &[String],
    ttl: Option<Duration>,
    uses: u32,
    max_ttl: Duration,
    actor_kinds: &[String],
) -> Result<ExchangePlan, DelegationError> {
    if actor.delegated {
        return Err(DelegationError::Chained);
    }
    let subject = subject.ok_or(DelegationError::SubjectInvalid)?;
    if !subject.actor_accessor.is_empty() {
        return Err(DelegationError::Chained);
    }
    if subject.may_act.is_empty() {
        return Err(DelegationError::NotExchangeOnly);
    }
    if subject.may_act != actor.identity {
        return Err(DelegationError::NotNamedActor);
    }
    check_actor_kind(actor.kind, actor_kinds)?;
    let policies: Vec<String> = if requested.is_empty() {
        subject.policies.clone()
    } else {
        requested.to_vec()
    };
    if policies.iter().any(|p| p == ROOT_POLICY) {
        return Err(DelegationError::Root);
    }
    if !subject.policies.iter().any(|p| p == ROOT_POLICY) {
        if let Some(extra) = policies.iter().find(|p| !subject.policies.contains(p)) {
            return Err(DelegationError::NotSubset(extra.clone()));
        }
    }
    let ttl = ttl.map_or(max_ttl, |t| t.min(max_ttl));
    Ok(ExchangePlan {
        identity: subject.identity.clone(),
        policies,
        ttl,
        hard_expiry_ms: subject.expires_at_ms,
        uses,
        parent_accessor: subject.accessor.clone(),
        actor_accessor: actor.accessor.to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn subject(may_act: &str, policies: &[&str]) -> TokenInfo {
        TokenInfo {
            accessor: "kwa_subject".into(),
            identity: "alice".into(),
            policies: policies.iter().map(|p| p.to_string()).collect(),
            created_at_ms: 1,
            expires_at_ms: 10_000,
            max_expiry_ms: 20_000,
            uses_remaining: 0,
            cidrs: vec![],
            parent_accessor: "kwa_alice".into(),
            method: "token".into(),
            may_act: may_act.into(),
            actor_identity: String::new(),
            actor_accessor: String::new(),
            actor_policies: vec![],
        }
    }

    fn agent(kind: Option<&'static str>) -> Actor<'static> {
        Actor {
            identity: "agent-1",
            accessor: "kwa_agent",
            kind,
            delegated: false,
        }
    }

    fn kinds() -> Vec<String> {
        vec!["ai-agent".into(), "bot".into()]
    }

    const MAX: Duration = Duration::from_secs(900);

    #[test]
    fn plans_a_subset_for_the_named_agent() {
        let s = subject("agent-1", &["read-a", "read-b"]);
        let p = plan(
            Some(&s),
            &agent(Some("ai-agent")),
            &["read-a".into()],
            Some(Duration::from_secs(3600)),
            3,
            MAX,
            &kinds(),
        )
        .unwrap();
        assert_eq!(p.identity, "alice");
        assert_eq!(p.policies, vec!["read-a"]);
        assert_eq!(p.ttl, MAX, "the ceiling wins over a longer request");
        assert_eq!(p.hard_expiry_ms, 10_000);
        assert_eq!(p.parent_accessor, "kwa_subject");
        assert_eq!(p.actor_accessor, "kwa_agent");
        assert_eq!(p.uses, 3);
        let all = plan(Some(&s), &agent(Some("bot")), &[], None, 0, MAX, &kinds()).unwrap();
        assert_eq!(all.policies, vec!["read-a", "read-b"]);
    }

    #[test]
    fn refuses_each_broken_rule() {
        let s = subject("agent-1", &["read-a"]);
        let k = kinds();
        let err = |s: Option<&TokenInfo>, a: &Actor<'_>, req: &[String]| {
            plan(s, a, req, None, 0, MAX, &k).unwrap_err()
        };
        assert_eq!(
            err(None, &agent(Some("bot")), &[]),
            DelegationError::SubjectInvalid
        );
        assert_eq!(
            err(Some(&subject("", &["read-a"])), &agent(Some("bot")), &[]),
            DelegationError::NotExchangeOnly
        );
        assert_eq!(
            err(
                Some(&subject("agent-2", &["read-a"])),
                &agent(Some("bot")),
                &[]
            ),
            DelegationError::NotNamedActor
        );
        let e = err(Some(&s), &agent(Some("service-account")), &[]);
        assert!(e.to_string().contains("'service-account'"), "{e}");
        assert!(e.to_string().contains("ai-agent, bot"), "{e}");
        assert_eq!(
            err(Some(&s), &agent(None), &[]),
            DelegationError::ActorUnknown
        );
        let mut chained = agent(Some("bot"));
        chained.delegated = true;
        assert_eq!(err(Some(&s), &chained, &[]), DelegationError::Chained);
        let mut delegated_subject = s.clone();
        delegated_subject.actor_accessor = "kwa_x".into();
        assert_eq!(
            err(Some(&delegated_subject), &agent(Some("bot")), &[]),
            DelegationError::Chained
        );
        assert_eq!(
            err(Some(&s), &agent(Some("bot")), &["write-a".into()]),
            DelegationError::NotSubset("write-a".into())
        );
        // Root never travels: neither asked for nor inherited.
        assert_eq!(
            err(Some(&s), &agent(Some("bot")), &["root".into()]),
            DelegationError::Root
        );
        assert_eq!(
            err(
                Some(&subject("agent-1", &["root"])),
                &agent(Some("bot")),
                &[]
            ),
            DelegationError::Root
        );
        // A root subject may name any policy to delegate.
        let root_subject = subject("agent-1", &["root"]);
        let p = plan(
            Some(&root_subject),
            &agent(Some("bot")),
            &["anything".into()],
            None,
            0,
            MAX,
            &k,
        )
        .unwrap();
        assert_eq!(p.policies, vec!["anything"]);
    }

    #[test]
    fn an_empty_kind_list_refuses_every_actor() {
        let e = check_actor_kind(Some("ai-agent"), &[]).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
    }
}

//! Delegation (`Auth.ExchangeToken`, `IssueToken --may-act`) and keyward as
//! an OIDC issuer (`keyward.v1.Federation`).
//!
//! An exchange is called with the agent's own token (the actor); the
//! subject's exchange-only token travels in the request and is audited only
//! as an HMAC. No capability is needed for the exchange itself: the subject
//! named this agent when it minted the exchange-only token, and the
//! delegated token can do only what both may do.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::TOKEN_RESOURCE;
use super::secrets::timestamp;
use super::{begin, Access, Call, Failure};
use crate::core::Core;
use crate::federation::delegation::{self, Actor, DelegationError};
use crate::policy::{validate_name, ROOT_POLICY};
use crate::proto::v1::{ExchangeTokenRequest, TokenResponse};
use crate::token::{Delegation, TokenRequest};

/// The resource an exchange is audited under.
pub const EXCHANGE_RESOURCE: &str = "sys/token/exchange";

/// A refusal of bad input, with the rule it breaks.
#[derive(Debug, thiserror::Error)]
enum ExchangeInputError {
    #[error("give the subject's exchange-only token (--subject-token)")]
    NoSubject,
    #[error("a policy name is not valid: names are [a-z0-9][a-z0-9_-]{{0,63}}")]
    PolicyName,
    #[error("the TTL is longer than 100 years")]
    TooLong,
    #[error("--may-act names no identity of the inventory")]
    UnknownActor,
}

impl From<ExchangeInputError> for Failure {
    fn from(e: ExchangeInputError) -> Self {
        Failure::invalid(e.to_string())
    }
}

/// The delegation part of `IssueToken`: with `may_act` set, the token is
/// exchange-only and names an identity that exists and whose kind may act.
pub(crate) fn may_act(
    core: &Arc<Core>,
    call: &mut Call,
    may_act: &str,
) -> Result<Delegation, Failure> {
    if may_act.is_empty() {
        return Ok(Delegation::default());
    }
    let record = call.check(core.identities.get(may_act))?;
    let Some(record) = record else {
        return Err(call.fail(ExchangeInputError::UnknownActor));
    };
    let kinds = core.federation.config().actor_kinds;
    let kind = (!record.disabled).then_some(record.kind.as_str());
    call.check(delegation::check_actor_kind(kind, &kinds))?;
    Ok(Delegation {
        may_act: Some(record.name),
        actor_accessor: None,
    })
}

pub(crate) async fn exchange(
    core: &Arc<Core>,
    req: Request<ExchangeTokenRequest>,
) -> Result<Response<TokenResponse>, Status> {
    let mut call = begin(core, "keyward.v1.Auth/ExchangeToken", Access::Token, &req).await?;
    let caller = call.require_caller()?;
    call.set_resource(EXCHANGE_RESOURCE);
    let r = req.into_inner();
    if r.subject_token.is_empty() {
        return Err(call.fail(ExchangeInputError::NoSubject).into());
    }
    for name in &r.policies {
        if name != ROOT_POLICY && validate_name(name).is_err() {
            return Err(call.fail(ExchangeInputError::PolicyName).into());
        }
    }
    if r.ttl_seconds > crate::duration::MAX_SECONDS {
        return Err(call.fail(ExchangeInputError::TooLong).into());
    }
    let ttl = (r.ttl_seconds != 0).then(|| Duration::from_secs(r.ttl_seconds));
    let now = core.clock().now_ms();
    let subject = call.check(core.tokens.lookup_token(&r.subject_token, now))?;
    let actor_record = call.check(core.identities.get(&caller.identity))?;
    let kind = actor_record
        .as_ref()
        .filter(|a| !a.disabled)
        .map(|a| a.kind.as_str());
    let config = core.federation.config();
    let plan = call.check(delegation::plan(
        subject.as_ref(),
        &Actor {
            identity: &caller.identity,
            accessor: &caller.accessor,
            kind,
            delegated: caller.actor.is_some(),
        },
        &r.policies,
        ttl,
        r.uses,
        config.delegation_max_ttl,
        &config.actor_kinds,
    ))?;
    let issued = core.tokens.issue_with(
        TokenRequest {
            identity: plan.identity,
            policies: plan.policies,
            ttl: plan.ttl,
            max_ttl: plan.ttl,
            hard_expiry_ms: (plan.hard_expiry_ms != 0).then_some(plan.hard_expiry_ms),
            uses: plan.uses,
            cidrs: Vec::new(),
            parent_accessor: Some(plan.parent_accessor),
            method: "exchange",
        },
        Delegation {
            may_act: None,
            actor_accessor: Some(plan.actor_accessor),
        },
        now,
    );
    let issued = match issued {
        Ok(issued) => issued,
        // The subject token went away between the look-up and the issue.
        Err(crate::token::TokenError::ParentInvalid) => {
            return Err(call.fail(DelegationError::SubjectInvalid).into())
        }
        Err(e) => return Err(call.fail(e).into()),
    };
    call.check(core.barrier.durable().await)?;
    call.set_resource(format!("{TOKEN_RESOURCE}/{}", issued.accessor));
    call.ok_async(&[("subject_token", r.subject_token.as_bytes())])
        .await?;
    Ok(Response::new(TokenResponse {
        token: issued.token.expose().to_owned(),
        accessor: issued.accessor,
        expires_at: timestamp(issued.expires_at_ms),
        policies: issued.policies,
        identity: issued.identity,
    }))
}

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
    let active = record.is_active(core.clock().now_ms());
    let kind = active.then_some(record.kind.as_str());
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
        .filter(|a| a.is_active(now))
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
    let issued = core
        .tokens
        .issue_on_runtime(
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
        )
        .await;
    let issued = match issued {
        Ok(issued) => issued,
        // The subject token went away between the look-up and the issue.
        Err(crate::token::TokenError::ParentInvalid) => {
            return Err(call.fail(DelegationError::SubjectInvalid).into())
        }
        Err(e) => return Err(call.fail(e).into()),
    };
    call.check(core.barrier.durable().await)?;
    core.federation
        .count_exchange(&caller.identity, &issued.identity);
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

// --- keyward as an OIDC issuer (`keyward.v1.Federation`) ---

use crate::federation::issuer::{self, IdentityFacts, IssuerError, RoleRecord, TokenClaims};
use crate::policy::Capability;
use crate::proto::v1::federation_server::Federation;
use crate::proto::v1::{
    DiscoveryRequest, DiscoveryResponse, GetOidcRoleRequest, IdentityTokenRequest,
    IdentityTokenResponse, OidcRole, RotateOidcKeyRequest, RotateOidcKeyResponse,
};

/// Roles and keys: `admin` on `sys/oidc/role/<name>` and `sys/oidc/keys`.
pub const OIDC_RESOURCE: &str = "sys/oidc";

pub struct FederationService {
    core: Arc<Core>,
}

impl FederationService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

fn role_wire(r: RoleRecord) -> OidcRole {
    OidcRole {
        name: r.name,
        audiences: r.audiences,
        max_ttl_seconds: r.max_ttl_secs,
        claims: r.claims.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn put_oidc_role(&self, req: Request<OidcRole>) -> Result<Response<OidcRole>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Federation/PutOidcRole",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let role = RoleRecord {
            name: r.name,
            audiences: r.audiences,
            max_ttl_secs: r.max_ttl_seconds,
            claims: r.claims.into_iter().collect(),
        };
        call.check(role.validate())?;
        call.authorize(
            Capability::Admin,
            format!("{OIDC_RESOURCE}/role/{}", role.name),
        )?;
        call.check(self.core.federation.issuer.put_role(&role))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(role_wire(role)))
    }

    async fn get_oidc_role(
        &self,
        req: Request<GetOidcRoleRequest>,
    ) -> Result<Response<OidcRole>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Federation/GetOidcRole",
            Access::Token,
            &req,
        )
        .await?;
        let name = req.into_inner().name;
        if validate_name(&name).is_err() {
            return Err(call
                .fail(IssuerError::BadRole(
                    "the name must match [a-z0-9][a-z0-9_-]{0,63}".into(),
                ))
                .into());
        }
        call.authorize(Capability::Read, format!("{OIDC_RESOURCE}/role/{name}"))?;
        let role = call.check(self.core.federation.issuer.role(&name))?;
        let Some(role) = role else {
            return Err(call.fail(IssuerError::NoRole).into());
        };
        call.ok(&[])?;
        Ok(Response::new(role_wire(role)))
    }

    async fn identity_token(
        &self,
        req: Request<IdentityTokenRequest>,
    ) -> Result<Response<IdentityTokenResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Federation/IdentityToken",
            Access::Token,
            &req,
        )
        .await?;
        let caller = call.require_caller()?;
        let r = req.into_inner();
        if validate_name(&r.role).is_err() {
            return Err(call
                .fail(IssuerError::BadRole(
                    "the name must match [a-z0-9][a-z0-9_-]{0,63}".into(),
                ))
                .into());
        }
        if r.ttl_seconds > crate::duration::MAX_SECONDS {
            return Err(call.fail(ExchangeInputError::TooLong).into());
        }
        call.authorize(Capability::Issue, format!("{OIDC_RESOURCE}/{}", r.role))?;
        // A delegated token acts for its subject, and a JWT could not carry
        // the actor chain to the relying party: refused.
        if caller.actor.is_some() {
            return Err(call.fail(DelegationError::Chained).into());
        }
        let role = call.check(self.core.federation.issuer.role(&r.role))?;
        let Some(role) = role else {
            return Err(call.fail(IssuerError::NoRole).into());
        };
        let audience = (!r.audience.is_empty()).then_some(r.audience.as_str());
        let ttl = (r.ttl_seconds != 0).then_some(r.ttl_seconds);
        let (audience, ttl) = call.check(issuer::choose(&role, audience, ttl))?;
        let config = self.core.federation.config();
        let (Some(iss), Some(trust_domain)) = (config.issuer, config.trust_domain) else {
            return Err(call.fail(IssuerError::NotConfigured).into());
        };
        let now = self.core.clock().now_ms();
        let identity = call.check(self.core.identities.get(&caller.identity))?;
        let Some(identity) = identity.filter(|i| i.is_active(now)) else {
            return Err(call.fail(IssuerError::NotAnIdentity).into());
        };
        let exp = issuer::token_exp(now, ttl, caller.expires_at_ms, identity.expires_at_ms);
        let Some(exp) = exp else {
            return Err(call.fail(IssuerError::CallerExpiring).into());
        };
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let token = call.check(self.core.federation.issuer.sign(
            &config.algorithm,
            &TokenClaims {
                issuer: &iss,
                trust_domain: &trust_domain,
                who: IdentityFacts {
                    name: &identity.name,
                    kind: &identity.kind,
                    owner: &identity.owner,
                    metadata: &identity.metadata,
                },
                audience: &audience,
                role: &role,
                now_ms: now,
                exp_ms: exp,
                jti: &jti,
            },
        ))?;
        call.check(self.core.barrier.durable().await)?;
        // The audit record names the jti (never the token).
        call.set_resource(format!("{OIDC_RESOURCE}/{}/jti/{jti}", role.name));
        call.ok_async(&[]).await?;
        self.core.federation.count_issued(&role.name, &audience);
        Ok(Response::new(IdentityTokenResponse {
            token: token.to_string(),
            expires_at: timestamp(exp),
            jti,
        }))
    }

    async fn rotate_oidc_key(
        &self,
        req: Request<RotateOidcKeyRequest>,
    ) -> Result<Response<RotateOidcKeyResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Federation/RotateOidcKey",
            Access::Token,
            &req,
        )
        .await?;
        call.authorize(Capability::Admin, format!("{OIDC_RESOURCE}/keys"))?;
        let config = self.core.federation.config();
        let now = self.core.clock().now_ms();
        let kid = call.check(self.core.federation.issuer.rotate(&config.algorithm, now))?;
        call.check(self.core.barrier.durable().await)?;
        let keys = call.check(self.core.federation.issuer.keys())?;
        let jwks: serde_json::Value =
            serde_json::from_str(&issuer::jwks_json(&keys, now)).unwrap_or_default();
        let published = jwks["keys"]
            .as_array()
            .map(|ks| {
                ks.iter()
                    .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        call.ok(&[])?;
        Ok(Response::new(RotateOidcKeyResponse { kid, published }))
    }

    async fn discovery(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Federation/Discovery",
            Access::Open,
            &req,
        )
        .await?;
        if self.core.is_sealed() {
            return Err(call.fail(crate::barrier::BarrierError::Sealed).into());
        }
        call.set_resource(OIDC_RESOURCE);
        let (doc, jwks) = call.check(self.core.federation.discovery())?;
        call.ok(&[])?;
        Ok(Response::new(DiscoveryResponse {
            openid_configuration: doc,
            jwks,
        }))
    }
}

//! `keyward.v1.Auth`: login (in `api/login.rs`) and the caller's
//! tokens: issue a child, look up, renew, revoke.
//!
//! Resources (INTERFACE.md roots): issuing a child needs `issue` on
//! `sys/token`; acting on another token by accessor needs `read` (lookup),
//! `write` (renew) or `delete` (revoke) on `sys/token/<accessor>`, checked
//! before the accessor is looked up, so a refusal says nothing about it. A
//! token may always look up, renew and revoke itself and its descendants, and
//! anyone holding a token's text may look it up or revoke it (they could use
//! it for that anyway).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::secrets::timestamp;
use super::{begin, Access, Call, Failure};
use crate::cidr::Cidr;
use crate::core::{Caller, Core};
use crate::policy::{validate_name, Capability, ROOT_POLICY};
use crate::proto::v1::auth_server::Auth;
use crate::proto::v1::*;
use crate::token::{TokenError, TokenRequest};

/// TTL of an issued token when none is asked for.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Max TTL of an issued token when none is asked for (raised to the TTL if
/// that is longer).
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The resource of issuing tokens.
pub const TOKEN_RESOURCE: &str = "sys/token";

pub struct AuthService {
    core: Arc<Core>,
}

impl AuthService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// A refusal of bad input, with the rule it breaks.
#[derive(Debug, thiserror::Error)]
enum AuthInputError {
    #[error("a policy name is not valid: names are [a-z0-9][a-z0-9_-]{{0,63}}")]
    PolicyName,
    #[error("{0}")]
    Cidr(#[from] crate::cidr::BadCidr),
    // The input is never echoed: a token pasted in the wrong field would
    // reach the error message and the audit log.
    #[error("the accessor is not valid: kwa_ + 24 characters (a token goes in the token field)")]
    Accessor,
    #[error("give a token or an accessor, not both")]
    Both,
    #[error("{0} is longer than 100 years")]
    TooLong(&'static str),
}

impl From<AuthInputError> for Failure {
    fn from(e: AuthInputError) -> Self {
        Failure::invalid(e.to_string())
    }
}

fn seconds(value: u64, what: &'static str) -> Result<Option<Duration>, AuthInputError> {
    match value {
        0 => Ok(None),
        s if s > crate::duration::MAX_SECONDS => Err(AuthInputError::TooLong(what)),
        s => Ok(Some(Duration::from_secs(s))),
    }
}

fn accessor(text: &str) -> Result<String, AuthInputError> {
    if crate::token::format::looks_like_accessor(text) {
        Ok(text.to_owned())
    } else {
        Err(AuthInputError::Accessor)
    }
}

fn token_info(i: crate::token::TokenInfo) -> TokenInfo {
    TokenInfo {
        accessor: i.accessor,
        identity: i.identity,
        policies: i.policies,
        created_at: timestamp(i.created_at_ms),
        expires_at: timestamp(i.expires_at_ms),
        max_expires_at: timestamp(i.max_expiry_ms),
        uses_left: i.uses_remaining,
        cidrs: i.cidrs,
        parent_accessor: i.parent_accessor,
        method: i.method,
        may_act: i.may_act,
        actor_identity: i.actor_identity,
        actor_accessor: i.actor_accessor,
    }
}

/// Which token a lookup or revoke is about.
pub(crate) enum Target {
    Own,
    /// Found by its text: the caller holds it.
    Held(String),
    /// By accessor: needs a capability unless it is the caller's descendant.
    Named(String),
}

impl AuthService {
    pub(crate) fn target(call: &mut Call, token: &str, acc: &str) -> Result<Target, Failure> {
        match (token.is_empty(), acc.is_empty()) {
            (true, true) => Ok(Target::Own),
            (false, false) => Err(call.fail(AuthInputError::Both)),
            (false, true) => Ok(Target::Held(token.to_owned())),
            (true, false) => Ok(Target::Named(call.check(accessor(acc))?)),
        }
    }

    /// Resolves the target to an accessor, checking `capability` where the
    /// caller is neither the token nor its ancestor.
    pub(crate) fn resolve(
        &self,
        call: &mut Call,
        caller: &Caller,
        target: Target,
        capability: Capability,
    ) -> Result<String, Failure> {
        let acc = match target {
            Target::Own => caller.accessor.clone(),
            Target::Held(text) => {
                let found = call.check(self.core.tokens.accessor_for(&text))?;
                match found {
                    Some(acc) => acc,
                    None => {
                        call.set_resource(TOKEN_RESOURCE);
                        return Err(call.fail(TokenError::NotFound));
                    }
                }
            }
            Target::Named(acc) => {
                let own = acc == caller.accessor
                    || call.check(self.core.tokens.is_descendant(&acc, &caller.accessor))?;
                if !own {
                    call.authorize(capability, format!("{TOKEN_RESOURCE}/{acc}"))?;
                }
                acc
            }
        };
        call.set_resource(format!("{TOKEN_RESOURCE}/{acc}"));
        Ok(acc)
    }
}

/// Checks the input of a child token (policy names, TTLs, CIDRs) and the
/// caller's `issue` on `sys/token`, and makes the request with the
/// defaults. Shared by gRPC's IssueToken and HTTP's `auth/token/create`.
pub(crate) fn child_request(
    call: &mut Call,
    policies: Vec<String>,
    ttl_seconds: u64,
    max_ttl_seconds: u64,
    uses: u32,
    cidr_texts: &[String],
) -> Result<TokenRequest, Failure> {
    let caller = call.require_caller()?;
    for name in &policies {
        if name != ROOT_POLICY && validate_name(name).is_err() {
            return Err(call.fail(AuthInputError::PolicyName));
        }
    }
    let ttl = call.check(seconds(ttl_seconds, "the TTL"))?;
    let max_ttl = call.check(seconds(max_ttl_seconds, "the max TTL"))?;
    let cidrs = cidr_texts
        .iter()
        .map(|c| c.parse::<Cidr>().map_err(AuthInputError::from))
        .collect::<Result<Vec<_>, _>>();
    let cidrs = call.check(cidrs)?;
    call.authorize(Capability::Issue, TOKEN_RESOURCE.to_owned())?;
    let ttl = ttl.unwrap_or(DEFAULT_TTL);
    let max_ttl = max_ttl.unwrap_or_else(|| DEFAULT_MAX_TTL.max(ttl));
    Ok(TokenRequest {
        identity: caller.identity.clone(),
        policies,
        ttl,
        max_ttl,
        hard_expiry_ms: None,
        uses,
        cidrs,
        parent_accessor: Some(caller.accessor.clone()),
        method: "token",
    })
}

#[tonic::async_trait]
impl Auth for AuthService {
    /// Role-id + secret-id, certificate or OIDC login (`api/login.rs`).
    async fn login(&self, req: Request<LoginRequest>) -> Result<Response<TokenResponse>, Status> {
        super::login::login(&self.core, req).await
    }

    async fn issue_token(
        &self,
        req: Request<IssueTokenRequest>,
    ) -> Result<Response<TokenResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Auth/IssueToken",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let request = child_request(
            &mut call,
            r.policies,
            r.ttl_seconds,
            r.max_ttl_seconds,
            r.uses,
            &r.cidrs,
        )?;
        // `--may-act`: an exchange-only token naming the agent (issue 17).
        let delegation = super::federation::may_act(&self.core, &mut call, &r.may_act)?;
        let issued = call.check(self.core.tokens.issue_on_runtime(request, delegation).await)?;
        call.check(self.core.barrier.durable().await)?;
        call.set_resource(format!("{TOKEN_RESOURCE}/{}", issued.accessor));
        call.ok_async(&[]).await?;
        Ok(Response::new(TokenResponse {
            token: issued.token.expose().to_owned(),
            accessor: issued.accessor,
            expires_at: timestamp(issued.expires_at_ms),
            policies: issued.policies,
            identity: issued.identity,
        }))
    }

    async fn lookup_token(
        &self,
        req: Request<LookupTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Auth/LookupToken",
            Access::Token,
            &req,
        )
        .await?;
        let caller = call.require_caller()?;
        let r = req.get_ref();
        let target = Self::target(&mut call, &r.token, &r.accessor)?;
        let acc = self.resolve(&mut call, &caller, target, Capability::Read)?;
        let info = call.check(
            self.core
                .tokens
                .lookup_accessor(&acc, self.core.clock().now_ms()),
        )?;
        let Some(info) = info else {
            return Err(call.fail(TokenError::NotFound).into());
        };
        call.ok(&[])?;
        Ok(Response::new(token_info(info)))
    }

    async fn renew_token(
        &self,
        req: Request<RenewTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Auth/RenewToken",
            Access::Token,
            &req,
        )
        .await?;
        let caller = call.require_caller()?;
        let increment = call.check(seconds(req.get_ref().increment_seconds, "the increment"))?;
        let acc = self.resolve(&mut call, &caller, Target::Own, Capability::Write)?;
        let info = call.check(self.core.tokens.renew(
            &acc,
            increment,
            self.core.clock().now_ms(),
        ))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(token_info(info)))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Auth/RevokeToken",
            Access::Token,
            &req,
        )
        .await?;
        let caller = call.require_caller()?;
        let r = req.get_ref();
        let target = Self::target(&mut call, &r.token, &r.accessor)?;
        let acc = self.resolve(&mut call, &caller, target, Capability::Delete)?;
        let revoked = call.check(self.core.tokens.revoke(&acc))?;
        if revoked == 0 {
            return Err(call.fail(TokenError::NotFound).into());
        }
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(RevokeTokenResponse { revoked }))
    }

    /// RFC 8693 exchange (`api/federation.rs`).
    async fn exchange_token(
        &self,
        req: Request<ExchangeTokenRequest>,
    ) -> Result<Response<TokenResponse>, Status> {
        super::federation::exchange(&self.core, req).await
    }
}

//! `Auth.Login`: the body of the `Auth` service's `Login` method. Needs no
//! token. The identity module checks the credential and says what it
//! entitles to; the token store issues the token (a child of nobody).
//! Every outcome is audited by `Call`, with the method as resource
//! (`auth/login/<method>`) and, once known, the identity.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::secrets::timestamp;
use super::{begin, Access};
use crate::barrier::BarrierError;
use crate::core::Core;
use crate::identity::login::{token_ttl, LoginError, MAX_LOGIN_TTL};
use crate::identity::IdentityError;
use crate::proto::v1::login_request::Method;
use crate::proto::v1::{LoginRequest, TokenResponse};
use crate::token::TokenRequest;

pub(crate) async fn login(
    core: &Arc<Core>,
    req: Request<LoginRequest>,
) -> Result<Response<TokenResponse>, Status> {
    let mut call = begin(core, "keyward.v1.Auth/Login", Access::Open, &req).await?;
    if core.is_sealed() {
        return Err(call.fail(BarrierError::Sealed).into());
    }
    let source = req.remote_addr().map(|a| a.ip());
    let chain: Vec<Vec<u8>> = req
        .peer_certs()
        .map(|certs| certs.iter().map(|c| c.as_ref().to_vec()).collect())
        .unwrap_or_default();
    let r = req.into_inner();
    let now = core.clock().now_ms();
    let grant = match r.method {
        Some(Method::Approle(a)) => {
            call.set_resource("auth/login/approle");
            core.login
                .approle(&core.identities, &a.role_id, &a.secret_id, source, now)
        }
        Some(Method::Cert(_)) => {
            call.set_resource("auth/login/cert");
            core.login
                .cert(&core.identities, &core.pki, &chain, source, now)
        }
        Some(Method::Oidc(o)) => {
            call.set_resource("auth/login/oidc");
            core.login
                .oidc(&core.identities, &o.issuer, &o.jwt, source, now)
                .await
        }
        None => {
            return Err(call
                .fail(IdentityError::Invalid(
                    "give a login method: approle, cert or oidc".into(),
                ))
                .into())
        }
    };
    let grant = call.check(grant)?;
    let issued = issue_login(core, &mut call, &grant, r.ttl_seconds).await?;
    call.ok(&[("token", issued.token.expose().as_bytes())])?;
    Ok(Response::new(TokenResponse {
        token: issued.token.expose().to_owned(),
        accessor: issued.accessor.clone(),
        expires_at: timestamp(issued.expires_at_ms),
        policies: issued.policies.clone(),
        identity: issued.identity.clone(),
    }))
}

/// Issues the token of a login whose credential checked out (`grant`):
/// records the request, issues, checks the identity again, makes it
/// durable. The caller answers with `call.ok`. Shared by gRPC's Login and
/// the HTTP logins (`http::login`), so the rules are written once.
pub(crate) async fn issue_login(
    core: &Arc<Core>,
    call: &mut crate::core::call::Call,
    grant: &crate::identity::login::Grant,
    ttl_seconds: u64,
) -> Result<crate::token::IssuedToken, crate::core::call::Failure> {
    let now = core.clock().now_ms();
    // The credential checks out: record the request before the token is issued.
    call.record_request()?;
    call.set_resource(format!("identity/{}", grant.identity));
    let issued = call.check(core.tokens.issue(
        TokenRequest {
            identity: grant.identity.clone(),
            policies: grant.policies.clone(),
            ttl: token_ttl(ttl_seconds),
            max_ttl: MAX_LOGIN_TTL,
            hard_expiry_ms: grant.hard_expiry_ms,
            uses: 0,
            cidrs: Vec::new(),
            parent_accessor: None,
            method: grant.method,
        },
        now,
    ))?;
    call.set_subject(&issued.identity, &issued.accessor);
    // A disable, delete or expiry that ran between the credential check and
    // the issue revoked the identity's tokens before this one existed: look
    // again now that it is stored, and take it back if the identity is gone.
    // An update that narrowed its policies or brought its expiry forward
    // revoked its tokens too: the new one must match the record as it is now.
    let still_active = call
        .check(core.identities.get(&grant.identity))?
        .is_some_and(|record| fits(&record, grant, now, core.clock().now_ms()));
    if !still_active {
        call.check(core.tokens.revoke(&issued.accessor))?;
        return Err(call.fail(LoginError::Invalid));
    }
    call.check(core.barrier.durable().await)?;
    Ok(issued)
}

/// Whether a login token issued at `issued_at_ms` under `grant` fits the
/// identity's record as read after the issue (at `now_ms`): active, the
/// same policies, and no life past its expiry. Its life is its renewal
/// cap (the grant's hard expiry, or [`MAX_LOGIN_TTL`] from the issue), not
/// its first TTL: renewed, or through its children and leases, it would
/// otherwise reach past an expiry brought forward meanwhile.
fn fits(
    record: &crate::identity::IdentityRecord,
    grant: &crate::identity::login::Grant,
    issued_at_ms: u64,
    now_ms: u64,
) -> bool {
    let most =
        issued_at_ms.saturating_add(u64::try_from(MAX_LOGIN_TTL.as_millis()).unwrap_or(u64::MAX));
    let cap = grant.hard_expiry_ms.map_or(most, |hard| hard.min(most));
    record.is_active(now_ms)
        && record.policies == grant.policies
        && (record.expires_at_ms == 0 || cap <= record.expires_at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::login::Grant;
    use crate::identity::IdentityRecord;

    const NOW: u64 = 1_700_000_000_000;

    fn grant(hard_expiry_ms: Option<u64>) -> Grant {
        Grant {
            identity: "ci".into(),
            policies: vec!["app".into()],
            hard_expiry_ms,
            method: "approle",
        }
    }

    fn record(expires_at_ms: u64) -> IdentityRecord {
        IdentityRecord {
            name: "ci".into(),
            policies: vec!["app".into()],
            expires_at_ms,
            ..IdentityRecord::default()
        }
    }

    /// A login read the identity with no expiry; an update set one 2 h out
    /// before the token was issued. The token's first hour fits; its
    /// renewal cap (24 h) does not, so the login is refused.
    #[test]
    fn a_token_whose_renewals_would_pass_an_expiry_set_meanwhile_does_not_fit() {
        let two_hours = NOW + 2 * 3_600_000;
        assert!(!fits(&record(two_hours), &grant(None), NOW, NOW));
        // Read with the expiry: capped by it, so it fits.
        assert!(fits(&record(two_hours), &grant(Some(two_hours)), NOW, NOW));
        assert!(fits(&record(0), &grant(None), NOW, NOW));
        // Brought forward meanwhile, below the grant's cap.
        assert!(!fits(
            &record(NOW + 3_600_000),
            &grant(Some(two_hours)),
            NOW,
            NOW
        ));
        // Expired, disabled or with other policies: no.
        assert!(!fits(&record(NOW), &grant(Some(NOW)), NOW, NOW));
        let mut disabled = record(0);
        disabled.disabled = true;
        assert!(!fits(&disabled, &grant(None), NOW, NOW));
        let mut other = record(0);
        other.policies = vec!["admin".into()];
        assert!(!fits(&other, &grant(None), NOW, NOW));
    }
}

//! `keyward.v1.Leases`: look up, list, renew and revoke leases.
//!
//! The token that holds a lease may look it up, renew and revoke it; anyone
//! else needs `read`, `write` or `delete` on `sys/leases/<lease id>`. A
//! revoke by prefix P needs `delete` on `sys/leases/P/**`; a list needs
//! `list` on `sys/leases/P` (`sys/leases` for all). A refusal is the same
//! whether or not the lease exists.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::secrets::timestamp;
use super::{begin, Access};
use crate::core::call::{Call, Failure};
use crate::core::offload::Work;
use crate::core::Core;
use crate::lease::{check_prefix, LeaseError, LeaseRecord};
use crate::policy::Capability;
use crate::proto::v1::leases_server::Leases;
use crate::proto::v1::*;

pub struct LeasesService {
    core: Arc<Core>,
}

impl LeasesService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

fn lease_message(r: &LeaseRecord) -> Lease {
    Lease {
        lease_id: r.id.clone(),
        role: r.role.clone(),
        provider: r.provider.clone(),
        username: r.username.clone(),
        identity: r.identity.clone(),
        accessor: r.accessor.clone(),
        created_at: timestamp(r.created_ms),
        expires_at: timestamp(r.expires_ms),
        max_expires_at: timestamp(r.max_expiry_ms),
        revoking: r.revoking,
        failures: r.failures,
        last_error: r.last_error.clone(),
        renewable: !r.revoking,
    }
}

#[tonic::async_trait]
impl Leases for LeasesService {
    async fn lookup(&self, req: Request<LeaseLookupRequest>) -> Result<Response<Lease>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Leases/Lookup", Access::Token, &req).await?;
        let record = owned_or_allowed(
            &self.core,
            &mut call,
            &req.get_ref().lease_id,
            Capability::Read,
        )?;
        call.ok(&[])?;
        Ok(Response::new(lease_message(&record)))
    }

    async fn list(
        &self,
        req: Request<LeaseListRequest>,
    ) -> Result<Response<LeaseListResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Leases/List", Access::Token, &req).await?;
        let r = req.get_ref();
        let leases = list(&mut call, &r.prefix, r.failed).await?;
        call.ok(&[])?;
        Ok(Response::new(LeaseListResponse {
            leases: leases.iter().map(lease_message).collect(),
        }))
    }

    async fn renew(&self, req: Request<LeaseRenewRequest>) -> Result<Response<Lease>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Leases/Renew", Access::Token, &req).await?;
        let r = req.into_inner();
        let increment =
            (r.increment_seconds != 0).then(|| Duration::from_secs(r.increment_seconds));
        let renewed = renew(&self.core, &mut call, &r.lease_id, increment).await?;
        call.ok(&[])?;
        Ok(Response::new(lease_message(&renewed)))
    }

    async fn revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Leases/Revoke", Access::Token, &req).await?;
        let r = req.into_inner();
        let (revoked, pending) = match (r.lease_id.is_empty(), r.prefix.is_empty()) {
            (false, true) => revoke(&self.core, &mut call, &r.lease_id).await?,
            (true, false) => revoke_prefix(&self.core, &mut call, &r.prefix).await?,
            _ => {
                return Err(call
                    .fail(Failure::new(
                        crate::core::call::FailureKind::InvalidInput,
                        "give exactly one of a lease id or --prefix",
                    ))
                    .into())
            }
        };
        call.ok(&[])?;
        Ok(Response::new(LeaseRevokeResponse { revoked, pending }))
    }
}

// The rules of each lease call up to its answer, for both transports (the
// Vault API's `sys/leases/*` too); the caller answers with `Call::ok`.

/// The lease `id`, if the caller holds it or has `capability` on
/// `sys/leases/<id>`; a refusal does not tell whether it exists.
pub fn owned_or_allowed(
    core: &Core,
    call: &mut Call,
    id: &str,
    capability: Capability,
) -> Result<LeaseRecord, Failure> {
    let id = call.check(check_prefix(id))?.to_owned();
    let caller = call.require_caller()?;
    let found = call.check(core.leases.get(&id))?;
    let resource = format!("sys/leases/{id}");
    match found {
        Some(record) if record.accessor == caller.accessor => {
            call.set_resource(resource);
            Ok(record)
        }
        found => {
            call.authorize(capability, resource)?;
            call.check(found.ok_or(LeaseError::NotFound))
        }
    }
}

/// The leases under `prefix` ("" for all; `list` on `sys/leases/<prefix>`,
/// or `sys/leases`), only the failing ones if `failed`.
pub async fn list(
    call: &mut Call,
    prefix: &str,
    failed: bool,
) -> Result<Vec<LeaseRecord>, Failure> {
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        call.check(check_prefix(prefix))?.to_owned()
    };
    let resource = if prefix.is_empty() {
        "sys/leases".to_owned()
    } else {
        format!("sys/leases/{prefix}")
    };
    call.authorize(Capability::List, resource)?;
    // It reads every lease under the prefix: off the connection's thread.
    call.off_thread(Work::Listing, move |core| core.leases.list(&prefix, failed))
        .await
}

/// Renews lease `id` by `increment` (the role's TTL if `None`), never past
/// the end of the token that holds it.
pub async fn renew(
    core: &Core,
    call: &mut Call,
    id: &str,
    increment: Option<Duration>,
) -> Result<LeaseRecord, Failure> {
    let record = owned_or_allowed(core, call, id, Capability::Write)?;
    let now = core.clock().now_ms();
    let holder = call.check(core.tokens.lookup_accessor(&record.accessor, now))?;
    let Some(holder) = holder else {
        return Err(call.fail(Failure::new(
            crate::core::call::FailureKind::Conflict,
            "the token that holds this lease is no longer valid; the lease is being revoked",
        )));
    };
    call.check(
        core.leases
            .renew(&record.id, increment, holder.expires_at_ms)
            .await,
    )
}

/// Revokes lease `id`: (revoked, still pending on its target).
pub async fn revoke(core: &Core, call: &mut Call, id: &str) -> Result<(u32, u32), Failure> {
    let record = owned_or_allowed(core, call, id, Capability::Delete)?;
    match call.check(core.leases.revoke(&record.id).await)? {
        Some(crate::lease::Revoked::Done) | None => Ok((1, 0)),
        Some(crate::lease::Revoked::Pending(_)) => Ok((0, 1)),
    }
}

/// Revokes every lease under `prefix` (`delete` on `sys/leases/<prefix>/**`):
/// (revoked, still pending).
pub async fn revoke_prefix(
    core: &Core,
    call: &mut Call,
    prefix: &str,
) -> Result<(u32, u32), Failure> {
    let prefix = call.check(check_prefix(prefix))?.to_owned();
    call.authorize(Capability::Delete, format!("sys/leases/{prefix}/**"))?;
    call.check(core.leases.revoke_prefix(&prefix).await)
}

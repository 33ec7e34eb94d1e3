//! `keyward.v1.Pki`: short-lived workload certificates.
//!
//! Resources (see `pki`): `pki/<role>` — `issue` to issue and sign, `admin`
//! to put and delete, `read` to get; `list` on `pki` to list roles;
//! `sys/pki/ca` — `admin` to make the CA; `sys/pki/certs` — `list` for the
//! inventory; `sys/pki/certs/<serial>` — `delete` to revoke. The CA chain
//! and the CRL need a valid token only.
//!
//! A certificate is a login: one whose SPIFFE ID or subject matches an
//! identity's certificate binding logs in as that identity. So issuing or
//! signing one also needs every policy each such identity holds, the rule
//! (`Call::require_policy_subset`) that making that identity's secret-id
//! or binding needs; otherwise `issue` on a role would be a way to become
//! anyone its patterns cover.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::secrets::timestamp;
use super::{begin, Access, Call, Failure};
use crate::core::offload::Work;
use crate::core::Core;
use crate::identity::login::cert_names;
use crate::identity::IdentityRecord;
use crate::pki::store::{check_role_name, role_resource};
use crate::pki::{Built, CertRecord, PkiError, Role, RoleSpec, CA_RESOURCE, CERTS_RESOURCE};
use crate::policy::Capability;
use crate::proto::v1::pki_server::Pki;
use crate::proto::v1::*;

/// A root made by `pki init` without `--ttl`: ten years.
const DEFAULT_ROOT_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

pub struct PkiService {
    core: Arc<Core>,
}

impl PkiService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// Records a built certificate (durably) and answers it. The audit
    /// record shares one write with those of concurrent calls
    /// (`Call::ok_async`) and is written before the answer.
    async fn hand_out(
        &self,
        mut call: Call,
        mut built: Built,
    ) -> Result<Response<PkiIssueResponse>, Status> {
        record_built(&self.core, &mut call, &mut built).await?;
        let key = built
            .private_key
            .as_ref()
            .map(|k| k.as_str().to_owned())
            .unwrap_or_default();
        call.ok_async(&[("private_key", key.as_bytes())]).await?;
        Ok(Response::new(PkiIssueResponse {
            certificate: built.certificate_pem.clone(),
            private_key: key,
            ca_chain: built.ca_chain.clone(),
            serial: built.record.serial.clone(),
            expires_at: timestamp(built.record.not_after_ms),
        }))
    }
}

fn role_message(r: &Role) -> PkiRole {
    PkiRole {
        name: r.name.clone(),
        allow_spiffe: r.allow_spiffe.clone(),
        allow_dns: r.allow_dns.clone(),
        max_ttl_seconds: r.max_ttl_secs,
        key_type: r.key_type.as_str().to_owned(),
        client: r.client,
        server: r.server,
        allow_wildcard_dns: r.allow_wildcard_dns,
    }
}

fn record_message(c: &CertRecord) -> PkiCertRecord {
    PkiCertRecord {
        serial: c.serial.clone(),
        role: c.role.clone(),
        identity: c.identity.clone(),
        requested_by: c.requested_by.clone(),
        sans: c.sans.clone(),
        issued_at: timestamp(c.issued_at_ms),
        expires_at: timestamp(c.not_after_ms),
        revoked_at: timestamp(c.revoked_at_ms),
        origin: c.origin.clone(),
    }
}

#[tonic::async_trait]
impl Pki for PkiService {
    async fn init(&self, req: Request<PkiInitRequest>) -> Result<Response<PkiCaResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/Init", Access::Token, &req).await?;
        let r = req.into_inner();
        let proof = call.authorize(Capability::Admin, CA_RESOURCE.to_owned())?;
        let ttl = if r.ttl_seconds == 0 {
            DEFAULT_ROOT_TTL_SECS
        } else {
            r.ttl_seconds
        };
        let now = self.core.clock().now_ms();
        call.check(
            self.core
                .pki
                .init_root(&proof, &r.common_name, ttl.saturating_mul(1000), now),
        )?;
        call.check(self.core.barrier.durable().await)?;
        let chain = call.check(self.core.pki.ca_chain())?;
        call.ok(&[])?;
        Ok(Response::new(PkiCaResponse { ca_chain: chain }))
    }

    async fn intermediate_csr(
        &self,
        req: Request<PkiIntermediateCsrRequest>,
    ) -> Result<Response<PkiCsrResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Pki/IntermediateCsr",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let proof = call.authorize(Capability::Admin, CA_RESOURCE.to_owned())?;
        let csr = call.check(self.core.pki.intermediate_csr(&proof, &r.common_name))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(PkiCsrResponse { csr }))
    }

    async fn intermediate_set_signed(
        &self,
        req: Request<PkiSetSignedRequest>,
    ) -> Result<Response<PkiCaResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Pki/IntermediateSetSigned",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let proof = call.authorize(Capability::Admin, CA_RESOURCE.to_owned())?;
        let now = self.core.clock().now_ms();
        call.check(self.core.pki.set_signed(&proof, &r.certificate, now))?;
        call.check(self.core.barrier.durable().await)?;
        let chain = call.check(self.core.pki.ca_chain())?;
        call.ok(&[])?;
        Ok(Response::new(PkiCaResponse { ca_chain: chain }))
    }

    async fn ca(&self, req: Request<PkiCaRequest>) -> Result<Response<PkiCaResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/Ca", Access::Token, &req).await?;
        call.set_resource(CA_RESOURCE);
        let chain = call.check(self.core.pki.ca_chain())?;
        call.ok(&[])?;
        Ok(Response::new(PkiCaResponse { ca_chain: chain }))
    }

    async fn put_role(&self, req: Request<PkiRole>) -> Result<Response<PkiRole>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/PutRole", Access::Token, &req).await?;
        let r = req.into_inner();
        call.check(check_role_name(&r.name))?;
        let proof = call.authorize(Capability::Admin, role_resource(&r.name))?;
        let spec = RoleSpec {
            allow_spiffe: r.allow_spiffe,
            allow_dns: r.allow_dns,
            max_ttl_secs: r.max_ttl_seconds,
            key_type: r.key_type,
            client: r.client,
            server: r.server,
            allow_wildcard_dns: r.allow_wildcard_dns,
        };
        let role = call.check(self.core.pki.put_role(&proof, &r.name, spec))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(role_message(&role)))
    }

    async fn get_role(&self, req: Request<PkiRoleName>) -> Result<Response<PkiRole>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/GetRole", Access::Token, &req).await?;
        let r = req.into_inner();
        call.check(check_role_name(&r.name))?;
        call.authorize(Capability::Read, role_resource(&r.name))?;
        let role = call
            .check(self.core.pki.role(&r.name))?
            .ok_or_else(|| call.fail(PkiError::NoRole(r.name.clone())))?;
        call.ok(&[])?;
        Ok(Response::new(role_message(&role)))
    }

    async fn list_roles(
        &self,
        req: Request<PkiListRolesRequest>,
    ) -> Result<Response<PkiListRolesResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/ListRoles", Access::Token, &req).await?;
        call.authorize(Capability::List, "pki".to_owned())?;
        let roles = call.check(self.core.pki.roles())?;
        call.ok(&[])?;
        Ok(Response::new(PkiListRolesResponse {
            roles: roles.iter().map(role_message).collect(),
        }))
    }

    async fn delete_role(
        &self,
        req: Request<PkiRoleName>,
    ) -> Result<Response<PkiDeleteRoleResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/DeleteRole", Access::Token, &req).await?;
        let r = req.into_inner();
        call.check(check_role_name(&r.name))?;
        let proof = call.authorize(Capability::Admin, role_resource(&r.name))?;
        call.check(self.core.pki.delete_role(&proof, &r.name))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(PkiDeleteRoleResponse {}))
    }

    async fn issue(
        &self,
        req: Request<PkiIssueRequest>,
    ) -> Result<Response<PkiIssueResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/Issue", Access::Token, &req).await?;
        let r = req.into_inner();
        let built = build_issue(
            &self.core,
            &mut call,
            &r.role,
            &r.spiffe_ids,
            &r.dns_names,
            r.ttl_seconds,
        )?;
        self.hand_out(call, built).await
    }

    async fn sign(
        &self,
        req: Request<PkiSignRequest>,
    ) -> Result<Response<PkiIssueResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/Sign", Access::Token, &req).await?;
        let r = req.into_inner();
        let built = build_sign(&self.core, &mut call, &r.role, &r.csr, r.ttl_seconds)?;
        self.hand_out(call, built).await
    }

    async fn list(
        &self,
        req: Request<PkiListRequest>,
    ) -> Result<Response<PkiListResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/List", Access::Token, &req).await?;
        let r = req.into_inner();
        call.authorize(Capability::List, CERTS_RESOURCE.to_owned())?;
        let within = (r.expiring_within_seconds != 0)
            .then(|| r.expiring_within_seconds.saturating_mul(1000));
        // It reads the whole certificate inventory: off the connection's thread.
        let certs = call
            .off_thread(Work::Listing, move |core| {
                core.pki.list(within, core.clock().now_ms())
            })
            .await?;
        call.ok(&[])?;
        Ok(Response::new(PkiListResponse {
            certificates: certs.iter().map(record_message).collect(),
        }))
    }

    async fn revoke(
        &self,
        req: Request<PkiRevokeRequest>,
    ) -> Result<Response<PkiCertRecord>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/Revoke", Access::Token, &req).await?;
        let r = req.into_inner();
        let serial = call.check(crate::pki::store::normalize_serial(&r.serial))?;
        let proof = call.authorize(Capability::Delete, format!("{CERTS_RESOURCE}/{serial}"))?;
        let record = call.check(self.core.pki.revoke(
            &proof,
            &serial,
            self.core.clock().now_ms(),
        ))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(record_message(&record)))
    }

    async fn crl(&self, req: Request<PkiCrlRequest>) -> Result<Response<PkiCrlResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Pki/Crl", Access::Token, &req).await?;
        call.set_resource(CERTS_RESOURCE);
        // Any token may ask, and a CRL being rebuilt (a revoke) holds the
        // lock this waits on: off the connection's thread.
        let der = call
            .off_thread(Work::Listing, move |core| {
                core.pki.crl(core.clock().now_ms())
            })
            .await?;
        call.ok(&[])?;
        Ok(Response::new(PkiCrlResponse { der }))
    }
}

// Issue and sign up to their answer, for both transports (the Vault API's
// `pki/issue/<role>` and `pki/sign/<role>` too): build with
// [`build_issue`] or [`build_sign`], then [`record_built`], then answer
// with `Call::ok` naming the private key.

/// A new key and a certificate for it from role `role` (`issue` on
/// `pki/<role>`).
pub fn build_issue(
    core: &Core,
    call: &mut Call,
    role: &str,
    spiffe_ids: &[String],
    dns_names: &[String],
    ttl_seconds: u64,
) -> Result<Built, Failure> {
    call.check(check_role_name(role))?;
    let proof = call.authorize(Capability::Issue, role_resource(role))?;
    call.check(core.pki.build_issue(
        &proof,
        role,
        spiffe_ids,
        dns_names,
        ttl_seconds,
        core.clock().now_ms(),
    ))
}

/// A certificate for the key of `csr` from role `role` (`issue` on
/// `pki/<role>`).
pub fn build_sign(
    core: &Core,
    call: &mut Call,
    role: &str,
    csr: &str,
    ttl_seconds: u64,
) -> Result<Built, Failure> {
    call.check(check_role_name(role))?;
    let proof = call.authorize(Capability::Issue, role_resource(role))?;
    call.check(
        core.pki
            .build_sign(&proof, role, csr, ttl_seconds, core.clock().now_ms()),
    )
}

/// Refuses a certificate that would log in as an identity whose policies
/// the caller does not all hold, that is disabled or past its expiry, or
/// whose expiry comes before the certificate's, then records it in the
/// inventory (durably) with who asked.
///
/// The identities are read again once it is recorded, as for a secret-id:
/// a disable, an expiry brought forward, a delete (with a new identity
/// under the name, or none) or new policies that came meanwhile (on another
/// node) take the certificate back, since the expiry sweep or the delete
/// may have listed the inventory before it was there; so does a read that
/// fails.
pub async fn record_built(core: &Core, call: &mut Call, built: &mut Built) -> Result<(), Failure> {
    let holders = holders_of(core, call, built)?;
    for record in &holders {
        call.require_policy_subset(&record.policies)?;
    }
    // Checked after the policies, so only a caller who holds them all
    // learns the identity's state.
    if let Err(refused) = may_hold(&holders, built, core.clock().now_ms()) {
        return Err(call.fail(refused));
    }
    built.record.identity = holders.first().map(|r| r.name.clone()).unwrap_or_default();
    built.record.requested_by = call
        .caller()
        .map(|c| c.identity.clone())
        .unwrap_or_default();
    call.check(core.pki.record(built))?;
    let refused = match holders_of(core, call, built) {
        Ok(again) if !same_holders(&holders, &again) => Some(Ok(PkiError::HolderChanged)),
        Ok(again) => may_hold(&again, built, core.clock().now_ms()).err().map(Ok),
        Err(failure) => Some(Err(failure)),
    };
    if let Some(refused) = refused {
        let now = core.clock().now_ms();
        let taken_back = core.pki.take_back(&built.record.serial, now);
        if let Err(error) = &taken_back {
            tracing::warn!(serial = %built.record.serial, %error, "a certificate refused after it was recorded could not be revoked");
        }
        return Err(match refused {
            Ok(refused) => {
                call.check(taken_back)?;
                call.check(core.barrier.durable().await)?;
                call.fail(refused)
            }
            Err(failure) => failure,
        });
    }
    call.check(core.barrier.durable().await)?;
    Ok(())
}

/// Whether two reads found the same identities: the same names, made at
/// the same time (not deleted and made again), with the same policies.
fn same_holders(before: &[IdentityRecord], after: &[IdentityRecord]) -> bool {
    before.len() == after.len()
        && before.iter().zip(after).all(|(a, b)| {
            a.name == b.name && a.created_at_ms == b.created_at_ms && a.policies == b.policies
        })
}

/// The identities a certificate would make its holder (by SPIFFE ID, then
/// by subject DN); the first is the one the inventory names.
fn holders_of(core: &Core, call: &mut Call, built: &Built) -> Result<Vec<IdentityRecord>, Failure> {
    let names = cert_names(&built.der).ok_or_else(|| {
        call.fail(PkiError::Invalid(
            "issued certificate does not parse".into(),
        ))
    })?;
    let mut holders = Vec::new();
    for id in &names.spiffe_ids {
        let found = core.identities.by_cert(None, std::slice::from_ref(id));
        if let Some(record) = call.check(found)? {
            holders.push(record);
        }
    }
    if let Some(dn) = &names.subject {
        if let Some(record) = call.check(core.identities.by_cert(Some(dn), &[]))? {
            holders.push(record);
        }
    }
    Ok(holders)
}

/// Like a secret-id: no new login credential for an identity that could
/// not log in with it, nor one that outlives it (outside keyward nobody
/// asks whether the identity is still there). `notAfter` is a whole second
/// and included, so the certificate is valid until a second after it.
fn may_hold(holders: &[IdentityRecord], built: &Built, now_ms: u64) -> Result<(), PkiError> {
    for record in holders {
        if !record.is_active(now_ms) {
            return Err(PkiError::InactiveIdentity);
        }
        if record.expires_at_ms != 0
            && built.record.not_after_ms.saturating_add(1000) > record.expires_at_ms
        {
            return Err(PkiError::OutlivesIdentity);
        }
    }
    Ok(())
}

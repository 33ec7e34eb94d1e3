//! `keyward.v1.Identities`: the inventory, secret-ids, login bindings and
//! OIDC issuers.
//!
//! Resources and capabilities: `identity/<name>` — `write` to create, update
//! and disable, `read` to get and to list its secret-ids (accessors, never
//! values), `delete` to delete, `issue` to make a secret-id, `admin` to bind
//! a certificate or OIDC claims (a binding decides who can become the
//! identity); `write` to revoke one secret-id or remove one binding (they
//! only take access away); `list` on `identity` to list.
//! What gives access back needs what granting it needs: creating with
//! policies, changing policies, enabling, and moving the expiry later (or
//! removing it) need every policy the identity holds (or will hold), as do
//! making a secret-id and binding;
//! `sys/oidc-issuer/<name>` — `admin` to put an issuer, and to change one
//! that identities are bound to (its key set, URL or audience), every policy
//! those identities hold, as binding them needs; `list` on
//! `sys/oidc-issuer` to list them.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::secrets::timestamp;
use super::{begin, Access, Call, Failure};
use crate::cidr::Cidr;
use crate::core::offload::Work;
use crate::core::Core;
use crate::identity::{
    last_used_ms, IdentityError, IdentityKind, IdentityName, IdentityRecord, IdentityUpdate,
    IssuerRecord, ListFilter, NewIdentity, SecretIdSpec, Unbind,
};
use crate::policy::Capability;
use crate::proto::v1::identities_server::Identities;
use crate::proto::v1::*;

pub struct IdentitiesService {
    core: Arc<Core>,
}

impl IdentitiesService {
    /// A secret-id or a binding lets its maker log in as the identity, so
    /// making one needs every policy the identity holds (or `root`), as
    /// attaching those policies does.
    pub(crate) fn require_holds_policies_of(
        &self,
        call: &mut Call,
        name: &IdentityName,
    ) -> Result<(), Failure> {
        match call.check(self.core.identities.get(name.as_str()))? {
            Some(record) => call.require_policy_subset(&record.policies),
            None => Ok(()),
        }
    }

    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// Last token use per identity, from `usage`.
pub(crate) fn token_use(core: &Core) -> HashMap<String, u64> {
    core.usage.last_uses()
}

pub(crate) fn identity_message(record: &IdentityRecord, token_use: Option<u64>) -> Identity {
    Identity {
        name: record.name.clone(),
        kind: record.kind.clone(),
        owner: record.owner.clone(),
        description: record.description.clone(),
        policies: record.policies.clone(),
        expires_at: timestamp(record.expires_at_ms),
        disabled: record.disabled,
        created_at: timestamp(record.created_at_ms),
        last_used_at: timestamp(last_used_ms(record, token_use)),
        role_id: record.role_id.clone(),
        cert_bindings: record
            .cert_bindings
            .iter()
            .map(|b| CertBinding {
                subject: b.subject.clone(),
                spiffe_id: b.spiffe_id.clone(),
            })
            .collect(),
        oidc_bindings: record
            .oidc_bindings
            .iter()
            .map(|b| OidcBinding {
                issuer: b.issuer.clone(),
                claims: b
                    .claims
                    .iter()
                    .map(|c| (c.key.clone(), c.value.clone()))
                    .collect(),
            })
            .collect(),
        metadata: record
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn issuer_message(r: &IssuerRecord) -> OidcIssuer {
    OidcIssuer {
        name: r.name.clone(),
        issuer_url: r.issuer_url.clone(),
        jwks_file: r.jwks_file.clone(),
        jwks_url: r.jwks_url.clone(),
        audience: r.audience.clone(),
    }
}

/// Why an issuer put ended: the store refused it (not audited yet), or the
/// caller lacks the bound identities' policies (audited already).
enum IssuerPutError {
    Store(IdentityError),
    Denied(Failure),
}

impl From<IdentityError> for IssuerPutError {
    fn from(e: IdentityError) -> Self {
        Self::Store(e)
    }
}

fn expiry_from(seconds: u64, now: u64) -> u64 {
    if seconds == 0 {
        0
    } else {
        now.saturating_add(seconds.saturating_mul(1000))
    }
}

pub(crate) fn parse_cidrs(texts: &[String]) -> Result<Vec<Cidr>, IdentityError> {
    texts
        .iter()
        .map(|t| {
            t.parse::<Cidr>()
                .map_err(|e| IdentityError::Invalid(e.to_string()))
        })
        .collect()
}

impl IdentitiesService {
    fn one(&self, record: &IdentityRecord) -> Identity {
        let used = self.core.usage.of(&record.name).map(|u| u.last_used_ms);
        identity_message(record, used)
    }
}

#[tonic::async_trait]
impl Identities for IdentitiesService {
    async fn create(
        &self,
        req: Request<CreateIdentityRequest>,
    ) -> Result<Response<Identity>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/Create",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        let kind = call.check(IdentityKind::parse(&r.kind))?;
        call.authorize(Capability::Write, name.resource())?;
        call.require_policy_subset(&r.policies)?;
        let now = self.core.clock().now_ms();
        let new = NewIdentity {
            name,
            kind,
            owner: r.owner,
            description: r.description,
            policies: r.policies,
            expires_at_ms: expiry_from(r.expires_in_seconds, now),
        };
        let record = call.check(self.core.identities.create(new, &self.core.policies, now))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(identity_message(&record, None)))
    }

    async fn get(&self, req: Request<GetIdentityRequest>) -> Result<Response<Identity>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Identities/Get", Access::Token, &req).await?;
        let name = call.check(IdentityName::parse(&req.get_ref().name))?;
        call.authorize(Capability::Read, name.resource())?;
        let found = call.check(self.core.identities.get(name.as_str()))?;
        let record = call.check(found.ok_or(IdentityError::NotFound))?;
        call.ok(&[])?;
        Ok(Response::new(self.one(&record)))
    }

    async fn list(
        &self,
        req: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/List",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let kind = if r.kind.is_empty() {
            None
        } else {
            Some(call.check(IdentityKind::parse(&r.kind))?)
        };
        call.authorize(Capability::List, "identity".to_owned())?;
        let filter = ListFilter {
            kind,
            no_owner: r.no_owner,
            dormant_ms: r.dormant_seconds.saturating_mul(1000),
        };
        // It reads every identity record: off the connection's thread.
        let (records, used) = call
            .off_thread(Work::Listing, move |core| {
                let used = token_use(core);
                let lookup = |name: &str| used.get(name).copied();
                let records = core
                    .identities
                    .list(&filter, &lookup, core.clock().now_ms())?;
                Ok::<_, IdentityError>((records, used))
            })
            .await?;
        call.ok(&[])?;
        Ok(Response::new(ListIdentitiesResponse {
            identities: records
                .iter()
                .map(|r| identity_message(r, used.get(&r.name).copied()))
                .collect(),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateIdentityRequest>,
    ) -> Result<Response<Identity>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/Update",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        call.authorize(Capability::Write, name.resource())?;
        if r.set_policies {
            call.require_policy_subset(&r.policies)?;
        }
        let now = self.core.clock().now_ms();
        let expires_at_ms = r.expires_in_seconds.map(|s| expiry_from(s, now));
        // Two changes give access: a later expiry (or none), which keeps the
        // identity's access alive longer, and a new owner, which every
        // identity token carries (its `owner` claim, and any template
        // naming it), so relying parties may map it to access. Each needs
        // the policies the identity keeps (new ones were checked), also
        // when the policies are set in the same call, and the store applies
        // the update only if they are still those. Judged to grant nothing,
        // the update is applied only over the owner and expiry it read.
        let mut checked_policies = None;
        let mut judged_on = None;
        if r.owner.is_some() || expires_at_ms.is_some() {
            let found = call.check(self.core.identities.get(name.as_str()))?;
            if let Some(record) = found {
                let owner_moved = r.owner.as_deref().is_some_and(|o| o != record.owner);
                let later = expires_at_ms.is_some_and(|new| match (record.expires_at_ms, new) {
                    (0, _) => false,
                    (_, 0) => true,
                    (old, new) => new > old,
                });
                if owner_moved || (later && !r.set_policies) {
                    call.require_policy_subset(&record.policies)?;
                    checked_policies = Some(record.policies);
                } else {
                    judged_on = Some((record.owner, record.expires_at_ms));
                }
            }
        }
        let update = IdentityUpdate {
            owner: r.owner,
            description: r.description,
            policies: r.set_policies.then_some(r.policies),
            expires_at_ms,
            checked_policies,
            judged_on,
        };
        let record = call.check(self.core.identities.update(
            &name,
            update,
            &self.core.policies,
            &self.core.tokens,
            now,
        ))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(self.one(&record)))
    }

    async fn disable(
        &self,
        req: Request<IdentityNameRequest>,
    ) -> Result<Response<Identity>, Status> {
        self.set_disabled(req, true, "keyward.v1.Identities/Disable")
            .await
    }

    async fn enable(
        &self,
        req: Request<IdentityNameRequest>,
    ) -> Result<Response<Identity>, Status> {
        self.set_disabled(req, false, "keyward.v1.Identities/Enable")
            .await
    }

    async fn delete(
        &self,
        req: Request<IdentityNameRequest>,
    ) -> Result<Response<DeleteIdentityResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/Delete",
            Access::Token,
            &req,
        )
        .await?;
        let name = call.check(IdentityName::parse(&req.get_ref().name))?;
        call.authorize(Capability::Delete, name.resource())?;
        let now = self.core.clock().now_ms();
        // The certificates issued for it first: one would otherwise log in
        // as an identity made again under the name, which nobody checked it
        // against. First, so a delete that fails after leaves the safe side;
        // only once the identity is known, and only those issued *for* it
        // (not those it asked for on others' behalf: decommission's call).
        let known = self.core.identities.get(name.as_str());
        call.check(known.and_then(|r| r.ok_or(IdentityError::NotFound)))?;
        call.check(self.core.pki.revoke_issued_for(name.as_str(), now))?;
        let revoked = call.check(self.core.identities.delete(&name, &self.core.tokens, now))?;
        call.check(self.core.usage.forget(name.as_str()))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(DeleteIdentityResponse {
            revoked_tokens: revoked,
        }))
    }

    async fn create_secret_id(
        &self,
        req: Request<CreateSecretIdRequest>,
    ) -> Result<Response<CreateSecretIdResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/CreateSecretId",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        let cidrs = call.check(parse_cidrs(&r.cidrs))?;
        call.authorize(Capability::Issue, name.resource())?;
        self.require_holds_policies_of(&mut call, &name)?;
        let spec = SecretIdSpec {
            ttl_ms: r.ttl_seconds.saturating_mul(1000),
            uses: r.uses,
            cidrs,
        };
        let made = call.check(self.core.identities.create_secret_id(
            &name,
            spec,
            self.core.clock().now_ms(),
        ))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[("secret_id", made.secret_id.expose().as_bytes())])?;
        Ok(Response::new(CreateSecretIdResponse {
            role_id: made.role_id.clone(),
            secret_id: made.secret_id.expose().to_owned(),
            expires_at: timestamp(made.expires_at_ms),
        }))
    }

    async fn bind_cert(&self, req: Request<BindCertRequest>) -> Result<Response<Identity>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/BindCert",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        call.authorize(Capability::Admin, name.resource())?;
        self.require_holds_policies_of(&mut call, &name)?;
        let subject = (!r.subject.is_empty()).then_some(r.subject.as_str());
        let spiffe = (!r.spiffe_id.is_empty()).then_some(r.spiffe_id.as_str());
        let record = call.check(self.core.identities.bind_cert(&name, subject, spiffe))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(self.one(&record)))
    }

    async fn bind_oidc(&self, req: Request<BindOidcRequest>) -> Result<Response<Identity>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/BindOidc",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        call.authorize(Capability::Admin, name.resource())?;
        self.require_holds_policies_of(&mut call, &name)?;
        let mut claims: Vec<(String, String)> = r.claims.into_iter().collect();
        claims.sort();
        let record = call.check(self.core.identities.bind_oidc(&name, &r.issuer, claims))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(self.one(&record)))
    }

    async fn list_secret_ids(
        &self,
        req: Request<IdentityNameRequest>,
    ) -> Result<Response<ListSecretIdsResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/ListSecretIds",
            Access::Token,
            &req,
        )
        .await?;
        let name = call.check(IdentityName::parse(&req.get_ref().name))?;
        call.authorize(Capability::Read, name.resource())?;
        let listed = call.check(
            self.core
                .identities
                .list_secret_ids(&name, self.core.clock().now_ms()),
        )?;
        call.ok(&[])?;
        Ok(Response::new(ListSecretIdsResponse {
            secret_ids: listed
                .into_iter()
                .map(|s| SecretIdInfo {
                    accessor: s.handle,
                    created_at: timestamp(s.created_at_ms),
                    expires_at: timestamp(s.expires_at_ms),
                    uses_left: s.uses_left,
                    cidrs: s.cidrs,
                })
                .collect(),
        }))
    }

    async fn revoke_secret_id(
        &self,
        req: Request<RevokeSecretIdRequest>,
    ) -> Result<Response<RevokeSecretIdResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/RevokeSecretId",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        call.authorize(Capability::Write, name.resource())?;
        call.check(self.core.identities.revoke_secret_id(&name, &r.accessor))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(RevokeSecretIdResponse {}))
    }

    async fn unbind(&self, req: Request<UnbindRequest>) -> Result<Response<Identity>, Status> {
        use crate::proto::v1::unbind_request::Binding;
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/Unbind",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        let which =
            match r.binding {
                Some(Binding::CertSubject(dn)) => Unbind::CertSubject(dn),
                Some(Binding::CertSpiffe(id)) => Unbind::CertSpiffe(id),
                Some(Binding::OidcIssuer(issuer)) => Unbind::OidcIssuer(issuer),
                None => return Err(call
                    .fail(IdentityError::Invalid(
                        "give the binding: a certificate subject, a SPIFFE ID or an OIDC issuer"
                            .into(),
                    ))
                    .into()),
            };
        call.authorize(Capability::Write, name.resource())?;
        let record = call.check(self.core.identities.unbind(&name, &which))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(self.one(&record)))
    }

    async fn put_oidc_issuer(
        &self,
        req: Request<PutOidcIssuerRequest>,
    ) -> Result<Response<OidcIssuer>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/PutOidcIssuer",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(
            IdentityName::parse(&r.name)
                .map_err(|_| IdentityError::Invalid("issuer name: [A-Za-z0-9._-]".into())),
        )?;
        call.authorize(Capability::Admin, format!("sys/oidc-issuer/{name}"))?;
        let issuer = IssuerRecord {
            name: r.name,
            issuer_url: r.issuer_url,
            jwks_file: r.jwks_file,
            jwks_url: r.jwks_url,
            audience: r.audience,
        };
        // The issuer's key set decides who logs in as the identities bound
        // to it: changing it needs what binding them needs.
        let put = self.core.identities.put_issuer(
            issuer,
            self.core.oidc_jwks_dir(),
            |bound_policies: &[String]| {
                call.require_policy_subset(bound_policies)
                    .map_err(IssuerPutError::Denied)
            },
        );
        let stored = match put {
            Ok(stored) => stored,
            Err(IssuerPutError::Denied(audited)) => return Err(audited.into()),
            Err(IssuerPutError::Store(e)) => return Err(call.fail(e).into()),
        };
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(issuer_message(&stored)))
    }

    async fn list_oidc_issuers(
        &self,
        req: Request<ListOidcIssuersRequest>,
    ) -> Result<Response<ListOidcIssuersResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/ListOidcIssuers",
            Access::Token,
            &req,
        )
        .await?;
        call.authorize(Capability::List, "sys/oidc-issuer".to_owned())?;
        let issuers = call.check(self.core.identities.issuers())?;
        call.ok(&[])?;
        Ok(Response::new(ListOidcIssuersResponse {
            issuers: issuers.iter().map(issuer_message).collect(),
        }))
    }

    async fn set_metadata(
        &self,
        req: Request<SetIdentityMetadataRequest>,
    ) -> Result<Response<Identity>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Identities/SetMetadata",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        call.authorize(Capability::Write, name.resource())?;
        // Labels may be claims of the identity's tokens, which a relying
        // party may map to access: a change is a grant, and needs every
        // policy the identity holds (as `enable` does).
        // The store applies it only if the policies are still those.
        let found = call.check(self.core.identities.get(name.as_str()))?;
        let checked = match found {
            Some(record) => {
                call.require_policy_subset(&record.policies)?;
                Some(record.policies)
            }
            None => None,
        };
        let record = call.check(self.core.identities.set_metadata_checked(
            &name,
            r.set.into_iter().collect(),
            &r.remove,
            checked.as_deref(),
        ))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(self.one(&record)))
    }
}

impl IdentitiesService {
    async fn set_disabled(
        &self,
        req: Request<IdentityNameRequest>,
        disabled: bool,
        method: &'static str,
    ) -> Result<Response<Identity>, Status> {
        let mut call = begin(&self.core, method, Access::Token, &req).await?;
        let name = call.check(IdentityName::parse(&req.get_ref().name))?;
        call.authorize(Capability::Write, name.resource())?;
        // Enabling gives the identity's policies back to whoever holds its
        // credentials: it needs them, as attaching them does, and the store
        // applies it only if they are still those.
        let mut checked = None;
        if !disabled {
            let found = call.check(self.core.identities.get(name.as_str()))?;
            let record = call.check(found.ok_or(IdentityError::NotFound))?;
            call.require_policy_subset(&record.policies)?;
            checked = Some(record.policies);
        }
        let (record, _tokens, _secret_ids) =
            call.check(self.core.identities.set_disabled_checked(
                &name,
                disabled,
                req.get_ref().keep_secret_ids,
                checked.as_deref(),
                &self.core.tokens,
                self.core.clock().now_ms(),
            ))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(self.one(&record)))
    }
}

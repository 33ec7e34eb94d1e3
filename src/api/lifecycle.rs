//! `keyward.v1.Lifecycle`: decommission, attestation, read sets and policy
//! suggestions. Parse, authorize, call `lifecycle`, answer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::secrets::timestamp;
use super::{begin, Access, Failure, FailureKind};
use crate::core::auth::Caller;
use crate::core::offload::Work;
use crate::core::Core;
use crate::identity::IdentityName;
use crate::lifecycle::attest::{status_of, AttestStatus, RecertSettings};
use crate::lifecycle::decommission::{DecommissionRun, Requester};
use crate::lifecycle::LifecycleError;
use crate::policy::{validate_name, Capability, Policy};
use crate::policy_store::PolicyStoreError;
use crate::proto::v1::lifecycle_server::Lifecycle;
use crate::proto::v1::*;

pub struct LifecycleService {
    core: Arc<Core>,
    settings: RecertSettings,
}

impl LifecycleService {
    pub fn new(core: Arc<Core>, settings: RecertSettings) -> Self {
        Self { core, settings }
    }
}

impl From<LifecycleError> for Failure {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Identity(e) => e.into(),
            LifecycleError::Barrier(e) => e.into(),
            LifecycleError::Rotation(e) => e.into(),
            LifecycleError::Audit(e) => e.into(),
            LifecycleError::Policies(e) => e.into(),
            LifecycleError::Secrets(e) => e.into(),
            LifecycleError::Invalid(_) => Failure::new(FailureKind::InvalidInput, e.to_string()),
            LifecycleError::Revoker { .. } => Failure::new(FailureKind::Upstream, e.to_string()),
            LifecycleError::Corrupt => Failure::internal(e),
        }
    }
}

/// Whether `caller` may see that the secret `path` exists: only if it could
/// list or read it on its own (as `secret list` decides). A decommission
/// and a read set name paths the identity read, which its admin need not
/// be allowed to see.
fn visible_to(caller: &Caller, path: &str) -> bool {
    let resource = format!("secret/{path}");
    caller.set.check(&resource, Capability::List).is_some()
        || caller.set.check(&resource, Capability::Read).is_some()
}

/// Leaves out of `paths` what `caller` may not see; counts it in `hidden`.
fn only_visible(caller: &Caller, paths: &[String], hidden: &mut u32) -> Vec<String> {
    paths
        .iter()
        .filter(|p| {
            let shown = visible_to(caller, p);
            *hidden += u32::from(!shown);
            shown
        })
        .cloned()
        .collect()
}

fn decommission_message(
    run: &DecommissionRun,
    dry_run: bool,
    caller: &Caller,
) -> DecommissionResponse {
    let mut hidden = 0;
    let not_rotatable = only_visible(caller, &run.not_rotatable, &mut hidden);
    let readable_never_read = only_visible(caller, &run.readable_never_read, &mut hidden);
    let rotated: Vec<RotatedSecret> = run
        .rotated
        .iter()
        .filter(|r| {
            let shown = visible_to(caller, &r.path);
            hidden += u32::from(!shown);
            shown
        })
        .map(|r| RotatedSecret {
            path: r.path.clone(),
            run_id: r.run_id.clone(),
        })
        .collect();
    DecommissionResponse {
        hidden_paths: hidden,
        name: run.identity.clone(),
        run_id: if dry_run {
            String::new()
        } else {
            run.id.clone()
        },
        dry_run,
        done: run.is_done(),
        revoked_tokens: run.revoked_tokens,
        revoked_secret_ids: run.revoked_secret_ids,
        revoked_leases: run.revoked_leases,
        revoked_certificates: run.revoked_certificates,
        rotated,
        not_rotatable,
        readable_never_read,
        read_set_dropped: run.read_set_dropped,
        removed_bindings: run.removed_bindings,
        requested_by: run.requested_by.clone(),
    }
}

fn status_message(s: &AttestStatus) -> AttestationStatus {
    AttestationStatus {
        name: s.identity.clone(),
        owner: s.owner.clone(),
        disabled: s.disabled,
        attested_by: s.attested_by.clone(),
        attested_at: timestamp(s.attested_at_ms),
        note: s.note.clone(),
        due_at: timestamp(s.due_at_ms),
        overdue_at: timestamp(s.overdue_at_ms),
        state: s.state.as_str().to_owned(),
    }
}

#[tonic::async_trait]
impl Lifecycle for LifecycleService {
    async fn decommission(
        &self,
        req: Request<DecommissionRequest>,
    ) -> Result<Response<DecommissionResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Lifecycle/Decommission",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        call.authorize(Capability::Admin, name.resource())?;
        let caller = call.require_caller()?;
        let request_id = call.request_id().to_owned();
        let who = Requester {
            identity: &caller.identity,
            request_id: &request_id,
        };
        let done = self
            .core
            .lifecycle
            .decommission(&name, who, r.dry_run)
            .await;
        let run = call.check(done)?;
        call.ok(&[])?;
        // A dry run answers a plan (no run id) unless a run already exists.
        Ok(Response::new(decommission_message(
            &run,
            run.id.is_empty(),
            &caller,
        )))
    }

    async fn attest(
        &self,
        req: Request<AttestRequest>,
    ) -> Result<Response<AttestResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Lifecycle/Attest",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        call.authorize(Capability::Attest, name.resource())?;
        let caller = call.require_caller()?;
        let attested = self
            .core
            .lifecycle
            .attest(&name, &caller.identity, &r.note)
            .await;
        let attestation = call.check(attested)?;
        let record = call.check(self.core.identities.get(name.as_str()))?;
        let record = call.check(record.ok_or(crate::identity::IdentityError::NotFound))?;
        let status = status_of(
            &record,
            Some(&attestation),
            &self.settings,
            self.core.clock().now_ms(),
        );
        call.ok(&[])?;
        Ok(Response::new(AttestResponse {
            status: Some(status_message(&status)),
        }))
    }

    async fn attestations(
        &self,
        req: Request<AttestationsRequest>,
    ) -> Result<Response<AttestationsResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Lifecycle/Attestations",
            Access::Token,
            &req,
        )
        .await?;
        call.authorize(Capability::List, "identity".to_owned())?;
        let settings = self.settings;
        // It reads every identity record: off the connection's thread.
        let all = call
            .off_thread(Work::Listing, move |core| {
                core.lifecycle
                    .attestations(&settings, core.clock().now_ms())
            })
            .await?;
        call.ok(&[])?;
        Ok(Response::new(AttestationsResponse {
            identities: all.iter().map(status_message).collect(),
        }))
    }

    async fn reads(&self, req: Request<ReadsRequest>) -> Result<Response<ReadsResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Lifecycle/Reads",
            Access::Token,
            &req,
        )
        .await?;
        let name = call.check(IdentityName::parse(&req.get_ref().name))?;
        call.authorize(Capability::Read, name.resource())?;
        let caller = call.require_caller()?;
        let reads = call.check(self.core.reads.of(name.as_str()))?;
        call.ok(&[])?;
        let shown = reads
            .paths
            .iter()
            .filter(|(p, _, _)| visible_to(&caller, p));
        let hidden = reads.paths.len() - shown.clone().count();
        Ok(Response::new(ReadsResponse {
            name: name.as_str().to_owned(),
            hidden: u32::try_from(hidden).unwrap_or(u32::MAX),
            paths: shown
                .map(|(path, first, last)| ReadPath {
                    path: path.clone(),
                    first_read: timestamp(*first),
                    last_read: timestamp(*last),
                })
                .collect(),
            dropped: reads.dropped,
        }))
    }

    async fn suggest(
        &self,
        req: Request<SuggestRequest>,
    ) -> Result<Response<SuggestResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Lifecycle/Suggest",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let name = call.check(IdentityName::parse(&r.name))?;
        if !r.apply_as.is_empty() {
            call.check(validate_name(&r.apply_as).map_err(Failure::from))?;
        }
        call.authorize(Capability::Read, name.resource())?;
        let now = self.core.clock().now_ms();
        let since_ms = if r.since_seconds == 0 {
            0
        } else {
            now.saturating_sub(r.since_seconds.saturating_mul(1000))
        };
        let exercised: Vec<(String, String)> = self
            .core
            .usage
            .of(name.as_str())
            .map(|u| u.exercised)
            .unwrap_or_default();
        let suggestion = call.check(self.core.lifecycle.suggestion(&name, since_ms, &exercised))?;
        let document = suggestion.to_toml();
        let mut applied_as = String::new();
        if !r.apply_as.is_empty() {
            // The caller's own right to write that policy, as `policy put`;
            // and never over an existing one.
            let proof = call.authorize(Capability::Write, format!("policy/{}", r.apply_as))?;
            if call.check(self.core.policies.exists(&r.apply_as))? {
                return Err(call
                    .fail(Failure::new(
                        FailureKind::AlreadyExists,
                        format!(
                            "policy {} already exists; suggest applies only as a new policy",
                            r.apply_as
                        ),
                    ))
                    .into());
            }
            if suggestion.rules.is_empty() {
                return Err(call
                    .fail(Failure::new(
                        FailureKind::Conflict,
                        "nothing was used: an empty policy is not written",
                    ))
                    .into());
            }
            let policy =
                call.check(Policy::parse(&r.apply_as, &document).map_err(Failure::from))?;
            call.check(
                self.core
                    .policies
                    .put(&proof, &policy)
                    .map_err(|e: PolicyStoreError| Failure::from(e)),
            )?;
            call.check(self.core.barrier.durable().await)?;
            applied_as = r.apply_as.clone();
        }
        call.ok(&[])?;
        Ok(Response::new(SuggestResponse {
            name: name.as_str().to_owned(),
            document,
            rules: suggestion
                .rules
                .iter()
                .map(|rule| crate::proto::v1::SuggestedRule {
                    path: rule.path.clone(),
                    capabilities: rule
                        .capabilities
                        .iter()
                        .map(|c| c.as_str().to_owned())
                        .collect(),
                    why: rule.why.clone(),
                })
                .collect(),
            generalised: suggestion
                .generalised
                .iter()
                .map(|g| Generalisation {
                    rule: g.rule.clone(),
                    paths: g.paths.clone(),
                })
                .collect(),
            added: suggestion.added.clone(),
            removed: suggestion.removed.clone(),
            applied_as,
            review: suggestion.review.clone(),
        }))
    }
}

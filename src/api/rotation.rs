//! `keyward.v1.Rotation`: rotation policies, manual triggers, history and
//! provider registration. Maps protobuf to the broker's types; the rules
//! live in `rotation/`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::secrets::{timestamp, ROOT_LINEAGE};
use super::{begin, Access};
use crate::core::Core;
use crate::policy::Capability;
use crate::proto::v1::rotation_server::Rotation;
use crate::proto::v1::*;
use crate::rotation::policy::PolicyRecord;
use crate::rotation::providers::Registry;
use crate::rotation::reads::Setter;
use crate::rotation::record::RunRecord;
use crate::rotation::schedule::Schedule;
use crate::rotation::scheduler::spawn_run;
use crate::rotation::{Replacing, RotationError};
use crate::secrets::SecretPath;

/// The collection of registered providers; `admin` on it may replace one.
const PROVIDERS: &str = "sys/rotation/providers";

/// How long `Rotate` with `wait` waits before answering `running`.
pub const ROTATE_WAIT_LIMIT: Duration = Duration::from_secs(300);

pub struct RotationService {
    core: Arc<Core>,
}

impl RotationService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

fn resource(path: &SecretPath) -> String {
    format!("rotation/{path}")
}

pub(crate) fn policy_message(p: &PolicyRecord) -> RotationPolicy {
    RotationPolicy {
        path: p.path.clone(),
        provider: p.provider.clone(),
        every_seconds: p.every_seconds,
        cron: p.cron.clone(),
        grace_seconds: p.grace_seconds,
        settings: p.settings.clone().into_iter().collect(),
        next_due: timestamp(p.next_due_ms),
        last_run: timestamp(p.last_run_ms),
        last_state: p.last_state.clone(),
        last_error: p.last_error.clone(),
        last_success: timestamp(p.last_success_ms),
        created_at: timestamp(p.created_at_ms),
        set_by: p.set_by.clone(),
    }
}

pub(crate) fn run_message(r: &RunRecord) -> RotationRun {
    RotationRun {
        path: r.path.clone(),
        run_id: r.run_id.clone(),
        version: r.version,
        state: r.state.as_str().to_owned(),
        steps: r
            .steps
            .iter()
            .map(|s| RotationStep {
                step: s.step.name().to_owned(),
                attempt: s.attempt,
                outcome: s.outcome.as_str().to_owned(),
                version: s.version,
                message: s.message.clone(),
                at: timestamp(s.at_ms),
            })
            .collect(),
        trigger: r.trigger.as_str().to_owned(),
        started_at: timestamp(r.started_ms),
        finished_at: timestamp(r.finished_ms),
    }
}

#[tonic::async_trait]
impl Rotation for RotationService {
    async fn set_policy(
        &self,
        req: Request<SetRotationPolicyRequest>,
    ) -> Result<Response<RotationPolicy>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Rotation/SetPolicy",
            Access::Token,
            &req,
        )
        .await?;
        let caller = call.require_caller()?;
        let r = req.into_inner();
        let path = call.check(SecretPath::parse(&r.path))?;
        let schedule = call.check(
            Schedule::from_parts(r.every_seconds, &r.cron)
                .map_err(crate::rotation::policy::RotationPolicyError::from),
        )?;
        // The policy itself first, so nobody without it makes the server
        // call a plugin. The broker will replace the secret's current
        // value: whoever sets the policy must be able to write (and read)
        // that secret.
        call.authorize(Capability::Write, resource(&path))?;
        call.authorize(Capability::Read, path.resource())?;
        call.authorize(Capability::Write, path.resource())?;
        // The provider says which setting is a secret reference (an
        // external one is asked again now).
        let spec = call.check(
            self.core
                .rotation
                .check_policy(
                    &path,
                    &r.provider,
                    schedule,
                    Duration::from_secs(r.grace_seconds),
                    r.settings.into_iter().collect(),
                )
                .await,
        )?;
        // The broker reads the secret a policy names on the caller's
        // behalf: the caller must be able to read it too (and still be
        // able to at every run: the policy records who set it).
        for referenced in spec.referenced_secrets() {
            call.authorize(Capability::Read, referenced.resource())?;
        }
        // A root-lineage token without the `root` policy lends only its own
        // authority: the policy records its accessor, and runs read
        // references only while that token is live. A root-policy token's
        // authority is the vault's own (revoking the initial root token
        // after setup must not stop rotations).
        // A delegated token lends its subject's authority only for its
        // own life (minutes), not to every later run: recorded too.
        let accessor =
            if (caller.identity == ROOT_LINEAGE && !caller.is_root()) || caller.actor.is_some() {
                caller.accessor.clone()
            } else {
                String::new()
            };
        let spec =
            spec.set_by(Setter::new(caller.identity, caller.policies).with_accessor(accessor));
        call.set_resource(resource(&path));
        let record = call.check(
            self.core
                .rotation
                .set_policy(&spec, self.core.clock().now_ms()),
        )?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(policy_message(&record)))
    }

    async fn get_policy(
        &self,
        req: Request<GetRotationPolicyRequest>,
    ) -> Result<Response<RotationPolicy>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Rotation/GetPolicy",
            Access::Token,
            &req,
        )
        .await?;
        let path = call.check(SecretPath::parse(&req.get_ref().path))?;
        call.authorize(Capability::Read, resource(&path))?;
        let found = call.check(self.core.rotation.policy(&path))?;
        let record = call.check(found.ok_or(RotationError::NoPolicy))?;
        call.ok(&[])?;
        Ok(Response::new(policy_message(&record)))
    }

    async fn list_policies(
        &self,
        req: Request<ListRotationPoliciesRequest>,
    ) -> Result<Response<ListRotationPoliciesResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Rotation/ListPolicies",
            Access::Token,
            &req,
        )
        .await?;
        call.authorize(Capability::List, "rotation".to_owned())?;
        let r = req.get_ref();
        let now = self.core.clock().now_ms();
        let all = call.check(self.core.rotation.policies())?;
        let policies = all
            .iter()
            .filter(|p| !r.due || (p.next_due_ms != 0 && p.next_due_ms <= now))
            .filter(|p| !r.failed || p.last_state == "failed")
            .map(policy_message)
            .collect();
        call.ok(&[])?;
        Ok(Response::new(ListRotationPoliciesResponse { policies }))
    }

    async fn delete_policy(
        &self,
        req: Request<DeleteRotationPolicyRequest>,
    ) -> Result<Response<DeleteRotationPolicyResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Rotation/DeletePolicy",
            Access::Token,
            &req,
        )
        .await?;
        let path = call.check(SecretPath::parse(&req.get_ref().path))?;
        call.authorize(Capability::Write, resource(&path))?;
        call.check(self.core.rotation.delete_policy(&path))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(DeleteRotationPolicyResponse {}))
    }

    async fn rotate(&self, req: Request<RotateRequest>) -> Result<Response<RotationRun>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Rotation/Rotate",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        let path = call.check(SecretPath::parse(&r.path))?;
        call.authorize(Capability::Rotate, resource(&path))?;
        let broker = &self.core.rotation;
        let mut finished = broker.subscribe_finished();
        let (run, _new) = call.check(broker.trigger(&path, self.core.clock().now_ms()))?;
        call.check(self.core.barrier.durable().await)?;
        spawn_run(&self.core.rotation, run.clone(), None);
        if !r.wait {
            call.ok(&[])?;
            return Ok(Response::new(run_message(&run)));
        }
        let stop = self.core.shutdown_signal();
        let deadline = tokio::time::Instant::now() + ROTATE_WAIT_LIMIT;
        let done = loop {
            if let Some(done) = call.check(broker.finished_run(&path, &run.run_id))? {
                break done;
            }
            // The wait served the client only: once it left (`api::detach`),
            // the run goes on and the call records it as it stands.
            let over = tokio::time::Instant::now() >= deadline || stop.is_triggered();
            if over || call.client_left() {
                let now = call.check(broker.active_run(&path))?;
                break now.unwrap_or(run);
            }
            // Woken by a finished run, or look again every second (a
            // missed announcement cannot hang the call).
            tokio::select! {
                _ = finished.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait() => {}
                () = call.client_gone() => {}
            }
        };
        call.ok(&[])?;
        Ok(Response::new(run_message(&done)))
    }

    async fn history(
        &self,
        req: Request<RotationHistoryRequest>,
    ) -> Result<Response<RotationHistoryResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Rotation/History",
            Access::Token,
            &req,
        )
        .await?;
        let path = call.check(SecretPath::parse(&req.get_ref().path))?;
        call.authorize(Capability::Read, resource(&path))?;
        let runs = call.check(self.core.rotation.history(&path))?;
        call.ok(&[])?;
        Ok(Response::new(RotationHistoryResponse {
            runs: runs.iter().map(run_message).collect(),
        }))
    }

    async fn register_provider(
        &self,
        req: Request<RegisterProviderRequest>,
    ) -> Result<Response<RegisterProviderResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Rotation/RegisterProvider",
            Access::Token,
            &req,
        )
        .await?;
        let caller = call.require_caller()?;
        let r = req.into_inner();
        call.check(Registry::check_name(&r.name).map_err(RotationError::from))?;
        if r.replace {
            // Replacing a live plugin redirects every policy that uses it
            // (and the secrets they hand it): that needs the whole
            // collection, not one name.
            call.authorize(Capability::Admin, PROVIDERS.to_owned())?;
            call.set_resource(format!("{PROVIDERS}/{}", r.name));
        } else {
            call.authorize(Capability::Admin, format!("{PROVIDERS}/{}", r.name))?;
        }
        let ca = (!r.ca_pem.is_empty()).then_some(r.ca_pem.as_slice());
        let replacing = r.replace.then(|| Replacing {
            identity: &caller.identity,
            accessor: &caller.accessor,
            request_id: call.request_id(),
        });
        let registered = self
            .core
            .rotation
            .register_external(&r.name, &r.endpoint, ca, replacing)
            .await;
        let provider = call.check(registered)?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(RegisterProviderResponse {
            name: r.name,
            description: provider.description(),
            settings: provider.settings().into_iter().map(|s| s.key).collect(),
        }))
    }
}

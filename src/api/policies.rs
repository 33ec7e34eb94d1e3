//! `keyward.v1.Policies`: named policies. Resources: `policy/<name>` with
//! `write` (put), `read` (get), `delete` (delete); `policy` with `list`. The
//! check comes before the lookup, so a refusal says nothing about whether the
//! policy exists.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{begin, Access, Failure, FailureKind};
use crate::core::Core;
use crate::policy::{validate_name, Capability, Policy, ROOT_POLICY};
use crate::proto::v1::policies_server::Policies;
use crate::proto::v1::*;

pub struct PoliciesService {
    core: Arc<Core>,
}

impl PoliciesService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// A name that may be read (`root` included).
fn readable_name(name: &str) -> Result<&str, Failure> {
    if name == ROOT_POLICY {
        return Ok(name);
    }
    validate_name(name).map(|()| name).map_err(Failure::from)
}

fn resource(name: &str) -> String {
    format!("policy/{name}")
}

#[tonic::async_trait]
impl Policies for PoliciesService {
    async fn put(
        &self,
        req: Request<PutPolicyRequest>,
    ) -> Result<Response<PutPolicyResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Policies/Put", Access::Token, &req).await?;
        let r = req.get_ref();
        let name = call.check(readable_name(&r.name))?;
        let proof = call.authorize(Capability::Write, resource(name))?;
        if name == ROOT_POLICY {
            return Err(call
                .fail(crate::policy_store::PolicyStoreError::RootImmutable)
                .into());
        }
        let policy = call.check(Policy::parse(name, &r.document))?;
        call.check(self.core.policies.put(&proof, &policy))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(PutPolicyResponse {
            name: policy.name().to_owned(),
            rules: u32::try_from(policy.rules().len()).unwrap_or(u32::MAX),
        }))
    }

    async fn get(
        &self,
        req: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyDocument>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Policies/Get", Access::Token, &req).await?;
        let name = call.check(readable_name(&req.get_ref().name))?;
        call.authorize(Capability::Read, resource(name))?;
        let found = call.check(self.core.policies.get(name))?;
        let Some(policy) = found else {
            return Err(call
                .fail(Failure::new(FailureKind::NotFound, "policy not found"))
                .into());
        };
        call.ok(&[])?;
        Ok(Response::new(PolicyDocument {
            name: policy.name().to_owned(),
            document: policy.to_toml(),
        }))
    }

    async fn list(
        &self,
        req: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Policies/List", Access::Token, &req).await?;
        call.authorize(Capability::List, "policy".to_owned())?;
        let names = call.check(self.core.policies.list())?;
        call.ok(&[])?;
        Ok(Response::new(ListPoliciesResponse { names }))
    }

    async fn delete(
        &self,
        req: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Policies/Delete",
            Access::Token,
            &req,
        )
        .await?;
        let name = call.check(readable_name(&req.get_ref().name))?;
        let proof = call.authorize(Capability::Delete, resource(name))?;
        call.check(self.core.policies.delete(&proof, name))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(DeletePolicyResponse {}))
    }
}

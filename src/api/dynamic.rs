//! `keyward.v1.Dynamic`: dynamic roles and credentials. Maps protobuf to the
//! `dynamic` module's types; the rules live there.
//!
//! Authority: `admin` on `dynamic/<role>` to define or delete a role, and
//! `read` on its admin secret (the server logs in with that secret on the
//! role's behalf, so whoever defines the role must be able to read it);
//! `read` on `dynamic/<role>` to show it, `list` on `dynamic` to list;
//! `issue` on `dynamic/<role>` to get credentials.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::secrets::timestamp;
use super::{begin, Access};
use crate::core::call::{Call, Failure};
use crate::core::Core;
use crate::dynamic::{check_role_name, Holder, Issued, RoleRecord, RoleSpec};
use crate::policy::Capability;
use crate::proto::v1::dynamic_server::Dynamic;
use crate::proto::v1::*;

pub struct DynamicService {
    core: Arc<Core>,
}

impl DynamicService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

fn resource(role: &str) -> String {
    format!("dynamic/{role}")
}

fn role_message(r: &RoleRecord) -> DynamicRole {
    DynamicRole {
        name: r.name.clone(),
        provider: r.provider.clone(),
        config: r.config().into_iter().collect(),
        ttl_seconds: r.ttl_ms / 1000,
        max_ttl_seconds: r.max_ttl_ms / 1000,
        created_at: timestamp(r.created_ms),
        set_by: r.set_by.clone(),
    }
}

#[tonic::async_trait]
impl Dynamic for DynamicService {
    async fn put_role(
        &self,
        req: Request<PutDynamicRoleRequest>,
    ) -> Result<Response<DynamicRole>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Dynamic/PutRole",
            Access::Token,
            &req,
        )
        .await?;
        let caller = call.require_caller()?;
        let r = req.into_inner();
        call.check(check_role_name(&r.name))?;
        let proof = call.authorize(Capability::Admin, resource(&r.name))?;
        let config: BTreeMap<String, String> = r.config.into_iter().collect();
        let spec = call.check(RoleSpec::parse(
            &r.name,
            &r.provider,
            &config,
            Duration::from_secs(r.ttl_seconds),
            Duration::from_secs(r.max_ttl_seconds),
        ))?;
        // The server will log in with the admin secret for whoever issues
        // from this role: the one defining it must be able to read it.
        if let Some(admin) = &spec.admin_secret {
            call.authorize(Capability::Read, admin.resource())?;
        }
        call.set_resource(resource(&r.name));
        call.check(self.core.dynamic.check_target(&spec).await)?;
        let record = call.check(self.core.dynamic.put_role(&proof, &spec, &caller.identity))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(role_message(&record)))
    }

    async fn get_role(
        &self,
        req: Request<GetDynamicRoleRequest>,
    ) -> Result<Response<DynamicRole>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Dynamic/GetRole",
            Access::Token,
            &req,
        )
        .await?;
        let name = req.get_ref().name.clone();
        call.check(check_role_name(&name))?;
        call.authorize(Capability::Read, resource(&name))?;
        let record = call.check(self.core.dynamic.get_role(&name))?;
        call.ok(&[])?;
        Ok(Response::new(role_message(&record)))
    }

    async fn list_roles(
        &self,
        req: Request<ListDynamicRolesRequest>,
    ) -> Result<Response<ListDynamicRolesResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Dynamic/ListRoles",
            Access::Token,
            &req,
        )
        .await?;
        call.authorize(Capability::List, "dynamic".to_owned())?;
        let names = call.check(self.core.dynamic.list_roles())?;
        call.ok(&[])?;
        Ok(Response::new(ListDynamicRolesResponse { names }))
    }

    async fn delete_role(
        &self,
        req: Request<DeleteDynamicRoleRequest>,
    ) -> Result<Response<DeleteDynamicRoleResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Dynamic/DeleteRole",
            Access::Token,
            &req,
        )
        .await?;
        let name = req.get_ref().name.clone();
        call.check(check_role_name(&name))?;
        let proof = call.authorize(Capability::Admin, resource(&name))?;
        call.check(self.core.dynamic.delete_role(&proof, &name))?;
        call.check(self.core.barrier.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(DeleteDynamicRoleResponse {}))
    }

    async fn creds(&self, req: Request<CredsRequest>) -> Result<Response<CredsResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Dynamic/Creds", Access::Token, &req).await?;
        let r = req.into_inner();
        let ttl = (r.ttl_seconds != 0).then(|| Duration::from_secs(r.ttl_seconds));
        let issued = issue_creds(&self.core, &mut call, &r.role, ttl).await?;
        let password = issued.password.expose_str().unwrap_or_default().to_owned();
        call.ok(&[("password", password.as_bytes())])?;
        let lease = issued.lease;
        Ok(Response::new(CredsResponse {
            lease_id: lease.id,
            username: lease.username,
            password,
            host: lease.host,
            port: lease.port,
            database: lease.database,
            expires_at: timestamp(lease.expires_ms),
            renewable: true,
        }))
    }
}

/// `Creds` up to its answer, for both transports (the Vault API's
/// `database/creds/<role>` too): `issue` on `dynamic/<role>`, a lease held
/// by the calling token that never outlives it. The caller answers with
/// [`Call::ok`] naming the password.
pub async fn issue_creds(
    core: &Arc<Core>,
    call: &mut Call,
    role: &str,
    ttl: Option<Duration>,
) -> Result<Issued, Failure> {
    let caller = call.require_caller()?;
    call.check(check_role_name(role))?;
    let proof = call.authorize(Capability::Issue, resource(role))?;
    // The lease never outlives the token: its current end and its
    // latest possible one (renewals included).
    let now = core.clock().now_ms();
    let token = call.check(core.tokens.lookup_accessor(&caller.accessor, now))?;
    let token = call.check(token.ok_or(crate::core::AuthError::BadToken))?;
    let holder = Holder {
        accessor: caller.accessor.clone(),
        identity: caller.identity.clone(),
        expires_ms: token.expires_at_ms,
        max_expiry_ms: token.max_expiry_ms,
    };
    let issued = call.check(core.dynamic.issue(&proof, role, ttl, &holder).await)?;
    // A token revoked while this call ran may have been told of its
    // leases before this one was written: look again, and undo.
    let now = core.clock().now_ms();
    let still = call.check(core.tokens.lookup_accessor(&caller.accessor, now))?;
    if still.is_none() {
        let _ = core.leases.revoke(&issued.lease.id).await;
        return Err(call.fail(crate::core::AuthError::BadToken));
    }
    Ok(issued)
}

//! Client calls of `keyward.v1.Dynamic`: dynamic roles and credentials.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::dynamic_client::DynamicClient;
use crate::proto::v1::*;

/// A dynamic role to define.
#[derive(Debug, Clone)]
pub struct DynamicRoleSpec {
    pub name: String,
    /// `postgres`, `mysql`, `redis`, or a registered plugin that serves
    /// `Create`/`Revoke`.
    pub provider: String,
    /// `admin_secret=PATH`, `roles=r1,r2`, `acl=RULES`; a plugin's own keys.
    pub config: BTreeMap<String, String>,
    pub ttl: Duration,
    pub max_ttl: Duration,
}

impl Client {
    fn dynamic(&self) -> DynamicClient<Channel> {
        DynamicClient::new(self.channel.clone())
    }

    pub async fn dynamic_role_put(
        &self,
        spec: &DynamicRoleSpec,
    ) -> Result<DynamicRole, ClientError> {
        let req = self.request(PutDynamicRoleRequest {
            name: spec.name.clone(),
            provider: spec.provider.clone(),
            config: spec.config.clone().into_iter().collect(),
            ttl_seconds: spec.ttl.as_secs(),
            max_ttl_seconds: spec.max_ttl.as_secs(),
        });
        Ok(self.dynamic().put_role(req).await?.into_inner())
    }

    pub async fn dynamic_role_get(&self, name: &str) -> Result<DynamicRole, ClientError> {
        let req = self.request(GetDynamicRoleRequest {
            name: name.to_owned(),
        });
        Ok(self.dynamic().get_role(req).await?.into_inner())
    }

    pub async fn dynamic_role_list(&self) -> Result<Vec<String>, ClientError> {
        let req = self.request(ListDynamicRolesRequest {});
        Ok(self.dynamic().list_roles(req).await?.into_inner().names)
    }

    pub async fn dynamic_role_delete(&self, name: &str) -> Result<(), ClientError> {
        let req = self.request(DeleteDynamicRoleRequest {
            name: name.to_owned(),
        });
        self.dynamic().delete_role(req).await?;
        Ok(())
    }

    /// A new credential from `role` under a lease this client's token
    /// holds; `ttl` defaults to the role's.
    pub async fn creds(
        &self,
        role: &str,
        ttl: Option<Duration>,
    ) -> Result<CredsResponse, ClientError> {
        let req = self.request(CredsRequest {
            role: role.to_owned(),
            ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
        });
        Ok(self.dynamic().creds(req).await?.into_inner())
    }
}

//! Client calls of `keyward.v1.Policies`.

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::policies_client::PoliciesClient;
use crate::proto::v1::*;

impl Client {
    fn policies(&self) -> PoliciesClient<Channel> {
        PoliciesClient::new(self.channel.clone())
    }

    /// Stores a policy from its TOML document; returns its number of rules.
    pub async fn policy_put(&self, name: &str, document: &str) -> Result<u32, ClientError> {
        let req = self.request(PutPolicyRequest {
            name: name.to_owned(),
            document: document.to_owned(),
        });
        Ok(self.policies().put(req).await?.into_inner().rules)
    }

    /// A policy's TOML document.
    pub async fn policy_get(&self, name: &str) -> Result<String, ClientError> {
        let req = self.request(GetPolicyRequest {
            name: name.to_owned(),
        });
        Ok(self.policies().get(req).await?.into_inner().document)
    }

    pub async fn policy_list(&self) -> Result<Vec<String>, ClientError> {
        let req = self.request(ListPoliciesRequest {});
        Ok(self.policies().list(req).await?.into_inner().names)
    }

    pub async fn policy_delete(&self, name: &str) -> Result<(), ClientError> {
        let req = self.request(DeletePolicyRequest {
            name: name.to_owned(),
        });
        self.policies().delete(req).await?;
        Ok(())
    }
}

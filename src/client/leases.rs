//! Client calls of `keyward.v1.Leases`.

use std::time::Duration;

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::leases_client::LeasesClient;
use crate::proto::v1::*;

impl Client {
    fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    pub async fn lease_lookup(&self, id: &str) -> Result<Lease, ClientError> {
        let req = self.request(LeaseLookupRequest {
            lease_id: id.to_owned(),
        });
        Ok(self.leases().lookup(req).await?.into_inner())
    }

    /// Leases under `prefix` (e.g. `dynamic/app`; empty for all); with
    /// `failed`, only those whose revocation is failing.
    pub async fn lease_list(&self, prefix: &str, failed: bool) -> Result<Vec<Lease>, ClientError> {
        let req = self.request(LeaseListRequest {
            prefix: prefix.to_owned(),
            failed,
        });
        Ok(self.leases().list(req).await?.into_inner().leases)
    }

    pub async fn lease_renew(
        &self,
        id: &str,
        increment: Option<Duration>,
    ) -> Result<Lease, ClientError> {
        let req = self.request(LeaseRenewRequest {
            lease_id: id.to_owned(),
            increment_seconds: increment.map_or(0, |d| d.as_secs()),
        });
        Ok(self.leases().renew(req).await?.into_inner())
    }

    /// Revokes one lease; returns (revoked, pending).
    pub async fn lease_revoke(&self, id: &str) -> Result<(u32, u32), ClientError> {
        let req = self.request(LeaseRevokeRequest {
            lease_id: id.to_owned(),
            prefix: String::new(),
        });
        let r = self.leases().revoke(req).await?.into_inner();
        Ok((r.revoked, r.pending))
    }

    /// Revokes every lease under `prefix`; returns (revoked, pending).
    pub async fn lease_revoke_prefix(&self, prefix: &str) -> Result<(u32, u32), ClientError> {
        let req = self.request(LeaseRevokeRequest {
            lease_id: String::new(),
            prefix: prefix.to_owned(),
        });
        let r = self.leases().revoke(req).await?.into_inner();
        Ok((r.revoked, r.pending))
    }
}

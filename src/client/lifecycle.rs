//! Calls of the `Lifecycle` service: decommission, attestation, read sets,
//! policy suggestions.

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::lifecycle_client::LifecycleClient;
use crate::proto::v1::*;

impl Client {
    fn lifecycle(&self) -> LifecycleClient<Channel> {
        LifecycleClient::new(self.channel.clone())
    }

    /// Decommissions an identity (or, with `dry_run`, says what it would do).
    pub async fn identity_decommission(
        &self,
        name: &str,
        dry_run: bool,
    ) -> Result<DecommissionResponse, ClientError> {
        let req = self.request(DecommissionRequest {
            name: name.to_owned(),
            dry_run,
        });
        Ok(self.lifecycle().decommission(req).await?.into_inner())
    }

    /// Records the caller's attestation of an identity.
    pub async fn identity_attest(
        &self,
        name: &str,
        note: &str,
    ) -> Result<AttestationStatus, ClientError> {
        let req = self.request(AttestRequest {
            name: name.to_owned(),
            note: note.to_owned(),
        });
        Ok(self
            .lifecycle()
            .attest(req)
            .await?
            .into_inner()
            .status
            .unwrap_or_default())
    }

    /// Every identity's recertification standing.
    pub async fn identity_attestations(&self) -> Result<Vec<AttestationStatus>, ClientError> {
        let req = self.request(AttestationsRequest {});
        Ok(self
            .lifecycle()
            .attestations(req)
            .await?
            .into_inner()
            .identities)
    }

    /// The secret paths an identity read.
    pub async fn identity_reads(&self, name: &str) -> Result<ReadsResponse, ClientError> {
        let req = self.request(ReadsRequest {
            name: name.to_owned(),
        });
        Ok(self.lifecycle().reads(req).await?.into_inner())
    }

    /// A policy of what an identity used; with `apply_as`, stored under it.
    pub async fn policy_suggest(
        &self,
        name: &str,
        since_seconds: u64,
        apply_as: Option<&str>,
    ) -> Result<SuggestResponse, ClientError> {
        let req = self.request(SuggestRequest {
            name: name.to_owned(),
            since_seconds,
            apply_as: apply_as.unwrap_or_default().to_owned(),
        });
        Ok(self.lifecycle().suggest(req).await?.into_inner())
    }
}

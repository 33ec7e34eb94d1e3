//! Anomalies (issue 13): `Governance.ListAnomalies` and
//! `Governance.WatchAnomalies`. Both need `read` on `sys/anomalies`.

use crate::proto::v1::governance_client::GovernanceClient;
use crate::proto::v1::{Anomaly, ListAnomaliesRequest, WatchAnomaliesRequest};

use super::{Client, ClientError};

/// A stream of anomalies as they are detected.
pub type AnomalyStream = tonic::Streaming<Anomaly>;

impl Client {
    /// The anomalies kept, oldest first: of `identity` if given, within
    /// `within` before the server's now (`None`: all), at most the newest
    /// `limit` (0: all).
    pub async fn list_anomalies(
        &self,
        identity: Option<&str>,
        within: Option<std::time::Duration>,
        limit: u32,
    ) -> Result<Vec<Anomaly>, ClientError> {
        let req = self.request(ListAnomaliesRequest {
            identity: identity.unwrap_or_default().to_owned(),
            since_unix_ms: 0,
            limit,
            within_seconds: within.map_or(0, |d| d.as_secs().max(1)),
        });
        Ok(GovernanceClient::new(self.channel.clone())
            .list_anomalies(req)
            .await?
            .into_inner()
            .anomalies)
    }

    /// Anomalies from now on (of `identity` if given).
    pub async fn watch_anomalies(
        &self,
        identity: Option<&str>,
    ) -> Result<AnomalyStream, ClientError> {
        let req = self.request(WatchAnomaliesRequest {
            identity: identity.unwrap_or_default().to_owned(),
        });
        Ok(GovernanceClient::new(self.channel.clone())
            .watch_anomalies(req)
            .await?
            .into_inner())
    }
}

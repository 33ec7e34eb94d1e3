//! Calls of the `Scan` service: which stored secrets hold candidate values.

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::scan_client::ScanClient;
use crate::proto::v1::*;

impl Client {
    fn scan(&self) -> ScanClient<Channel> {
        ScanClient::new(self.channel.clone())
    }

    /// Matches candidate values (at most 1000 a call) against the stored
    /// fingerprints. The values travel only to the server, over TLS.
    pub async fn scan_match(
        &self,
        candidates: Vec<String>,
    ) -> Result<ScanMatchResponse, ClientError> {
        let req = self.request(ScanMatchRequest { candidates });
        Ok(self.scan().r#match(req).await?.into_inner())
    }
}

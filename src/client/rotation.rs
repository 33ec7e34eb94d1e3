//! Client calls of the `Rotation` service and of `Secrets.Watch`.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::Channel;

use super::{Client, ClientError};
use crate::proto::v1::rotation_client::RotationClient;
use crate::proto::v1::secrets_client::SecretsClient;
use crate::proto::v1::*;

/// When a policy's rotations are due, as the client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleSpec {
    /// `--every D` (at least 1 s).
    Every(Duration),
    /// `--cron EXPR` (UTC; 5 fields, or 6 with seconds first).
    Cron(String),
}

/// A rotation policy to set.
#[derive(Debug, Clone)]
pub struct RotationPolicySpec {
    pub provider: String,
    pub schedule: ScheduleSpec,
    pub grace: Duration,
    /// `--config KEY=VALUE` pairs: references to secrets, never credentials.
    pub settings: BTreeMap<String, String>,
}

/// A stream of new `current` versions; see [`Client::watch`].
pub type WatchStream = tonic::Streaming<WatchEvent>;

impl Client {
    fn rotation(&self) -> RotationClient<Channel> {
        RotationClient::new(self.channel.clone())
    }

    pub async fn set_rotation_policy(
        &self,
        path: &str,
        spec: &RotationPolicySpec,
    ) -> Result<RotationPolicy, ClientError> {
        let (every_seconds, cron) = match &spec.schedule {
            ScheduleSpec::Every(d) => (d.as_secs(), String::new()),
            ScheduleSpec::Cron(c) => (0, c.clone()),
        };
        let req = self.request(SetRotationPolicyRequest {
            path: path.to_owned(),
            provider: spec.provider.clone(),
            every_seconds,
            cron,
            grace_seconds: spec.grace.as_secs(),
            settings: spec.settings.clone().into_iter().collect(),
        });
        Ok(self.rotation().set_policy(req).await?.into_inner())
    }

    pub async fn rotation_policy(&self, path: &str) -> Result<RotationPolicy, ClientError> {
        let req = self.request(GetRotationPolicyRequest {
            path: path.to_owned(),
        });
        Ok(self.rotation().get_policy(req).await?.into_inner())
    }

    /// Every policy; `due`: only those due now; `failed`: only those whose
    /// last rotation failed.
    pub async fn rotation_policies(
        &self,
        due: bool,
        failed: bool,
    ) -> Result<Vec<RotationPolicy>, ClientError> {
        let req = self.request(ListRotationPoliciesRequest { due, failed });
        Ok(self
            .rotation()
            .list_policies(req)
            .await?
            .into_inner()
            .policies)
    }

    pub async fn delete_rotation_policy(&self, path: &str) -> Result<(), ClientError> {
        let req = self.request(DeleteRotationPolicyRequest {
            path: path.to_owned(),
        });
        self.rotation().delete_policy(req).await?;
        Ok(())
    }

    /// Starts a rotation now. With `wait`, answers once it has finished:
    /// `state` is `succeeded` or `failed` (and then `current` is unchanged).
    pub async fn rotate(&self, path: &str, wait: bool) -> Result<RotationRun, ClientError> {
        let req = self.request(RotateRequest {
            path: path.to_owned(),
            wait,
        });
        Ok(self.rotation().rotate(req).await?.into_inner())
    }

    /// Runs of a secret, newest first (the one in progress included).
    pub async fn rotation_history(&self, path: &str) -> Result<Vec<RotationRun>, ClientError> {
        let req = self.request(RotationHistoryRequest {
            path: path.to_owned(),
        });
        Ok(self.rotation().history(req).await?.into_inner().runs)
    }

    /// Registers an external provider (`unix:PATH` or `https://...`). A
    /// name that is registered already is `ALREADY_EXISTS`: see
    /// [`Client::replace_provider`].
    pub async fn register_provider(
        &self,
        name: &str,
        endpoint: &str,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<RegisterProviderResponse, ClientError> {
        self.send_register_provider(name, endpoint, ca_pem, false)
            .await
    }

    /// Registers an external provider under `name`, replacing the endpoint
    /// of one registered already (`provider register --replace`). Needs
    /// `admin` on `sys/rotation/providers`; audited with both endpoints.
    pub async fn replace_provider(
        &self,
        name: &str,
        endpoint: &str,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<RegisterProviderResponse, ClientError> {
        self.send_register_provider(name, endpoint, ca_pem, true)
            .await
    }

    async fn send_register_provider(
        &self,
        name: &str,
        endpoint: &str,
        ca_pem: Option<Vec<u8>>,
        replace: bool,
    ) -> Result<RegisterProviderResponse, ClientError> {
        let req = self.request(RegisterProviderRequest {
            name: name.to_owned(),
            endpoint: endpoint.to_owned(),
            ca_pem: ca_pem.unwrap_or_default(),
            replace,
        });
        Ok(self.rotation().register_provider(req).await?.into_inner())
    }

    /// A stream of new `current` versions of `paths` and of every path
    /// under `prefixes`. Events carry the version number only; read it with
    /// [`Client::get`]. See [`super::FreshSecret`] for a secret kept fresh.
    pub async fn watch(
        &self,
        paths: &[&str],
        prefixes: &[&str],
    ) -> Result<WatchStream, ClientError> {
        let req = self.request(WatchRequest {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
        });
        Ok(SecretsClient::new(self.channel.clone())
            .watch(req)
            .await?
            .into_inner())
    }
}

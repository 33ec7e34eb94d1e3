//! `keyward.v1.Governance`: the report of DESIGN.md. Needs `read` on
//! `sys/governance`. The identity figures come from `Core::governance_report`,
//! the rotation figures from the rotation broker's summary.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{begin, Access};
use crate::core::call::Failure;
use crate::core::offload::Work;
use crate::core::Core;
use crate::policy::Capability;
use crate::proto::v1::governance_server::Governance;
use crate::proto::v1::*;

pub struct GovernanceService {
    core: Arc<Core>,
}

impl GovernanceService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl Governance for GovernanceService {
    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Governance/Report",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        call.authorize(Capability::Read, "sys/governance".to_owned())?;
        let dormant_after_ms = r.dormant_after_seconds.saturating_mul(1000);
        let long_ttl = Duration::from_secs(r.long_ttl_seconds);
        // It reads every identity and token record: off the connection's thread.
        let (report, rotation, pki, lease_revocations_failing) = call
            .off_thread(Work::Report, move |core| -> Result<_, Failure> {
                let now = core.clock().now_ms();
                Ok((
                    core.governance_report(dormant_after_ms, long_ttl)?,
                    core.rotation.rotation_summary(now)?,
                    core.pki
                        .figures(crate::governance::EXPIRING_WITHIN_MS, now)?,
                    core.leases.failed_count()? as u64,
                ))
            })
            .await?;
        let anomalies_recent = self
            .core
            .anomalies
            .counts(
                self.core
                    .clock()
                    .now_ms()
                    .saturating_sub(ANOMALY_REPORT_WINDOW_MS),
            )
            .into_iter()
            .map(|(kind, count)| CountByKey {
                key: kind.as_str().to_owned(),
                count,
            })
            .collect();
        call.ok(&[])?;
        let failures: std::collections::HashMap<&str, &str> = rotation
            .last_failures
            .iter()
            .map(|(path, message)| (path.as_str(), message.as_str()))
            .collect();
        let overdue_rotations = rotation
            .overdue
            .iter()
            .map(|(path, due_ms)| RotationStatus {
                path: path.clone(),
                due_at_unix: due_ms / 1000,
                last_failure: failures
                    .get(path.as_str())
                    .copied()
                    .unwrap_or("")
                    .to_owned(),
            })
            .collect();
        Ok(Response::new(ReportResponse {
            identities_total: report.identities_total,
            identities_by_kind: report
                .by_kind
                .into_iter()
                .map(|(key, count)| CountByKey { key, count })
                .collect(),
            unowned: report.unowned,
            dormant: report.dormant,
            unused_grants: report
                .unused_grants
                .into_iter()
                .map(|g| IdentityGrants {
                    identity: g.identity,
                    unused_rules: g.rules,
                })
                .collect(),
            long_lived_tokens: report
                .long_lived
                .into_iter()
                .map(|t| LongLivedToken {
                    accessor: t.accessor,
                    identity: t.identity,
                    ttl_seconds: t.ttl_seconds,
                })
                .collect(),
            expiring_soon: report
                .expiring_soon
                .into_iter()
                .map(|e| ExpiringCredential {
                    kind: e.kind.to_owned(),
                    name: e.name,
                    identity: e.identity,
                    expires_at_unix: e.expires_at_ms / 1000,
                })
                .collect(),
            failed_logins: report
                .failed_logins
                .into_iter()
                .map(|f| FailedLogins {
                    identity: f.identity,
                    source: f.source,
                    count: f.count,
                })
                .collect(),
            overdue_rotations,
            rotation_compliance: rotation.compliance,
            rotation_failures: rotation
                .last_failures
                .iter()
                .map(|(path, message)| RotationStatus {
                    path: path.clone(),
                    due_at_unix: 0,
                    last_failure: message.clone(),
                })
                .collect(),
            certificates_by_role: pki
                .valid_by_role
                .into_iter()
                .map(|(key, count)| CountByKey { key, count })
                .collect(),
            certificates_expiring_soon: pki.expiring_soon,
            certificates_revoked: pki.revoked,
            lease_revocations_failing,
            identity_tokens_issued: report
                .identity_tokens_issued
                .into_iter()
                .map(|(role, audience, count)| IdentityTokenCount {
                    role,
                    audience,
                    count,
                })
                .collect(),
            delegations_by_agent: report
                .delegations_by_agent
                .into_iter()
                .map(|(key, count)| CountByKey { key, count })
                .collect(),
            delegations_by_delegator: report
                .delegations_by_delegator
                .into_iter()
                .map(|(key, count)| CountByKey { key, count })
                .collect(),
            anomalies_recent,
        }))
    }

    /// The anomalies kept, oldest first. Needs `read` on `sys/anomalies`.
    async fn list_anomalies(
        &self,
        req: Request<ListAnomaliesRequest>,
    ) -> Result<Response<ListAnomaliesResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Governance/ListAnomalies",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        call.authorize(Capability::Read, ANOMALIES_RESOURCE.to_owned())?;
        let identity = (!r.identity.is_empty()).then_some(r.identity.as_str());
        let within = match r.within_seconds {
            0 => 0,
            s => self
                .core
                .clock()
                .now_ms()
                .saturating_sub(s.saturating_mul(1000)),
        };
        let anomalies = self
            .core
            .anomalies
            .list(identity, r.since_unix_ms.max(within), r.limit as usize)
            .into_iter()
            .map(anomaly_message)
            .collect();
        call.ok(&[])?;
        Ok(Response::new(ListAnomaliesResponse { anomalies }))
    }

    type WatchAnomaliesStream = tokio_stream::wrappers::ReceiverStream<Result<Anomaly, Status>>;

    /// Anomalies as they are detected. Needs `read` on `sys/anomalies`,
    /// checked again (with the token) before each event is sent: a revoked
    /// token or a narrowed policy ends the stream. Ends at shutdown, or with
    /// ABORTED if the watcher fell behind by more than
    /// `anomaly::WATCH_BUFFER` events.
    async fn watch_anomalies(
        &self,
        req: Request<WatchAnomaliesRequest>,
    ) -> Result<Response<Self::WatchAnomaliesStream>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Governance/WatchAnomalies",
            Access::Token,
            &req,
        )
        .await?;
        let r = req.into_inner();
        call.authorize(Capability::Read, ANOMALIES_RESOURCE.to_owned())?;
        let mut caller = call.require_caller()?;
        // Subscribe before answering, so nothing after the answer is missed.
        let mut events = self.core.anomalies.subscribe();
        call.ok(&[])?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let core = self.core.clone();
        let stop = core.shutdown_signal();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    got = events.recv() => got,
                    _ = tx.closed() => break,
                    _ = stop.wait() => break,
                };
                let event = match event {
                    Ok(event) => event,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let behind = Status::aborted(
                            "the watcher fell behind; list the anomalies and watch again",
                        );
                        let _ = tx.send(Err(behind)).await;
                        break;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if !r.identity.is_empty() && event.identity.as_deref() != Some(&r.identity) {
                    continue;
                }
                // The token and its policies as they stand now.
                let still = core.gate.refresh(&caller).and_then(|fresh| {
                    core.gate
                        .authorize(&fresh, Capability::Read, ANOMALIES_RESOURCE)
                        .map(|_| fresh)
                });
                match still {
                    Ok(fresh) => caller = fresh,
                    Err(e) => {
                        let ended = Status::from(crate::core::call::Failure::from(e));
                        let _ = tx.send(Err(ended)).await;
                        break;
                    }
                }
                let sent = tokio::select! {
                    sent = tx.send(Ok(anomaly_message(event))) => sent.is_ok(),
                    _ = stop.wait() => false,
                };
                if !sent {
                    break;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// The report's `anomalies_recent` counts events of this long (24 h).
const ANOMALY_REPORT_WINDOW_MS: u64 = 24 * 3_600_000;

/// The resource of `anomalies list` and `WatchAnomalies`.
pub const ANOMALIES_RESOURCE: &str = "sys/anomalies";

fn anomaly_message(e: crate::anomaly::Event) -> Anomaly {
    Anomaly {
        id: e.id,
        at_unix_ms: e.at_ms,
        kind: e.kind.as_str().to_owned(),
        identity: e.identity.unwrap_or_default(),
        accessor: e.accessor.unwrap_or_default(),
        source: e.source.unwrap_or_default(),
        detail: e.detail,
        response: e.response,
    }
}

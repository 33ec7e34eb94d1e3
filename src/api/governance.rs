//! `keyward.v1.Governance`: the report of DESIGN.md. Needs `read` on
//! `sys/governance`. The identity figures come from `Core::governance_report`,
//! the rotation figures from the rotation broker's summary.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{begin, Access};
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
        let report = call.check(self.core.governance_report(
            r.dormant_after_seconds.saturating_mul(1000),
            Duration::from_secs(r.long_ttl_seconds),
        ))?;
        let rotation = call.check(
            self.core
                .rotation
                .rotation_summary(self.core.clock().now_ms()),
        )?;
        let pki = call.check(self.core.pki.figures(
            crate::governance::EXPIRING_WITHIN_MS,
            self.core.clock().now_ms(),
        ))?;
        let lease_revocations_failing = call.check(self.core.leases.failed_count())? as u64;
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
        }))
    }
}

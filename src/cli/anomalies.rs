//! `keyward anomalies list [--identity N] [--since D] [--format table|json]`
//! (needs `read` on `sys/anomalies`).

use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Value};

use super::common::connect;
use super::output::{emit, Format};
use super::{Global, UsageError};
use keyward::proto::v1::Anomaly;

#[derive(Subcommand)]
pub enum AnomaliesCommand {
    /// The anomalies detected, oldest first.
    List {
        /// Only this identity's.
        #[arg(long, value_name = "N")]
        identity: Option<String>,
        /// Only those of the last D (e.g. 24h, 7d), by the server's clock.
        #[arg(long, value_name = "D")]
        since: Option<String>,
        /// At most the newest N.
        #[arg(long, value_name = "N", default_value_t = 0)]
        limit: u32,
    },
}

fn at_text(ms: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn anomaly_json(a: &Anomaly) -> Value {
    let text = |s: &str| {
        if s.is_empty() {
            Value::Null
        } else {
            Value::String(s.to_owned())
        }
    };
    json!({
        "id": a.id, "at": at_text(a.at_unix_ms), "kind": a.kind,
        "identity": text(&a.identity), "accessor": text(&a.accessor),
        "source": text(&a.source), "detail": a.detail, "response": a.response,
    })
}

pub async fn anomalies(g: &Global, format: Format, cmd: AnomaliesCommand) -> Result<()> {
    match cmd {
        AnomaliesCommand::List {
            identity,
            since,
            limit,
        } => {
            let within = match &since {
                None => None,
                Some(text) => Some(
                    keyward::duration::parse(text)
                        .map_err(|e| UsageError(format!("--since: {e}")))?,
                ),
            };
            let list = connect(g)
                .await?
                .list_anomalies(identity.as_deref(), within, limit)
                .await?;
            match format {
                Format::Json => {
                    let items: Vec<Value> = list.iter().map(anomaly_json).collect();
                    emit(Format::Json, &json!({ "anomalies": items }));
                }
                Format::Table => {
                    if list.is_empty() {
                        println!("no anomalies");
                    }
                    for a in &list {
                        let who = if a.identity.is_empty() {
                            "-"
                        } else {
                            a.identity.as_str()
                        };
                        let source = if a.source.is_empty() {
                            "-"
                        } else {
                            a.source.as_str()
                        };
                        println!(
                            "{}  {:<14} {:<24} {:<16} {}  [{}]",
                            at_text(a.at_unix_ms),
                            a.kind,
                            who,
                            source,
                            a.detail,
                            a.response
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

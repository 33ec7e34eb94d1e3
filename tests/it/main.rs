//! Integration tests: one binary of modules. Every test starts a real keyward
//! server on 127.0.0.1 port 0 over TLS (in process, or as a child process
//! where a crash is part of the test) and talks to it through the public
//! client that the CLI uses.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../support/db_target.rs"]
#[allow(dead_code)]
mod db_target;
mod harness;
mod http_client;
mod ident_kit;
mod identities;
#[path = "../support/pg_cluster.rs"]
#[allow(dead_code)]
mod pg_cluster;
#[path = "../support/plugin.rs"]
mod plugin;

mod audit;
#[cfg(feature = "etcd")]
mod backend_contract;
mod certs;
mod cidr;
mod cli;
mod crash;
mod delegation_exchange;
mod dynamic_crash;
mod dynamic_creds;
#[cfg(feature = "etcd")]
mod etcd_attack;
#[cfg(feature = "etcd")]
mod etcd_batches;
#[cfg(feature = "etcd")]
mod etcd_caches;
#[cfg(feature = "etcd")]
mod etcd_cluster;
#[cfg(feature = "etcd")]
mod etcd_compaction;
#[cfg(feature = "etcd")]
mod etcd_gather;
#[cfg(feature = "etcd")]
mod etcd_gather_attack;
#[cfg(feature = "etcd")]
#[path = "../support/etcd_kit.rs"]
#[allow(dead_code)]
mod etcd_kit;
#[cfg(feature = "etcd")]
mod etcd_nodes;
#[cfg(feature = "etcd")]
mod etcd_read_lease;
#[cfg(feature = "etcd")]
mod etcd_reads;
#[cfg(feature = "etcd")]
mod etcd_tokens;
mod fed17_attack;
mod federation_claims;
mod federation_figures;
mod federation_issuer;
mod federation_rotation;
mod governance;
mod http_attack;
mod http_clients;
mod http_kv;
mod http_sys;
mod http_token;
mod leaks;
mod lifecycle_access;
mod lifecycle_cli;
mod lifecycle_crash;
mod lifecycle_decommission;
mod lifecycle_recert;
mod login;
mod ops_attack;
mod ops_audit;
mod ops_snapshot;
mod ops_upgrade;
mod perf2_audit_mac;
mod pki_access;
mod pki_chain;
mod pki_cli;
mod pki_kit;
mod pki_login;
mod policies;
mod review_hot_path;
mod review_trust;
mod rotation;
mod scan;
mod scan_attack;
mod seal;
mod secrets;
mod server;
mod tokens;
mod trust_audit;
mod trust_identity;
mod trust_limits;
mod trust_oidc;
mod trust_rotation;
// The Vault API's dynamic credentials, leases, PKI and refusals.
mod http_attack15;
mod http_dynamic;
mod http_pki;
mod http_prelude;
// -- anomaly detection (issue 13) --
mod anomaly;
mod ui;

mod anomaly_attack;
mod decommission_creds;
mod dyn12_attack;
mod dyn_attack2;
mod dynamic_plugin;
mod dynamic_pool;
mod dynamic_refresh;
mod dynpool_attack;
mod ui_attack;

// issue 14: cluster-wide counters
#[cfg(feature = "etcd")]
mod ha_counters;

// Leader election, fencing, cluster status (issue 14).
#[cfg(feature = "etcd")]
#[path = "../support/ha_kit.rs"]
#[allow(dead_code)]
mod ha_kit;
#[cfg(feature = "etcd")]
mod ha_leader;
#[cfg(feature = "etcd")]
mod ha_members;

//! keyward: a secrets vault and rotation broker for non-human identities.
//!
//! # Layout
//!
//! The modules follow the layers of DESIGN.md; an arrow only points down, and
//! `../shared/tools/layers.py src` checks it.
//!
//! ```text
//!  cli (through client)   api (gRPC)   http (Vault-compatible HTTPS, OIDC discovery)
//!                     \           |          /       (wire <-> domain, FailureKind -> code/status)
//!      server (listeners, task set, TLS)   core (Call: begin -> authorize -> act -> audit)
//!                                   |
//!  secrets  identity  token  policy_store  rotation  governance  lease  dynamic
//!  pki  federation  lifecycle  snapshot  anomaly                      (domain)
//!                                   |
//!           audit   barrier (seal, keyring, AES-256-GCM)   metrics
//!                                   |
//!                     storage (Backend trait, sled, etcd, format versions, export)
//!  leaves: clock (Clock, Shutdown), policy, oidc, cidr, duration, secrecy, proto, config,
//!          scan (the discovery scan's detectors and walks; only `token::format` below it)
//! ```
//!
//! - `cli` — the command line; it talks to a server only through `client`
//!   (shared helpers in `cli/common.rs`; `dev` and `server` in `cli/serve.rs`).
//! - `client` — the public client that the CLI, examples and applications
//!   use; it shares only `proto` and `secrecy` with the server.
//! - `api` — one file per gRPC service: reads the request's metadata into a
//!   `core::call::RequestMeta`, parses protobuf into domain types, calls the
//!   domain, and maps `core::call::FailureKind` to a gRPC code in one function.
//!   `api/detach.rs` is the layer both listeners put in front of their
//!   routers: a change whose client leaves once it acts runs to its end.
//! - `server` — opens storage, barrier, audit and metrics before any port is
//!   bound; serves gRPC; owns the `ShutdownTrigger` and the task set
//!   (`server/tasks.rs`: every background task named, traced and awaited
//!   with a deadline). `metrics_http` is the small `/metrics` listener.
//! - `core` — the parts of one vault wired together, and the request seam
//!   (`core/call/`): `Call` writes the audit record on every way out (on
//!   `Drop` too); `Failure` is the transport-neutral error and the one place
//!   a domain error becomes a kind. `core/auth.rs` is the `Gate`: token
//!   authentication and the policy check, which alone mints
//!   `policy::Authorized`. `core/offload.rs` runs a call's whole-table
//!   reads (listings, reports) on the blocking pool, in bounded turns
//!   (`Call::off_thread`).
//! - `http` — the one HTTPS listener (`http.listen`): the Vault-compatible
//!   `/v1/` API through the same request seam as `api`, one `routes()` per
//!   file; `FailureKind` -> HTTP status in one function (`http/reply.rs`);
//!   the governance dashboard under `/ui/` (`http/ui/`).
//! - Domain modules, each under its own storage prefix and knowing nothing
//!   of gRPC: `secrets` (versioned key/value, `Watch`), `identity` (the
//!   inventory, secret-ids, bindings, login checks, the expiry sweep),
//!   `token` (issue, use, revoke, the expiry sweeper), `policy_store`,
//!   `rotation` (policies, typed run records, the scheduler and its workers,
//!   providers; it takes `RotationDeps`, never the core), `governance` (the
//!   report and its gauges), `lease` (leases of dynamic credentials, their
//!   expiry index and sleeper), `dynamic` (dynamic roles, users made on
//!   PostgreSQL, MariaDB and Redis under a lease), `lifecycle` (per-identity
//!   read sets, decommission runs, attestations, policy suggestions;
//!   `LifecycleDeps`), `federation` (delegated tokens' rules; keyward as an
//!   OIDC issuer: signing keys and roles under `federation/`), `anomaly`
//!   (per-identity baselines fed from the request seam through a bounded
//!   queue, the events, their responses; `AnomalyDeps`).
//! - `audit` — the hash-chained, fail-closed audit log; `barrier` — the seal,
//!   the keyring and AES-256-GCM around every value; `metrics` — Prometheus
//!   families, with no domain import (owners register `Refresh` hooks).
//! - `snapshot` — point-in-time snapshots of the whole store (logical,
//!   ciphertext as stored) and their offline restore.
//! - `pki` — the one certificate builder (dev certificates and issued ones),
//!   the CA, roles, the inventory and CRL, and the run-time client trust the
//!   TLS listeners verify against.
//! - `storage` — the `Backend` trait and its sled implementation with group
//!   commit, the etcd implementation (feature `etcd`: its watch, leader
//!   election, compaction, and `etcd_combine`, which gathers concurrent
//!   writes into one transaction), the caches' coherence on a shared store,
//!   the store's format version, and the point-in-time export.
//! - Leaves used by anyone: `clock` (the one `Clock`, wall time driven by
//!   tokio's clock so tests pause it; the one `Shutdown`), `policy` (pure
//!   rules, globs, the `Authorized` proof), `oidc` (JWT and JWKS), `cidr`,
//!   `duration` (the one duration grammar), `secrecy` (secret types),
//!   `proto`, `config`; `scan` (the discovery scan's detectors and file and
//!   git-history walks, run by the CLI; the server side is `Scan/Match`).

pub mod api;
pub mod audit;
pub mod barrier;
pub mod cidr;
pub mod client;
pub mod clock;
pub mod config;
pub mod core;
pub mod dev;
pub mod duration;
pub mod dynamic;
pub mod federation;
pub mod governance;
pub mod http;
pub mod identity;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod metrics_http;
pub mod oidc;
pub mod pki;
pub mod policy;
pub mod policy_store;
pub mod proto;
pub mod rotation;
pub mod scan;
pub mod secrecy;
pub mod secrets;
pub mod server;
pub mod snapshot;
pub mod storage;
#[cfg(test)]
pub(crate) mod test_hook;
pub mod token;
// -- anomaly detection (issue 13) --
pub mod anomaly;

//! keyward: a secrets vault and rotation broker for non-human identities.
//!
//! # Layout
//!
//! The modules follow the layers of DESIGN.md; an arrow only points down.
//!
//! - `cli`, `api` — the command line (through `client` only) and the gRPC
//!   services (protobuf <-> domain mapping and error -> status mapping, no rules).
//! - `core` — one request: authenticate -> authorize -> act -> audit.
//! - `secrets`, `audit`, `identity` — domain modules, each under its own storage prefix.
//! - `governance` — the report on identities, grants and credentials (no storage).
//! - `secrets`, `audit` — domain modules, each under its own storage prefix.
//! - `rotation` — the rotation broker (`rotation/`): policies, the persisted
//!   state machine of each run, the scheduler and its workers, and the
//!   providers that change credentials on their targets.
//! - `barrier` — the seal, the keyring and AES-256-GCM around every value.
//! - `storage` — the `Backend` trait and its sled implementation.
//! - `client` — the public client that the CLI, examples and applications use.

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
pub mod governance;
pub mod identity;
pub mod metrics;
pub mod metrics_http;
pub mod oidc;
pub mod pki;
pub mod policy;
pub mod policy_store;
pub mod proto;
pub mod rotation;
pub mod secrecy;
pub mod secrets;
pub mod server;
pub mod storage;
pub mod token;

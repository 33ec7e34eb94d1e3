//! The built-in providers: `random` (values nothing outside keyward holds)
//! and `postgres`, `mysql`, `redis` (a user's password on a server, with the
//! single and alternating strategies of `target`); `external`, the client
//! of a provider that runs as its own process; and the [`Registry`] that
//! finds any of them by name. The contract they implement is
//! `rotation::provider`.

pub mod external;
pub mod mysql;
pub mod postgres;
pub mod random;
pub mod redis;
pub mod registry;
pub mod target;

pub use external::{ExternalProvider, PluginEndpoint};
pub use random::{Charset, RandomProvider};
pub use registry::{Registry, RegistryError};
pub use target::{Login, Strategy, Target, TargetProvider, TargetSettings};

/// The `postgres` provider.
pub type PostgresProvider = TargetProvider<postgres::Postgres>;
/// The `mysql` provider (MariaDB or MySQL).
pub type MysqlProvider = TargetProvider<mysql::Mysql>;
/// The `redis` provider (ACL users).
pub type RedisProvider = TargetProvider<self::redis::Redis>;

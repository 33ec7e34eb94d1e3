//! Rotation: the providers that change a credential on its target.
//!
//! A rotation runs four provider steps in the manner of AWS Secrets Manager:
//! `generate` the new value (stored by the broker as `pending`), `apply` it on
//! the target, `verify` that it works, and after the grace period `retire`
//! the value that was `current` before (now `previous`). `provider` holds the
//! contract every provider implements and the `Registry` that finds one by
//! name; `providers` holds the built-in ones (`random`, `postgres`, `mysql`,
//! `redis`).
//!
//! Providers own no storage prefix and never touch storage or the barrier:
//! the broker resolves secrets, persists every step and hands providers only
//! the values they need. Provider errors never carry secret material.

pub mod provider;
pub mod providers;

//! `keyward migrate --from sled:DIR --to etcd:CONFIG`: copies a single-node
//! vault's store into an etcd prefix, every key and value unchanged (the
//! values are the barrier's ciphertext; nothing is decrypted, no share or
//! token is needed), so the vault opens on etcd with the same shares.
//!
//! The source is opened the way the server opens it (sled locks the folder:
//! a server still running on it makes the migration fail; stop it first).
//! The target prefix must hold no data: a non-empty prefix is refused, so a
//! migration never mixes two vaults. Progress goes to stderr every 1,000
//! keys; the copy is checked by counting the target's keys at the end. An
//! interrupted migration leaves a partial prefix, which a second run refuses:
//! delete the prefix (`etcdctl del --prefix PREFIX`) and run it again.

#[cfg(feature = "etcd")]
mod copy;

use anyhow::Result;

use super::output::Format;

pub fn migrate(format: Format, from: &str, to: &str) -> Result<()> {
    #[cfg(feature = "etcd")]
    return copy::migrate(format, from, to);
    #[cfg(not(feature = "etcd"))]
    {
        let _ = (format, from, to);
        anyhow::bail!(keyward::storage::NO_ETCD)
    }
}

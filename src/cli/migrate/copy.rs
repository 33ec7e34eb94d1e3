//! The copy itself (needs the `etcd` feature); see the parent module.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use keyward::config::StorageBackend;
use keyward::storage::{format, Backend, BatchOp, EtcdBackend, SledBackend};
use serde_json::json;

use super::super::output::{emit, Format};

/// Keys written per etcd transaction.
const CHUNK_KEYS: usize = 64;
/// Bytes per etcd transaction, well under etcd's 1.5 MiB request limit.
const CHUNK_BYTES: usize = 1024 * 1024;

pub fn migrate(format: Format, from: &str, to: &str) -> Result<()> {
    let Some(dir) = from.strip_prefix("sled:") else {
        bail!("--from must be sled:DIR (the storage.path of the single-node vault)");
    };
    let Some(config) = to.strip_prefix("etcd:") else {
        bail!(
            "--to must be etcd:CONFIG (a keyward configuration with [storage] backend = \"etcd\")"
        );
    };
    let dir = PathBuf::from(dir);
    if !dir.join("conf").is_file() {
        bail!("{} holds no sled store", dir.display());
    }
    let config = keyward::config::load_file(std::path::Path::new(config))?;
    let StorageBackend::Etcd(options) = config.storage_backend else {
        bail!("the target configuration does not say [storage] backend = \"etcd\"");
    };
    let source = SledBackend::open(&dir).with_context(|| {
        format!(
            "opening {} (is a server still running on it?)",
            dir.display()
        )
    })?;
    let target = EtcdBackend::open(&options).context("connecting to etcd")?;
    if !target.is_empty()? {
        bail!(
            "the etcd prefix {:?} already holds data; migrate only into an empty prefix",
            options.prefix
        );
    }
    let mut chunk: Vec<BatchOp> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut copied = 0u64;
    let exported = source.export(&mut |key, value| {
        chunk.push(BatchOp::Put(key.to_vec(), value.to_vec()));
        chunk_bytes += key.len() + value.len();
        if chunk.len() >= CHUNK_KEYS || chunk_bytes >= CHUNK_BYTES {
            target.apply_in_order(std::mem::take(&mut chunk))?;
            chunk_bytes = 0;
        }
        copied += 1;
        if copied.is_multiple_of(1000) {
            eprintln!("migrate: {copied} keys copied");
        }
        Ok(())
    })?;
    target.apply_in_order(chunk)?;
    target.set_format_version(format::CURRENT)?;
    let found = target.scan_prefix(b"")?.len() as u64;
    if found != exported {
        bail!("the copy is incomplete: {exported} keys read from sled, {found} found in etcd");
    }
    eprintln!("migrate: {copied} keys copied; done");
    emit(
        format,
        &json!({
            "from": dir.display().to_string(),
            "etcd_prefix": options.prefix,
            "etcd_endpoints": options.endpoints,
            "keys": exported,
            "format_version": format::CURRENT,
        }),
    );
    Ok(())
}

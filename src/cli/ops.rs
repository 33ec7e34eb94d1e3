//! Operations: `operator snapshot save`, `snapshot restore`, `audit verify FILE...`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;

use super::common::connect;
use super::output::{emit, Format};
use super::Global;

#[derive(Subcommand)]
pub enum OperatorSnapshotCommand {
    /// Save a point-in-time snapshot of the whole store to FILE (online; `admin` on `sys/snapshot`).
    Save { file: PathBuf },
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Restore a snapshot into an empty storage folder (offline: no server may run on it).
    Restore {
        file: PathBuf,
        /// The sled folder to restore into.
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        storage_path: Option<PathBuf>,
        /// A server configuration: restore into its `storage.path`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replace whatever the target holds.
        #[arg(long)]
        force: bool,
    },
}

/// `operator snapshot save FILE`: streams the snapshot into `FILE.partial`,
/// syncs it and renames it to FILE, so FILE is always a whole snapshot.
/// Progress goes to stderr when it is a terminal.
pub async fn snapshot_save(g: &Global, format: Format, cmd: OperatorSnapshotCommand) -> Result<()> {
    let OperatorSnapshotCommand::Save { file } = cmd;
    let client = connect(g).await?;
    let mut stream = client.snapshot_save().await?;
    let partial = {
        let mut name = file.file_name().unwrap_or_default().to_owned();
        name.push(".partial");
        file.with_file_name(name)
    };
    // Whatever is at FILE.partial already (a save cut short, or a name
    // someone else made in a shared folder: a symlink, a file others can
    // read) is removed, never written through nor reused: the snapshot goes
    // into a file made here (O_EXCL, so no symlink is followed), mode 0600.
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove {}", partial.display()));
        }
    }
    let out = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?
    };
    // A save that fails leaves no `.partial` behind.
    let streamed = stream_into(&mut stream, out, &partial).await;
    let (written, keys, sha256) = match streamed {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &file)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), file.display()))?;
    emit(
        format,
        &json!({"file": file.display().to_string(), "bytes": written, "keys": keys, "sha256": sha256}),
    );
    Ok(())
}

/// Writes the streamed chunks into `out` and syncs it; returns (bytes,
/// keys, sha256). Progress goes to stderr when it is a terminal.
async fn stream_into(
    stream: &mut keyward::client::snapshot::SnapshotStream,
    mut out: std::fs::File,
    partial: &std::path::Path,
) -> Result<(u64, u64, String)> {
    let show = std::io::stderr().is_terminal();
    let (mut written, mut total, mut keys, mut sha256) = (0u64, 0u64, 0u64, String::new());
    let mut shown = 0u64;
    while let Some(chunk) = stream.next_chunk().await? {
        if chunk.total_bytes > 0 {
            total = chunk.total_bytes;
            keys = chunk.keys;
            sha256 = chunk.sha256.clone();
        }
        out.write_all(&chunk.data)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        written += chunk.data.len() as u64;
        if show && (written - shown >= 4 << 20 || written == total) {
            shown = written;
            let percent = (written * 100).checked_div(total).unwrap_or(0);
            eprint!(
                "\rsnapshot: {} / {} MiB ({percent}%)",
                written >> 20,
                total >> 20
            );
        }
    }
    if show {
        eprintln!();
    }
    if written != total {
        anyhow::bail!(
            "the snapshot stream ended after {written} of {total} bytes; nothing was saved"
        );
    }
    out.sync_all()?;
    Ok((written, keys, sha256))
}

/// `snapshot restore FILE (--storage-path PATH | --config FILE) [--force]`.
pub fn snapshot(format: Format, cmd: SnapshotCommand) -> Result<()> {
    let SnapshotCommand::Restore {
        file,
        storage_path,
        config,
        force,
    } = cmd;
    let target = match (storage_path, config) {
        (Some(path), _) => path,
        (None, Some(config)) => keyward::config::load_file(&config)?.storage_path,
        (None, None) => anyhow::bail!("name --storage-path or --config"),
    };
    let restored = keyward::snapshot::restore(&file, &target, force)?;
    emit(
        format,
        &json!({
            "snapshot": restored.snapshot,
            "storage_path": target.display().to_string(),
            "vault_id": restored.vault_id,
            "keys": restored.keys,
            "sha256": restored.sha256,
            "created_at": restored.created_at,
            "sealed": true,
        }),
    );
    if format == Format::Table {
        eprintln!(
            "restored; the vault starts sealed and opens with the shares of the vault the \
             snapshot came from (its HMAC is checked at that first unseal)"
        );
    }
    Ok(())
}

/// `audit verify FILE...`: the files, in the order given, as one chain.
pub fn audit_verify(format: Format, files: &[PathBuf]) -> Result<()> {
    let report = keyward::audit::verify_files(files)?;
    emit(format, &serde_json::to_value(&report)?);
    if !report.unanswered.is_empty() {
        eprintln!(
            "warning: {} request record(s) have no outcome record (see \"unanswered\")",
            report.unanswered.len()
        );
    }
    if !report.in_flight_at_end.is_empty() {
        eprintln!(
            "note: the last {} request record(s) have no outcome record yet: in flight when the \
             log was read, or cut off by a crash (see \"in_flight_at_end\")",
            report.in_flight_at_end.len()
        );
    }
    if !report.ok {
        anyhow::bail!(
            "the audit chain is broken in {} at line {} (seq {}): {}",
            report.file.as_deref().unwrap_or("?"),
            report.line.unwrap_or(0),
            report.first_bad.unwrap_or(0),
            report.reason.unwrap_or("?")
        );
    }
    Ok(())
}

/// `bench snapshot --dir DIR`: over a store made by `bench startup --dir DIR`
/// (say with 1,000,000 tokens), times taking a snapshot to a file (the work
/// of `operator snapshot save` without the TLS stream), restoring it into a
/// new folder, and, as this machine's baseline in the same run, copying the
/// file. Prints one JSON line.
pub async fn bench_snapshot(dir: &std::path::Path, format: Format) -> Result<()> {
    use std::time::Instant;
    let share = zeroize::Zeroizing::new(std::fs::read_to_string(dir.join("bench-unseal-share"))?);
    let config = keyward::config::ServerConfig::local(dir.join("data"), dir.join("audit.log"));
    let server = keyward::server::Server::open(config)?;
    let core = server.core().clone();
    if core.unseal(share.trim()).await?.sealed {
        anyhow::bail!("the store did not unseal");
    }
    let file = dir.join("bench.snap");
    let started = Instant::now();
    let barrier = core.barrier.clone();
    let scratch = dir.join("data");
    let taken = tokio::task::spawn_blocking(move || {
        keyward::snapshot::take(&barrier, &scratch, "bench".into())
    })
    .await??;
    let keys = taken.header.keys;
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
        out.write_all(&taken.head())?;
        std::io::copy(&mut taken.content()?, &mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    let save_s = started.elapsed().as_secs_f64();
    drop(core);
    drop(server);
    let bytes = std::fs::metadata(&file)?.len();

    let copy = dir.join("bench.snap.copy");
    let started = Instant::now();
    std::fs::copy(&file, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    let copy_s = started.elapsed().as_secs_f64();
    std::fs::remove_file(&copy)?;

    let target = dir.join(format!("restored-{}", uuid::Uuid::new_v4()));
    let started = Instant::now();
    let restored = keyward::snapshot::restore(&file, &target, false)?;
    let restore_s = started.elapsed().as_secs_f64();
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let report = json!({
        "keys": keys,
        "restored_keys": restored.keys,
        "file_bytes": bytes,
        "save_s": round(save_s),
        "restore_s": round(restore_s),
        "copy_s": round(copy_s),
        "save_to_copy": round(save_s / copy_s.max(1e-9)),
        "restore_to_copy": round(restore_s / copy_s.max(1e-9)),
    });
    match format {
        Format::Json => println!("{report}"),
        Format::Table => emit(format, &report),
    }
    std::fs::remove_dir_all(&target)?;
    Ok(())
}

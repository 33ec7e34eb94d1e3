//! Discovery scan, the local half: walking files and a git repository's
//! history, and the detectors ([`detect`]). Pure and client-side: no
//! storage, no server, no network. `keyward scan` (cli/scan.rs) runs it and
//! asks the server (`keyward.v1.Scan/Match`) about the candidate values; the
//! server side of the match is `secrets::fingerprint`.
//!
//! Files: every regular file under the roots (symbolic links are not
//! followed), except `.git` folders, files larger than
//! [`Limits::max_file_bytes`] and binary files (a NUL byte in the first
//! 8 KiB). `.env` files, CI configuration and Kubernetes manifests are
//! files like any other: the detectors and the candidate extraction read
//! `KEY=VALUE`, YAML and JSON alike.
//!
//! History: `git log -p --all` of the repository (run as the `git` program
//! on the local machine), bounded by [`Limits::max_commits`] and
//! [`Limits::max_history_bytes`]; only the lines each commit added are
//! read, numbered as in that commit's version of the file.
//!
//! A scanned repository is hostile: `git` is run so that none of the
//! programs its configuration names runs (external diff, textconv,
//! fsmonitor, pager, the `gpg.program` of `log.showSignature`) and nothing
//! is fetched (a partial clone's promisor remote: `GIT_NO_LAZY_FETCH`,
//! `GIT_ALLOW_PROTOCOL=none`); a partial clone missing blobs fails instead.

pub mod detect;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

pub use detect::{candidates, detect, detect_text, worth_checking, Candidate, Hit, Kind};

/// Bounds of one scan.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Larger files are skipped (counted in [`WalkStats::skipped_large`]).
    pub max_file_bytes: u64,
    /// Commits read from the history at most (newest first).
    pub max_commits: u32,
    /// Bytes of `git log -p` output read at most.
    pub max_history_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_bytes: 4 * 1024 * 1024,
            max_commits: 10_000,
            max_history_bytes: 512 * 1024 * 1024,
        }
    }
}

/// What a walk read and skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    pub files: u64,
    pub bytes: u64,
    pub skipped_binary: u64,
    pub skipped_large: u64,
    pub commits: u64,
    /// The history was cut at a bound.
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("cannot run git in {path}: {error}")]
    GitStart { path: String, error: std::io::Error },
    #[error("git log failed in {path} (is it a git repository?): {stderr}")]
    Git { path: String, stderr: String },
}

/// One text handed to the visitor: a file's path (as given under its root),
/// the commit for history, and its numbered lines.
pub struct Text<'a> {
    pub path: &'a str,
    pub commit: Option<&'a str>,
    pub lines: &'a [(u64, &'a str)],
}

fn read_error(path: &Path, error: std::io::Error) -> ScanError {
    ScanError::Read {
        path: path.display().to_string(),
        error,
    }
}

/// Visits every text file under `root` (or `root` itself if it is a file).
pub fn walk_files(
    root: &Path,
    limits: &Limits,
    visit: &mut dyn FnMut(Text<'_>),
) -> Result<WalkStats, ScanError> {
    let mut stats = WalkStats::default();
    let mut stack = vec![root.to_path_buf()];
    let mut buf = Vec::new();
    while let Some(path) = stack.pop() {
        // A root given as a symbolic link is followed; links under it are not.
        let meta = if path == root {
            std::fs::metadata(&path)
        } else {
            std::fs::symlink_metadata(&path)
        }
        .map_err(|e| read_error(&path, e))?;
        if meta.is_dir() {
            if path != root && path.file_name().is_some_and(|n| n == ".git") {
                continue;
            }
            let mut entries: Vec<_> = std::fs::read_dir(&path)
                .map_err(|e| read_error(&path, e))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect();
            // Reverse order on the stack: files come out sorted.
            entries.sort_unstable_by(|a, b| b.cmp(a));
            stack.extend(entries);
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        if meta.len() > limits.max_file_bytes {
            stats.skipped_large += 1;
            continue;
        }
        buf.clear();
        std::fs::File::open(&path)
            .and_then(|f| f.take(limits.max_file_bytes).read_to_end(&mut buf))
            .map_err(|e| read_error(&path, e))?;
        if buf[..buf.len().min(8192)].contains(&0) {
            stats.skipped_binary += 1;
            continue;
        }
        stats.files += 1;
        stats.bytes += buf.len() as u64;
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<(u64, &str)> = text.lines().zip(1u64..).map(|(l, n)| (n, l)).collect();
        let shown = path.display().to_string();
        visit(Text {
            path: &shown,
            commit: None,
            lines: &lines,
        });
    }
    Ok(stats)
}

/// Marks a commit line in the `git log` output; no diff line starts with it.
const COMMIT_MARK: &str = "\u{1}commit ";

/// Visits the lines each commit of the repository at `repo` added, per
/// (commit, file), newest commit first.
pub fn walk_history(
    repo: &Path,
    limits: &Limits,
    visit: &mut dyn FnMut(Text<'_>),
) -> Result<WalkStats, ScanError> {
    let shown = repo.display().to_string();
    let mut child = Command::new("git")
        // A partial clone would fetch missing objects from its promisor
        // remote, whose URL (an `ext::` command, an SSH command) the
        // scanned repository chooses: no lazy fetch, no transport at all.
        .env("GIT_NO_LAZY_FETCH", "1")
        .env("GIT_ALLOW_PROTOCOL", "none")
        .arg("--no-pager")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "core.quotePath=false",
            "-c",
            "core.fsmonitor=false",
            // `log.showSignature` would run the repository's `gpg.program`
            // on any commit carrying a signature header.
            "-c",
            "log.showSignature=false",
            "log",
            "-p",
            "--all",
            "--no-color",
            // A scanned repository's configuration runs no program of its
            // own: no external diff, no textconv filter, no signature check.
            "--no-ext-diff",
            "--no-textconv",
            "--no-show-signature",
            "--no-renames",
            "--unified=0",
            "--format=format:\u{1}commit %H",
        ])
        .arg(format!("--max-count={}", limits.max_commits))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| ScanError::GitStart {
            path: shown.clone(),
            error,
        })?;
    let mut stats = WalkStats::default();
    let Some(stdout) = child.stdout.take() else {
        return Err(ScanError::Git {
            path: shown,
            stderr: "no output pipe".into(),
        });
    };
    let mut reader = BufReader::new(stdout);
    let mut commit = String::new();
    let mut file: Option<String> = None;
    let mut added: Vec<(u64, String)> = Vec::new();
    let mut next_line = 0u64;
    let mut raw = Vec::new();
    let flush = |commit: &str,
                 file: &Option<String>,
                 added: &mut Vec<(u64, String)>,
                 visit: &mut dyn FnMut(Text<'_>)| {
        if let Some(path) = file {
            if !added.is_empty() {
                let lines: Vec<(u64, &str)> = added.iter().map(|(n, l)| (*n, l.as_str())).collect();
                visit(Text {
                    path,
                    commit: Some(commit),
                    lines: &lines,
                });
            }
        }
        added.clear();
    };
    loop {
        raw.clear();
        let n = reader
            .read_until(b'\n', &mut raw)
            .map_err(|e| read_error(repo, e))?;
        if n == 0 {
            break;
        }
        stats.bytes += n as u64;
        if stats.bytes > limits.max_history_bytes {
            stats.truncated = true;
            break;
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\n', '\r']);
        if let Some(hash) = line.strip_prefix(COMMIT_MARK) {
            flush(&commit, &file, &mut added, visit);
            commit = hash.to_owned();
            file = None;
            stats.commits += 1;
        } else if line.starts_with("diff --git ") {
            flush(&commit, &file, &mut added, visit);
            file = None;
        } else if let Some(path) = line.strip_prefix("+++ ") {
            flush(&commit, &file, &mut added, visit);
            file = path.strip_prefix("b/").map(str::to_owned);
            if file.is_some() {
                stats.files += 1;
            }
        } else if let Some(hunk) = line.strip_prefix("@@ ") {
            // `@@ -a,b +c,d @@`: added lines are numbered from c.
            next_line = hunk
                .split(' ')
                .find_map(|p| p.strip_prefix('+'))
                .and_then(|p| p.split(',').next())
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
        } else if let Some(text) = line.strip_prefix('+') {
            if file.is_some() {
                added.push((next_line, text.to_owned()));
                next_line += 1;
            }
        }
    }
    flush(&commit, &file, &mut added, visit);
    if stats.truncated {
        // Stop git; what was read is reported, marked truncated.
        let _ = child.kill();
    }
    let mut stderr = String::new();
    if let Some(err) = child.stderr.take() {
        let _ = err.take(4096).read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(|e| read_error(repo, e))?;
    if !status.success() && !stats.truncated {
        return Err(ScanError::Git {
            path: shown,
            stderr: stderr.trim().to_owned(),
        });
    }
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn the_walk_skips_git_internals_binaries_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".git/objects")).unwrap();
        std::fs::create_dir_all(root.join("k8s")).unwrap();
        std::fs::write(root.join(".git/config"), "x").unwrap();
        std::fs::write(root.join(".env"), "A=1\nB=2\n").unwrap();
        std::fs::write(root.join("k8s/deploy.yaml"), "kind: Secret\n").unwrap();
        std::fs::write(root.join("image.bin"), [1u8, 0, 2, 3]).unwrap();
        std::fs::write(root.join("big.txt"), vec![b'a'; 2048]).unwrap();
        let limits = Limits {
            max_file_bytes: 1024,
            ..Limits::default()
        };
        let mut seen = Vec::new();
        let stats = walk_files(root, &limits, &mut |t| {
            seen.push((t.path.to_owned(), t.lines.len()));
        })
        .unwrap();
        let names: Vec<String> = seen
            .iter()
            .map(|(p, _)| p.rsplit('/').next().unwrap().to_owned())
            .collect();
        assert_eq!(names, [".env", "deploy.yaml"]);
        assert_eq!(seen[0].1, 2);
        assert_eq!(stats.skipped_binary, 1);
        assert_eq!(stats.skipped_large, 1);
    }

    #[test]
    fn the_history_yields_added_lines_with_their_numbers_and_commit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(root)
                .args(["-c", "user.name=t", "-c", "user.email=t@t.invalid"])
                .args(["-c", "commit.gpgsign=false"])
                .args(args)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(root.join("a.env"), "X=1\nSECRET=old-value\n").unwrap();
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "one"]);
        std::fs::write(root.join("a.env"), "X=1\n").unwrap();
        git(&["commit", "-q", "-am", "two"]);
        let mut seen = Vec::new();
        let stats = walk_history(root, &Limits::default(), &mut |t| {
            for (n, l) in t.lines {
                seen.push((
                    t.path.to_owned(),
                    t.commit.unwrap().len(),
                    *n,
                    (*l).to_owned(),
                ));
            }
        })
        .unwrap();
        assert_eq!(stats.commits, 2);
        assert_eq!(
            seen,
            [
                ("a.env".to_owned(), 40, 1, "X=1".to_owned()),
                ("a.env".to_owned(), 40, 2, "SECRET=old-value".to_owned()),
            ]
        );
        // Not a repository: an error, not an empty history.
        let plain = tempfile::tempdir().unwrap();
        assert!(walk_history(plain.path(), &Limits::default(), &mut |_| {}).is_err());
    }

    fn run_git(dir: &Path, args: &[&str]) {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@t.invalid"])
            .args(["-c", "commit.gpgsign=false"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A script that leaves `marker` behind when run.
    fn trap(dir: &Path, marker: &Path) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("trap.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\ntouch '{}'\nexit 1\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[test]
    fn a_signed_commit_in_a_hostile_repository_runs_no_gpg_program() {
        // The repository asks `git log` to verify signatures with a program
        // of its own; a commit carrying any `gpgsig` header triggers it.
        let outside = tempfile::tempdir().unwrap();
        let marker = outside.path().join("ran");
        let script = trap(outside.path(), &marker);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        run_git(root, &["init", "-q"]);
        std::fs::write(root.join("a.env"), "X=1\n").unwrap();
        run_git(root, &["add", "-A"]);
        run_git(root, &["commit", "-q", "-m", "one"]);
        let tree = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["rev-parse", "HEAD^{tree}"])
            .output()
            .unwrap();
        let tree = String::from_utf8(tree.stdout).unwrap();
        let object = format!(
            "tree {}\nauthor a <a@a> 0 +0000\ncommitter a <a@a> 0 +0000\n\
             gpgsig -----BEGIN PGP SIGNATURE-----\n \n x\n -----END PGP SIGNATURE-----\n\nsigned\n",
            tree.trim()
        );
        std::fs::write(outside.path().join("obj"), object).unwrap();
        let hashed = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["hash-object", "-t", "commit", "-w"])
            .arg(outside.path().join("obj"))
            .output()
            .unwrap();
        let signed = String::from_utf8(hashed.stdout).unwrap();
        run_git(root, &["update-ref", "refs/heads/signed", signed.trim()]);
        run_git(root, &["config", "log.showSignature", "true"]);
        run_git(
            root,
            &["config", "gpg.program", &script.display().to_string()],
        );
        run_git(
            root,
            &["config", "gpg.ssh.program", &script.display().to_string()],
        );
        run_git(
            root,
            &["config", "gpg.x509.program", &script.display().to_string()],
        );
        let stats = walk_history(root, &Limits::default(), &mut |_| {}).unwrap();
        assert_eq!(stats.commits, 2);
        assert!(!marker.exists(), "the repository's gpg.program ran");
    }

    #[test]
    fn a_partial_clone_fetches_nothing_and_runs_no_remote_command() {
        // A partial clone whose blobs are missing: `git log -p` would fetch
        // them from the promisor remote, here an `ext::` command that the
        // repository itself allows.
        let outside = tempfile::tempdir().unwrap();
        let marker = outside.path().join("ran");
        let _ = trap(outside.path(), &marker);
        let source = outside.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        run_git(&source, &["init", "-q"]);
        std::fs::write(source.join("a.env"), "SECRET=value-of-the-source\n").unwrap();
        run_git(&source, &["add", "-A"]);
        run_git(&source, &["commit", "-q", "-m", "one"]);
        run_git(&source, &["config", "uploadpack.allowFilter", "true"]);
        let dir = tempfile::tempdir().unwrap();
        let clone = dir.path().join("clone");
        let url = format!("file://{}", source.display());
        let ok = Command::new("git")
            .args([
                "clone",
                "-q",
                "--no-local",
                "--no-checkout",
                "--filter=blob:none",
            ])
            .arg(&url)
            .arg(&clone)
            .status()
            .unwrap()
            .success();
        assert!(ok, "partial clone");
        let command = format!("ext::sh {}", outside.path().join("trap.sh").display());
        run_git(&clone, &["config", "remote.origin.url", &command]);
        run_git(&clone, &["config", "protocol.ext.allow", "always"]);
        run_git(&clone, &["config", "protocol.allow", "always"]);
        // Fails (the blobs are missing) or reads what is there; never fetches.
        let _ = walk_history(&clone, &Limits::default(), &mut |_| {});
        assert!(!marker.exists(), "the promisor remote's command ran");
    }

    #[test]
    fn a_hostile_repository_configuration_runs_none_of_its_programs() {
        // Every configuration hook of a repository that `git log -p` might
        // obey points at a script that leaves a marker behind.
        let outside = tempfile::tempdir().unwrap();
        let marker = outside.path().join("ran");
        let script = trap(outside.path(), &marker);
        let script = script.display().to_string();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        run_git(root, &["init", "-q"]);
        std::fs::write(root.join(".gitattributes"), "*.env diff=evil filter=evil\n").unwrap();
        std::fs::write(root.join("a.env"), "X=1\nSECRET=old-value\n").unwrap();
        run_git(root, &["add", "-A"]);
        run_git(root, &["commit", "-q", "-m", "one"]);
        std::fs::write(root.join("a.env"), "X=2\n").unwrap();
        run_git(root, &["commit", "-q", "-am", "two"]);
        for (key, value) in [
            ("diff.external", script.as_str()),
            ("diff.evil.command", script.as_str()),
            ("diff.evil.textconv", script.as_str()),
            ("filter.evil.smudge", script.as_str()),
            ("filter.evil.clean", script.as_str()),
            ("filter.evil.process", script.as_str()),
            ("core.fsmonitor", script.as_str()),
            ("core.pager", script.as_str()),
            ("pager.log", script.as_str()),
            ("core.hooksPath", outside.path().to_str().unwrap()),
        ] {
            run_git(root, &["config", key, value]);
        }
        let mut added = Vec::new();
        walk_history(root, &Limits::default(), &mut |t| {
            added.extend(t.lines.iter().map(|(_, l)| (*l).to_owned()));
        })
        .unwrap();
        assert!(!marker.exists(), "a program of the repository ran");
        // The real added lines were read, not a converted text.
        assert!(added.iter().any(|l| l == "SECRET=old-value"), "{added:?}");
    }

    #[test]
    fn the_walk_stays_in_the_tree_and_skips_devices_fifos_and_odd_names() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.env"), "OUTSIDE=1\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, root.join(name)).unwrap();
        };
        link(&outside.path().join("secret.env"), "leak.env");
        link(outside.path(), "leakdir");
        link(Path::new("/dev/zero"), "zero");
        link(Path::new("/proc/self/environ"), "environ");
        let fifo = root.join("pipe");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        // A deep chain of folders and names that look like options, hold a
        // newline or are not UTF-8.
        let mut deep = root.to_path_buf();
        for _ in 0..200 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("deep.env"), "DEEP=1\n").unwrap();
        std::fs::write(root.join("--output=x"), "OPT=1\n").unwrap();
        std::fs::write(root.join("new\nline"), "NL=1\n").unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"bad-\xff-name");
        std::fs::write(root.join(odd), "ODD=1\n").unwrap();
        let mut seen = Vec::new();
        let stats = walk_files(root, &Limits::default(), &mut |t| {
            seen.extend(t.lines.iter().map(|(_, l)| (*l).to_owned()));
        })
        .unwrap();
        seen.sort();
        assert_eq!(seen, ["DEEP=1", "NL=1", "ODD=1", "OPT=1"]);
        assert_eq!(stats.files, 4);
    }
}

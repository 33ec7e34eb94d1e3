//! Benchmark of the discovery scan's local half (not a test; TESTING.md
//! "Benchmarks"), beside `detect-secrets` (PyPI) on the same tree.
//!
//! ```sh
//! examples/scan_bench.sh                       # makes the venv, runs --release
//! cargo run --release --example scan_bench -- target/scan-bench-tree 64
//! ```
//!
//! It writes a tree of about `MB` megabytes (default 64) under `DIR`: code
//! and configuration lines mixed with random high-entropy non-secrets
//! (base64 blobs, SHA-256 and git hashes, UUIDs, base64 PNG images, lock
//! file integrity hashes), and 200 planted credentials of the well-known
//! kinds at known lines. It then times `keyward scan`'s local work over it
//! (walk, detectors, candidate extraction; the server match is not part of
//! it) and, if `target/scan-bench-venv/bin/detect-secrets` exists,
//! `detect-secrets scan --all-files` on the same tree. It prints MB/s of
//! each, their ratio, and for each the planted credentials found and the
//! findings that are not planted (false positives), as one line a script
//! can read.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};

fn random<const N: usize>(rng: &SystemRandom) -> [u8; N] {
    let mut b = [0u8; N];
    rng.fill(&mut b).unwrap_or_default();
    b
}

/// A planted credential of kind `i % 6`.
fn planted(rng: &SystemRandom, i: usize) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    match i % 6 {
        0 => match keyward::token::format::TokenSecret::generate() {
            Ok(t) => format!("KEYWARD_TOKEN={}", t.expose()),
            Err(_) => String::new(),
        },
        1 => {
            const B32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
            let id: String = random::<16>(rng)
                .iter()
                .map(|b| char::from(B32[usize::from(b % 32)]))
                .collect();
            format!("aws_access_key_id = AKIA{id}")
        }
        2 => {
            const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
            let body: String = random::<36>(rng)
                .iter()
                .map(|b| char::from(B62[usize::from(b % 62)]))
                .collect();
            format!("GITHUB_TOKEN: ghp_{body}")
        }
        3 => {
            let head = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
            let body = b64.encode(format!(r#"{{"sub":"svc-{i}","iat":1700000000}}"#));
            let sig = b64.encode(random::<32>(rng));
            format!("Authorization: Bearer {head}.{body}.{sig}")
        }
        4 => {
            let body = base64::engine::general_purpose::STANDARD.encode(random::<48>(rng));
            // The armour is put together here so that this file holds no
            // key-looking block; the body is random.
            let (dashes, label) = ("-----", ["RSA", "PRIVATE", "KEY"].join(" "));
            format!("{dashes}BEGIN {label}{dashes}\n{body}\n{dashes}END {label}{dashes}")
        }
        _ => {
            let body = hex::encode(random::<12>(rng));
            format!("STRIPE_KEY=sk_live_{body}")
        }
    }
}

/// One decoy line: something that is not a secret but looks random.
fn decoy(rng: &SystemRandom, n: usize) -> String {
    let bytes = random::<32>(rng);
    let hex = hex::encode(bytes);
    let std = base64::engine::general_purpose::STANDARD;
    match n % 10 {
        0 => format!("    let digest = \"{hex}\";"),
        1 => format!("commit {}", &hex[..40]),
        2 => format!("  id: {}", uuid::Uuid::new_v4()),
        3 => format!(
            "  \"integrity\": \"sha512-{}\",",
            std.encode([bytes, random::<32>(rng)].concat())
        ),
        4 => format!(
            "<img src=\"data:image/png;base64,{}\">",
            std.encode([&b"\x89PNG\r\n\x1a\n"[..], &random::<96>(rng)[..]].concat())
        ),
        5 => format!("checksum = \"{}\"", std.encode(bytes)),
        6 => "fn handle(request: Request) -> Result<Response, Error> {".to_owned(),
        7 => "    // Parse the header and hand the body to the next layer.".to_owned(),
        8 => format!("image: registry.example/app@sha256:{hex}"),
        _ => format!("    total += item.price * item.quantity; // {n}"),
    }
}

/// Writes the tree; returns its bytes and the planted (file, line) places.
fn write_tree(dir: &Path, megabytes: usize) -> (u64, BTreeSet<(String, u64)>) {
    let rng = SystemRandom::new();
    let _ = std::fs::remove_dir_all(dir);
    let mut places = BTreeSet::new();
    let mut total = 0u64;
    let files = megabytes * 16; // about 64 KiB each
    let plant_every = (files / 200).max(1);
    for f in 0..files {
        let sub = dir.join(format!("pkg{:03}", f / 100));
        std::fs::create_dir_all(&sub).unwrap_or_default();
        let name = sub.join(format!("file{f:05}.txt"));
        let mut text = String::with_capacity(70_000);
        let mut line = 1u64;
        let mut n = 0;
        while text.len() < 64 * 1024 {
            if f % plant_every == 0 && n == 300 {
                let p = planted(&rng, f / plant_every);
                places.insert((name.display().to_string(), line));
                line += p.lines().count() as u64;
                text.push_str(&p);
            } else {
                text.push_str(&decoy(&rng, n));
                line += 1;
            }
            text.push('\n');
            n += 1;
        }
        total += text.len() as u64;
        std::fs::write(&name, text).unwrap_or_default();
    }
    (total, places)
}

struct Outcome {
    seconds: f64,
    found: usize,
    false_positives: usize,
}

fn judge(seconds: f64, hits: &[(String, u64)], planted: &BTreeSet<(String, u64)>) -> Outcome {
    let hits: BTreeSet<&(String, u64)> = hits.iter().collect();
    Outcome {
        seconds,
        found: planted.iter().filter(|p| hits.contains(p)).count(),
        false_positives: hits.iter().filter(|h| !planted.contains(h)).count(),
    }
}

fn keyward_scan(dir: &Path) -> (f64, Vec<(String, u64)>) {
    let started = Instant::now();
    let mut hits = Vec::new();
    let mut candidates = 0usize;
    let limits = keyward::scan::Limits::default();
    let walked = keyward::scan::walk_files(dir, &limits, &mut |t| {
        for h in keyward::scan::detect(t.lines) {
            hits.push((t.path.to_owned(), h.line));
        }
        candidates += keyward::scan::candidates(t.lines).len();
    });
    if let Err(e) = walked {
        eprintln!("scan failed: {e}");
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("keyward: {candidates} candidate values would be sent for a match");
    (seconds, hits)
}

fn detect_secrets(bin: &Path, dir: &Path) -> Option<(f64, Vec<(String, u64)>)> {
    let started = Instant::now();
    let out = std::process::Command::new(bin)
        .args(["scan", "--all-files"])
        .arg(dir)
        .output()
        .ok()?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        eprintln!(
            "detect-secrets failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut hits = Vec::new();
    for (file, found) in doc["results"].as_object()? {
        // detect-secrets names files relative to where it runs when given
        // a relative path, as given otherwise.
        let file = if Path::new(file).is_absolute() {
            PathBuf::from(file)
        } else {
            std::env::current_dir().ok()?.join(file)
        };
        for f in found.as_array()? {
            let line = f["line_number"].as_u64().unwrap_or(0);
            hits.push((file.display().to_string(), line));
        }
    }
    // One finding per place, as keyward counts them.
    hits.sort();
    hits.dedup();
    Some((seconds, hits))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "target/scan-bench-tree".to_owned()),
    );
    let megabytes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let dir = std::env::current_dir().unwrap_or_default().join(dir);
    let (bytes, planted) = write_tree(&dir, megabytes);
    let mb = bytes as f64 / 1e6;
    let (secs, hits) = keyward_scan(&dir);
    let kw = judge(secs, &hits, &planted);
    let mut line = format!(
        "scan_bench: bytes={bytes} planted={} keyward_mb_s={:.1} keyward_found={} keyward_false={}",
        planted.len(),
        mb / kw.seconds,
        kw.found,
        kw.false_positives
    );
    let bin = PathBuf::from("target/scan-bench-venv/bin/detect-secrets");
    if bin.exists() {
        if let Some((secs, hits)) = detect_secrets(&bin, &dir) {
            let ds = judge(secs, &hits, &planted);
            let _ = write!(
                line,
                " detect_secrets_mb_s={:.2} detect_secrets_found={} detect_secrets_false={} speed_ratio={:.1}",
                mb / ds.seconds,
                ds.found,
                ds.false_positives,
                ds.seconds / kw.seconds
            );
        }
    } else {
        line.push_str(" detect_secrets=absent (run examples/scan_bench.sh)");
    }
    println!("{line}");
}

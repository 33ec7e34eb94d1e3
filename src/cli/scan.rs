//! `keyward scan PATH... [--git-history] [--format table|json|sarif]
//! [--revoke] [--rotate] [--offline]`: finds leaked credentials in files
//! and a git history with the local detectors (`keyward::scan`), and values
//! stored in keyward through `Scan.Match` (the server answers which secret
//! holds a value, never a value). Exit 0 when clean, 1 when anything is
//! found, 2 on an error. A finding never prints the credential: only its
//! first characters for the well-known formats, nothing for stored values.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::common::connect;
use super::output::{emit, Format};
use super::Global;
use keyward::scan::{self, Kind, Limits, Text, WalkStats};

#[derive(Args)]
pub struct ScanArgs {
    /// Files or folders to scan.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Also read every commit of the git repositories among PATHs (`git
    /// log -p --all`, bounded by --max-commits).
    #[arg(long)]
    pub git_history: bool,
    /// Revoke the keyward tokens found (needs the rights `token revoke`
    /// needs).
    #[arg(long)]
    pub revoke: bool,
    /// Start a rotation of every stored secret whose value was found (needs
    /// `rotate` on it).
    #[arg(long)]
    pub rotate: bool,
    /// Only the local detectors: no server, no stored-value match.
    #[arg(long, conflicts_with_all = ["revoke", "rotate"])]
    pub offline: bool,
    /// Files larger than this many bytes are skipped.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_file_bytes: u64,
    /// Commits read at most per repository.
    #[arg(long, default_value_t = 10_000)]
    pub max_commits: u32,
}

/// Candidates sent in one `Scan.Match` call (the server's bound).
const BATCH: usize = 1000;
/// A refusal by the server's rate limit is retried after this long (a
/// large tree has more candidates than a minute's allowance) ...
const RATE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
/// ... this many times in all before the scan fails.
const MAX_WAITS: u32 = 40;

/// `--format sarif` parses as `json` (an alias, so the global format stays
/// one enum for every command); the scan looks at what was written.
fn sarif_requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let flag = args.iter().enumerate().any(|(i, a)| {
        a == "--format=sarif" || (a == "--format" && args.get(i + 1).is_some_and(|v| v == "sarif"))
    });
    flag || std::env::var("KEYWARD_FORMAT").is_ok_and(|v| v == "sarif")
}

/// A found text kept zeroized, ordered and hashed by its characters.
#[derive(Clone, PartialEq, Eq)]
struct Held(Zeroizing<String>);

impl std::hash::Hash for Held {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state);
    }
}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.as_str().cmp(other.0.as_str())
    }
}

/// Where something was found.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    file: String,
    line: u64,
    commit: Option<String>,
}

/// A stored secret a value matched.
struct Stored {
    owner: String,
    readable: bool,
    path: String,
    fields: Vec<String>,
    version: u64,
    stage: String,
}

struct Finding {
    place: Place,
    kind: Kind,
    /// The first characters of a well-known credential (never a stored value).
    preview: String,
    stored: Option<Stored>,
}

/// What the walks collected.
#[derive(Default)]
struct Collected {
    /// Detector hits: text -> places (a text is reported once per place).
    hits: BTreeMap<(Kind, Held), BTreeSet<Place>>,
    /// Candidate values -> places.
    candidates: HashMap<Held, BTreeSet<Place>>,
    /// Texts and values found in the working tree (history repeats of them
    /// are not reported again).
    current: BTreeSet<Held>,
    stats: WalkStats,
}

impl Collected {
    fn visit(&mut self, text: Text<'_>, history: bool) {
        for hit in scan::detect(text.lines) {
            let held = Held(hit.text);
            if history && self.current.contains(&held) {
                continue;
            }
            let place = Place {
                file: text.path.to_owned(),
                line: hit.line,
                commit: text.commit.map(str::to_owned),
            };
            if !history {
                self.current.insert(held.clone());
            }
            self.hits.entry((hit.kind, held)).or_default().insert(place);
        }
        for c in scan::candidates(text.lines) {
            let held = Held(c.value);
            if history && self.current.contains(&held) {
                continue;
            }
            if !history {
                self.current.insert(held.clone());
            }
            self.candidates.entry(held).or_default().insert(Place {
                file: text.path.to_owned(),
                line: c.line,
                commit: text.commit.map(str::to_owned),
            });
        }
    }

    fn add(&mut self, s: WalkStats) {
        let t = &mut self.stats;
        t.files += s.files;
        t.bytes += s.bytes;
        t.skipped_binary += s.skipped_binary;
        t.skipped_large += s.skipped_large;
        t.commits += s.commits;
        t.truncated |= s.truncated;
    }
}

fn preview(text: &str) -> String {
    let keep = text.chars().take(8.min(text.len() / 4)).collect::<String>();
    format!("{keep}…")
}

/// Runs the scan and exits: 0 clean, 1 found, 2 error.
pub async fn scan(g: &Global, format: Format, args: ScanArgs) -> Result<()> {
    let sarif = sarif_requested();
    match run(g, format, sarif, &args).await {
        Ok(found) => std::process::exit(i32::from(found)),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2)
        }
    }
}

async fn run(g: &Global, format: Format, sarif: bool, args: &ScanArgs) -> Result<bool> {
    let limits = Limits {
        max_file_bytes: args.max_file_bytes,
        max_commits: args.max_commits,
        ..Limits::default()
    };
    let mut collected = Collected::default();
    let started = std::time::Instant::now();
    for root in &args.paths {
        let stats = scan::walk_files(root, &limits, &mut |t| collected.visit(t, false))?;
        collected.add(stats);
    }
    if args.git_history {
        for root in args.paths.iter().filter(|p| p.join(".git").exists()) {
            let stats = scan::walk_history(root, &limits, &mut |t| collected.visit(t, true))?;
            collected.add(stats);
        }
    }
    let local_secs = started.elapsed().as_secs_f64();

    let mut findings: Vec<Finding> = Vec::new();
    for ((kind, text), places) in &collected.hits {
        for place in places {
            findings.push(Finding {
                place: place.clone(),
                kind: *kind,
                // A PEM block's text is its BEGIN line: not secret.
                preview: if *kind == Kind::PrivateKey {
                    text.0.to_string()
                } else {
                    preview(&text.0)
                },
                stored: None,
            });
        }
    }

    let mut checked = 0u64;
    let mut revoked = Vec::new();
    let mut rotated = Vec::new();
    if !args.offline {
        let client = connect(g).await?;
        let values: Vec<&Held> = collected.candidates.keys().collect();
        for chunk in values.chunks(BATCH) {
            let sent: Vec<String> = chunk.iter().map(|v| v.0.as_str().to_owned()).collect();
            let mut waits = 0;
            let answer = loop {
                match client.scan_match(sent.clone()).await {
                    Err(e)
                        if e.code() == Some(tonic::Code::ResourceExhausted)
                            && waits < MAX_WAITS =>
                    {
                        waits += 1;
                        eprintln!(
                            "note: the server's scan rate limit is reached; waiting {} s ({waits}/{MAX_WAITS})",
                            RATE_WAIT.as_secs()
                        );
                        tokio::time::sleep(RATE_WAIT).await;
                    }
                    other => {
                        break other
                            .context("matching candidate values against the stored secrets")?
                    }
                }
            };
            checked += u64::from(answer.checked);
            for m in answer.matches {
                let Some(value) = chunk.get(m.candidate as usize) else {
                    continue;
                };
                for place in &collected.candidates[*value] {
                    findings.push(Finding {
                        place: place.clone(),
                        kind: Kind::StoredSecret,
                        preview: String::new(),
                        stored: Some(Stored {
                            owner: m.owner.clone(),
                            readable: m.readable,
                            path: m.path.clone(),
                            fields: m.fields.clone(),
                            version: m.version,
                            stage: m.stage.clone(),
                        }),
                    });
                }
            }
        }
        if args.revoke {
            for (kind, text) in collected.hits.keys() {
                if *kind != Kind::KeywardToken {
                    continue;
                }
                let outcome = match client.revoke_token(&text.0).await {
                    Ok(n) => json!({"token": preview(&text.0), "revoked": n}),
                    Err(e) => json!({"token": preview(&text.0), "error": e.to_string()}),
                };
                revoked.push(outcome);
            }
        }
        if args.rotate {
            let paths: BTreeSet<&str> = findings
                .iter()
                .filter_map(|f| f.stored.as_ref())
                .filter(|s| s.readable)
                .map(|s| s.path.as_str())
                .collect();
            for path in paths {
                let outcome = match client.rotate(path, false).await {
                    Ok(run) => json!({"path": path, "run_id": run.run_id}),
                    Err(e) => json!({"path": path, "error": e.to_string()}),
                };
                rotated.push(outcome);
            }
        }
    }
    findings.sort_by(|a, b| (&a.place, a.kind).cmp(&(&b.place, b.kind)));

    let stats = &collected.stats;
    let summary = json!({
        "files": stats.files,
        "bytes": stats.bytes,
        "skipped_binary": stats.skipped_binary,
        "skipped_large": stats.skipped_large,
        "commits": stats.commits,
        "history_truncated": stats.truncated,
        "candidates_checked": checked,
        "local_seconds": local_secs,
        "findings": findings.len(),
    });
    if sarif {
        println!(
            "{}",
            serde_json::to_string_pretty(&sarif_log(&findings)).unwrap_or_default()
        );
    } else {
        match format {
            Format::Json => emit(
                format,
                &json!({
                    "findings": findings.iter().map(finding_json).collect::<Vec<_>>(),
                    "summary": summary,
                    "revoked": revoked,
                    "rotated": rotated,
                }),
            ),
            Format::Table => {
                for f in &findings {
                    println!("{}", finding_line(f));
                }
                for r in revoked.iter().chain(&rotated) {
                    println!("{r}");
                }
                emit(format, &summary);
            }
        }
    }
    Ok(!findings.is_empty())
}

/// `text` safe to print on a terminal: control characters (a newline, an
/// escape sequence) and bidirectional overrides, which a scanned file's name
/// or a secret's owner may hold to forge or hide a line of the output, are
/// written as `\u{..}` escapes.
fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A file path as a SARIF `uri` (RFC 3986): every byte but the unreserved
/// characters and `/` percent-encoded.
fn uri_of(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn location(p: &Place) -> String {
    match &p.commit {
        Some(c) => format!(
            "{}:{} (commit {})",
            shown(&p.file),
            p.line,
            shown(&c[..c.len().min(12)])
        ),
        None => format!("{}:{}", shown(&p.file), p.line),
    }
}

/// What a finding is, in one sentence.
fn message(f: &Finding) -> String {
    match &f.stored {
        Some(s) if s.readable => format!(
            "value of stored secret {} field {} (version {}{}), owner {}",
            s.path,
            s.fields.join(","),
            s.version,
            if s.stage.is_empty() {
                String::new()
            } else {
                format!(", {}", s.stage)
            },
            if s.owner.is_empty() { "-" } else { &s.owner }
        ),
        Some(s) => format!(
            "value of a stored secret of owner {} (you may not read it)",
            if s.owner.is_empty() { "-" } else { &s.owner }
        ),
        None => format!("{} {}", f.kind.description(), f.preview),
    }
}

fn finding_line(f: &Finding) -> String {
    format!(
        "{}  {}  {}",
        location(&f.place),
        f.kind.rule_id(),
        shown(&message(f))
    )
}

fn finding_json(f: &Finding) -> Value {
    let secret = f.stored.as_ref().map(|s| {
        if s.readable {
            json!({"path": s.path, "fields": s.fields, "version": s.version,
                   "stage": s.stage, "owner": s.owner, "readable": true})
        } else {
            json!({"owner": s.owner, "readable": false})
        }
    });
    json!({
        "file": f.place.file,
        "line": f.place.line,
        "commit": f.place.commit,
        "kind": f.kind.rule_id(),
        "description": f.kind.description(),
        "preview": if f.preview.is_empty() { Value::Null } else { Value::String(f.preview.clone()) },
        "secret": secret,
        "owner": f.stored.as_ref().map(|s| s.owner.clone()),
        "message": message(f),
    })
}

/// A SARIF 2.1.0 log: one run, the rule table of every kind, one result
/// per finding with its physical location.
fn sarif_log(findings: &[Finding]) -> Value {
    let rules: Vec<Value> = Kind::ALL
        .iter()
        .map(|k| {
            json!({
                "id": k.rule_id(),
                "name": k.rule_id(),
                "shortDescription": {"text": k.description()},
                "defaultConfiguration": {"level": "error"},
            })
        })
        .collect();
    let results: Vec<Value> = findings
        .iter()
        .map(|f| {
            let index = Kind::ALL.iter().position(|k| *k == f.kind).unwrap_or(0);
            let mut result = json!({
                "ruleId": f.kind.rule_id(),
                "ruleIndex": index,
                "level": "error",
                "message": {"text": message(f)},
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": {"uri": uri_of(f.place.file.trim_start_matches("./"))},
                        "region": {"startLine": f.place.line.max(1)},
                    }
                }],
            });
            if let (Some(commit), Some(obj)) = (&f.place.commit, result.as_object_mut()) {
                obj.insert("properties".into(), json!({"commit": commit}));
            }
            result
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "keyward scan",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": rules,
            }},
            "results": results,
        }],
    })
}

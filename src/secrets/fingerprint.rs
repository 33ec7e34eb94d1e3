//! Keyed fingerprints of stored values, for the discovery scan
//! (`keyward.v1.Scan/Match`): which secret a value found in a file is,
//! without the server ever revealing a value.
//!
//! A fingerprint is HMAC-SHA256 of one field's value under a key derived
//! from the keyring for the purpose `scan/value-fingerprint` (so a copy of
//! the store without the keyring cannot test a guess against them). The
//! fingerprints of a version exist while it holds a stage (`current`,
//! `previous`, `pending`) and is not destroyed; they are written and
//! dropped with the metadata change that decides it (put, promotion,
//! clearing a pending version, destroy), under the path's write lock: in
//! the same batch, except a Put on sled, which writes its records one at a
//! time (`SecretStore::write_in_order`; a match then checks each
//! fingerprint against the metadata and the version's list). A write costs
//! one HMAC per field.
//!
//! Storage prefix `scan/` (through the barrier):
//! - `scan/fp/<hex fingerprint>/<path>#<version, 20 digits>`: the field
//!   names of that version holding the value (sled; on etcd before 0.6.10);
//! - the version's list of its fingerprints, so they can be dropped without
//!   its data: on etcd in the version's metadata record
//!   (`VersionRecord::prints`, written in the same transaction; since
//!   0.6.6), on sled the record `scan/ver/<path>#<version, 20 digits>`
//!   (written before the fingerprints, so the next write finds those of a
//!   cut-off one). Both forms are read on both stores: a store copied from
//!   sled to etcd keeps its lists, an etcd snapshot restored onto sled has
//!   lists in its metadata, and a version whose metadata a node of 0.6.5 or
//!   older rewrote (it drops the fields it does not know) is listed
//!   nowhere: its fingerprints are found again from its values.
//!
//! On etcd since 0.6.10 the list in the metadata is the only copy
//! (`VersionRecord::prints_unrecorded`): no `scan/fp/` record is written,
//! and a Match looks values up in the node's in-memory index
//! (`print_index`), built from the metadata and kept right by the store's
//! change feed. Records a node of 0.6.6 to 0.6.9 wrote are dropped with
//! their version's stage as before, and never read.
//!
//! Versions written before this existed have no fingerprints until the
//! next write of their secret.

use std::collections::BTreeMap;

use prost::Message;
use zeroize::Zeroize;

use super::print_index::{PathPrints, Source, Tag};
use super::{data_key, MetaRecord, SecretPath, SecretStore, SecretsError};
use crate::secrecy::SecretData;

const FP: &str = "scan/fp/";
pub(super) const VER: &str = "scan/ver/";
/// The derivation purpose of the fingerprint key.
const PURPOSE: &str = "scan/value-fingerprint";

#[derive(Clone, PartialEq, Message)]
struct FieldNames {
    #[prost(string, repeated, tag = "1")]
    fields: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct VersionPrints {
    #[prost(string, repeated, tag = "1")]
    keys: Vec<String>,
}

/// A stored version holding a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueMatch {
    pub path: String,
    pub version: u64,
    pub fields: Vec<String>,
}

/// The writes and deletes that keep the fingerprints in step with a
/// metadata change; added to the change's batch.
#[derive(Default)]
pub(super) struct PrintOps {
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
    /// The records read to decide them, with their stamps (`None`:
    /// absent): a write on a shared store checks they are unchanged.
    pub read: Vec<(String, Option<crate::barrier::Stamp>)>,
}

impl PrintOps {
    pub fn extend_batch<'a>(&'a self, ops: &mut Vec<crate::barrier::PlainOp<'a>>) {
        use crate::barrier::PlainOp;
        ops.extend(self.puts.iter().map(|(k, v)| PlainOp::Put(k, v)));
        ops.extend(self.deletes.iter().map(|k| PlainOp::Delete(k)));
    }
}

fn tag_of(key: &ring::hmac::Key, value: &[u8]) -> Tag {
    let mut tag = [0u8; 32];
    tag.copy_from_slice(ring::hmac::sign(key, value).as_ref());
    tag
}

/// What the node's index reads: metadata records (all of them in one range
/// read, or one marked path's from the store), and for a staged version its
/// metadata lists nowhere (written on sled, or by a node of 0.6.5 or older)
/// its `scan/ver/` list, or failing that the fingerprints of its values.
struct IndexSource<'a> {
    store: &'a SecretStore,
    key: &'a ring::hmac::Key,
    fresh: bool,
    /// Only versions listed with `prints_unrecorded` (sled).
    only_unrecorded: bool,
}

impl IndexSource<'_> {
    fn prints_of(&self, path: &SecretPath, meta: &MetaRecord) -> Result<PathPrints, SecretsError> {
        let mut out = Vec::new();
        for version in stages(meta) {
            if !meta.is_staged_and_kept(version) || out.iter().any(|(v, _)| *v == version) {
                continue;
            }
            let Some(record) = meta.version(version) else {
                continue;
            };
            if self.only_unrecorded && !(record.prints_listed && record.prints_unrecorded) {
                continue;
            }
            let tags = if record.prints_listed {
                record
                    .prints
                    .iter()
                    .filter_map(|t| Tag::try_from(t.as_slice()).ok())
                    .collect()
            } else {
                // A list that cannot be read only costs the decryption of
                // the values: a wrong list could hide a match, never make
                // one (each hit is checked against the data).
                match self.version_list(path, version) {
                    Ok(Some(tags)) => tags,
                    Ok(None) => self.value_tags(path, version)?,
                    Err(e) if e.is_damaged_record() => self.value_tags(path, version)?,
                    Err(e) => return Err(e),
                }
            };
            out.push((version, tags));
        }
        Ok(out)
    }

    /// The fingerprints a `scan/ver/` record lists for `version` (written
    /// on sled, carried to etcd by `keyward migrate`): the tags are in its
    /// record keys, so no value is decrypted. `None` when there is none.
    fn version_list(
        &self,
        path: &SecretPath,
        version: u64,
    ) -> Result<Option<Vec<Tag>>, SecretsError> {
        let ver_key = format!("{VER}{}", version_suffix(path, version));
        let Some(raw) = self.store.barrier.get_fenced(&ver_key, self.fresh)? else {
            return Ok(None);
        };
        let listed = VersionPrints::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
        let mut tags = Vec::with_capacity(listed.keys.len());
        for key in &listed.keys {
            let hex_tag = key
                .strip_prefix(FP)
                .and_then(|rest| rest.split_once('/'))
                .map(|(tag, _)| tag)
                .ok_or(SecretsError::Corrupt)?;
            let bytes = hex::decode(hex_tag).map_err(|_| SecretsError::Corrupt)?;
            tags.push(Tag::try_from(bytes.as_slice()).map_err(|_| SecretsError::Corrupt)?);
        }
        Ok(Some(tags))
    }

    /// The fingerprints of `version`'s stored values (none when its data
    /// is gone).
    fn value_tags(&self, path: &SecretPath, version: u64) -> Result<Vec<Tag>, SecretsError> {
        let Some(mut fields) = self.fields(path, version)? else {
            return Ok(Vec::new());
        };
        let tags = fields
            .fields
            .values()
            .map(|v| tag_of(self.key, v))
            .collect();
        fields.fields.values_mut().for_each(|v| v.zeroize());
        Ok(tags)
    }

    fn fields(
        &self,
        path: &SecretPath,
        version: u64,
    ) -> Result<Option<super::FieldsRecord>, SecretsError> {
        let Some(raw) = self
            .store
            .barrier
            .get_fenced(&data_key(path, version), self.fresh)?
        else {
            return Ok(None);
        };
        super::FieldsRecord::decode(raw.as_slice())
            .map(Some)
            .map_err(|_| SecretsError::Corrupt)
    }

    /// The names of `path`'s `version`'s fields whose fingerprint is `tag`
    /// (none when the version's data is gone).
    fn fields_holding(
        &self,
        path: &str,
        version: u64,
        tag: &Tag,
    ) -> Result<Vec<String>, SecretsError> {
        let path = SecretPath::parse(path).map_err(|_| SecretsError::Corrupt)?;
        let Some(mut fields) = self.fields(&path, version)? else {
            return Ok(Vec::new());
        };
        let names = fields
            .fields
            .iter()
            .filter(|(_, v)| tag_of(self.key, v) == *tag)
            .map(|(name, _)| name.clone())
            .collect();
        fields.fields.values_mut().for_each(|v| v.zeroize());
        Ok(names)
    }
}

impl Source for IndexSource<'_> {
    /// A secret whose records do not decrypt or decode is left out and
    /// logged (its path only), so one damaged record does not stop every
    /// Match.
    fn all(&self) -> Result<Vec<(String, PathPrints)>, SecretsError> {
        let mut out = Vec::new();
        for (key, raw) in self.store.barrier.scan_prefix_each(super::META)? {
            let Some(path) = key.strip_prefix(super::META) else {
                continue;
            };
            let prints = raw.map_err(SecretsError::from).and_then(|raw| {
                let parsed = SecretPath::parse(path).map_err(|_| SecretsError::Corrupt)?;
                let meta = MetaRecord::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
                self.prints_of(&parsed, &meta)
            });
            match prints {
                Ok(prints) => out.push((path.to_owned(), prints)),
                Err(e) if e.is_damaged_record() => {
                    tracing::warn!(
                        path,
                        "a secret's records do not decode; left out of the scan index"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Read from the store itself, never the read cache: the mark this
    /// read answers was set by the same delivery that removed the cache's
    /// entry, and this way the answer does not depend on which of the two
    /// listeners ran first.
    fn one(&self, path: &str) -> Result<PathPrints, SecretsError> {
        let path = SecretPath::parse(path).map_err(|_| SecretsError::Corrupt)?;
        match self.store.metadata(&path) {
            Ok(meta) => self.prints_of(&path, &meta),
            Err(SecretsError::NotFound) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

/// `<path>#<version>` as in the data keys (the `#` and 20 digits).
fn version_suffix(path: &SecretPath, version: u64) -> String {
    let data = data_key(path, version);
    let at = data.rfind('#').unwrap_or(0);
    format!("{path}{}", &data[at..])
}

/// The staged versions of a metadata record before a change, with the
/// fingerprints its records list (see `VersionRecord::prints_listed`).
pub(super) struct Staged {
    versions: [u64; 3],
    /// The staged versions whose metadata lists their fingerprints.
    listed: Vec<(u64, Vec<Vec<u8>>)>,
    /// Those of them with no `scan/fp/` record (`prints_unrecorded`).
    unrecorded: Vec<u64>,
}

impl Staged {
    /// The fingerprints `version`'s record lists; `None` when its list is
    /// a `scan/ver/` record.
    fn listed(&self, version: u64) -> Option<&[Vec<u8>]> {
        self.listed
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, prints)| prints.as_slice())
    }
}

pub(super) fn staged(meta: &MetaRecord) -> Staged {
    let versions = stages(meta);
    let listed = meta
        .versions
        .iter()
        .filter(|v| v.prints_listed && versions.contains(&v.version))
        .map(|v| (v.version, v.prints.clone()))
        .collect();
    let unrecorded = meta
        .versions
        .iter()
        .filter(|v| v.prints_listed && v.prints_unrecorded && versions.contains(&v.version))
        .map(|v| v.version)
        .collect();
    Staged {
        versions,
        listed,
        unrecorded,
    }
}

/// The staged versions of a metadata record (0 for none).
fn stages(meta: &MetaRecord) -> [u64; 3] {
    [meta.current, meta.previous, meta.pending]
}

/// `scan/fp/<hex tag>/<path>#<version>`.
fn fp_key(tag: &[u8], suffix: &str) -> String {
    format!("{FP}{}/{suffix}", hex::encode(tag))
}

impl SecretStore {
    fn print_key(&self) -> Result<ring::hmac::Key, SecretsError> {
        let key = self.barrier.derive_key(PURPOSE)?;
        Ok(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            key.as_slice(),
        ))
    }

    /// The fingerprint changes of a metadata change from `before` (staged
    /// versions) to `after`, plus the fingerprints of `new`'s fields.
    ///
    /// `after` is the changed metadata, not yet encoded: on a shared store
    /// it is made to list the new version's fingerprints, and a version
    /// that loses its stage loses its listed ones.
    pub(super) fn print_ops(
        &self,
        path: &SecretPath,
        before: &Staged,
        touched: Option<u64>,
        after: &mut MetaRecord,
        new: Option<(u64, &SecretData)>,
    ) -> Result<PrintOps, SecretsError> {
        self.print_ops_fenced(path, before, touched, after, new, false)
    }

    /// The fingerprint keys `version`'s stored values have (none when its
    /// data is gone). The data record's stamp joins `read`, so a guarded
    /// write compares it too.
    fn prints_from_values(
        &self,
        path: &SecretPath,
        version: u64,
        suffix: &str,
        fresh: bool,
        read: &mut Vec<(String, Option<crate::barrier::Stamp>)>,
    ) -> Result<Vec<String>, SecretsError> {
        let data_k = data_key(path, version);
        let found = self.barrier.get_stamped_fenced(&data_k, fresh)?;
        read.push((data_k, found.as_ref().map(|(_, s)| s.clone())));
        let Some((raw, _)) = found else {
            return Ok(Vec::new());
        };
        let mut fields =
            super::FieldsRecord::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
        let key = self.print_key()?;
        let mut keys: Vec<String> = fields
            .fields
            .values()
            .map(|value| fp_key(ring::hmac::sign(&key, value).as_ref(), suffix))
            .collect();
        fields.fields.values_mut().for_each(|v| v.zeroize());
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    /// Whether a new version's fingerprints are listed in its metadata:
    /// on a shared store, where one transaction writes them together, so a
    /// list is never missing for fingerprints that exist. On sled the
    /// records go one at a time, and the `scan/ver/` list written before
    /// the fingerprints is what finds those of a cut-off write. (The test
    /// switch `prints_in_meta` lists in the metadata on sled too, which is
    /// not crash-safe there: only for tests of the form.)
    fn lists_in_meta(&self) -> bool {
        #[cfg(test)]
        if self
            .prints_in_meta
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return true;
        }
        self.barrier.is_shared_store()
    }

    /// Whether a new version's fingerprints get `scan/fp/` records: on a
    /// store this process owns. On a shared store (etcd) each operation of
    /// a write's transaction costs every member CPU, and the records would
    /// be two of a Put's five; the metadata's list is the only copy there,
    /// and a Match reads it through the node's index (`print_index`).
    fn records_prints(&self) -> bool {
        #[cfg(test)]
        if self
            .prints_unrecorded
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        !self.barrier.is_shared_store()
    }

    /// [`Self::print_ops`] for a request whose cache fence said `fresh`.
    pub(super) fn print_ops_fenced(
        &self,
        path: &SecretPath,
        before: &Staged,
        touched: Option<u64>,
        after: &mut MetaRecord,
        new: Option<(u64, &SecretData)>,
        fresh: bool,
    ) -> Result<PrintOps, SecretsError> {
        let mut ops = PrintOps::default();
        let mut gone: Vec<u64> = before
            .versions
            .into_iter()
            .chain(touched)
            .filter(|v| *v != 0 && !after.is_staged_and_kept(*v))
            .collect();
        gone.sort_unstable();
        gone.dedup();
        for version in gone {
            let suffix = version_suffix(path, version);
            if let Some(listed) = before.listed(version) {
                // Listed in the metadata, whose stamp the write compares.
                let keys: Vec<String> = listed.iter().map(|tag| fp_key(tag, &suffix)).collect();
                if !self.lists_in_meta() {
                    // On sled the metadata (list cleared) is written before
                    // the fingerprints go: a list record written first and
                    // dropped last lets the next write find them if a crash
                    // comes between (`stray_prints`).
                    let ver_key = format!("{VER}{suffix}");
                    let list = VersionPrints { keys: keys.clone() };
                    ops.puts.push((ver_key.clone(), list.encode_to_vec()));
                    ops.deletes.extend(keys);
                    ops.deletes.push(ver_key);
                } else if !before.unrecorded.contains(&version) {
                    // Listed by a node of 0.6.6 to 0.6.9, which also wrote
                    // the records.
                    ops.deletes.extend(keys);
                }
                if let Some(record) = after.versions.iter_mut().find(|v| v.version == version) {
                    record.prints.clear();
                }
                continue;
            }
            let ver_key = format!("{VER}{suffix}");
            let found = self.barrier.get_stamped_fenced(&ver_key, fresh)?;
            ops.read
                .push((ver_key.clone(), found.as_ref().map(|(_, s)| s.clone())));
            if let Some((raw, _)) = found {
                let prints =
                    VersionPrints::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
                ops.deletes.extend(prints.keys);
                ops.deletes.push(ver_key);
            } else if before.versions.contains(&version) {
                // A staged version listed nowhere: its metadata was written
                // by a node of 0.6.5 or older, which drops the fields it
                // does not know (`prints_listed`, `prints`). Its
                // fingerprints are found again from its values.
                ops.deletes.extend(self.prints_from_values(
                    path,
                    version,
                    &suffix,
                    fresh,
                    &mut ops.read,
                )?);
            }
        }
        if let Some((version, data)) = new {
            if after.is_staged_and_kept(version) {
                let key = self.print_key()?;
                let suffix = version_suffix(path, version);
                let mut by_print: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
                for (field, value) in data.iter() {
                    let tag = ring::hmac::sign(&key, value.expose());
                    by_print
                        .entry(tag.as_ref().to_vec())
                        .or_default()
                        .push(field.clone());
                }
                let mut puts = Vec::with_capacity(by_print.len());
                let mut tags = Vec::with_capacity(by_print.len());
                for (tag, fields) in by_print {
                    puts.push((fp_key(&tag, &suffix), FieldNames { fields }.encode_to_vec()));
                    tags.push(tag);
                }
                let record = after.versions.iter_mut().find(|v| v.version == version);
                match record {
                    Some(record) if !self.records_prints() => {
                        // A shared store: the list in the metadata is the
                        // only copy (`print_index`).
                        record.prints_listed = true;
                        record.prints_unrecorded = true;
                        record.prints = tags;
                        return Ok(ops);
                    }
                    Some(record) if self.lists_in_meta() => {
                        record.prints_listed = true;
                        record.prints = tags;
                    }
                    _ => {
                        // The version's list goes first: a write made one
                        // record at a time (`SecretStore::write_in_order`)
                        // relies on it, so that every fingerprint it may
                        // have written is named by a list the next write of
                        // the version number finds.
                        let written = VersionPrints {
                            keys: puts.iter().map(|(k, _)| k.clone()).collect(),
                        };
                        ops.puts
                            .push((format!("{VER}{suffix}"), written.encode_to_vec()));
                    }
                }
                ops.puts.extend(puts);
            }
        }
        Ok(ops)
    }

    /// The stored versions (holding a stage, not destroyed) one of whose
    /// fields is exactly `value`. The value is neither kept nor logged.
    ///
    /// A fingerprint counts only while the secret's metadata stages its
    /// version and (on sled) the version's list names it. On sled a write's records
    /// go one at a time, so a crash can leave fingerprints of a version that
    /// was never written (its number then reused by the next write) or of
    /// one that lost its stage; neither is reported.
    pub fn match_value(&self, value: &[u8]) -> Result<Vec<ValueMatch>, SecretsError> {
        let fresh = self.barrier.cache_fence();
        Ok(self
            .match_values(&[value], fresh)?
            .into_iter()
            .next()
            .unwrap_or_default())
    }

    /// [`Self::match_value`] for each of `values`, in one request whose
    /// cache fence said `fresh` (taken at its start): on a shared store the
    /// node's index is brought up to date once for all of them.
    pub fn match_values(
        &self,
        values: &[&[u8]],
        fresh: bool,
    ) -> Result<Vec<Vec<ValueMatch>>, SecretsError> {
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.print_key()?;
        let tags: Vec<Tag> = values.iter().map(|v| tag_of(&key, v)).collect();
        if !self.barrier.is_shared_store() {
            let mut out = values
                .iter()
                .map(|v| self.match_recorded(v))
                .collect::<Result<Vec<_>, _>>()?;
            self.match_unrecorded(&key, &tags, &mut out)?;
            return Ok(out);
        }
        // Without a change feed the marks cannot be trusted: every Match
        // reads every metadata record.
        let fresh = fresh && self.barrier.coherence().is_some();
        let source = IndexSource {
            store: self,
            key: &key,
            fresh,
            only_unrecorded: false,
        };
        let found = self.index.lookup(&tags, fresh, &source)?;
        let mut out = Vec::with_capacity(found.len());
        for (hits, tag) in found.into_iter().zip(&tags) {
            let mut matches = Vec::new();
            for (path, version) in hits {
                let fields = source.fields_holding(&path, version, tag)?;
                if !fields.is_empty() {
                    matches.push(ValueMatch {
                        path,
                        version,
                        fields,
                    });
                }
            }
            out.push(matches);
        }
        Ok(out)
    }

    /// On sled, the matches among versions whose fingerprints only their
    /// metadata lists: versions an etcd vault of 0.6.10 or later wrote,
    /// whose snapshot was restored here (a store this process owns never
    /// writes such a version). They are read once, at the first Match, and
    /// each hit is checked against the metadata as it is now (a version
    /// loses its stage by a later write here, and never gains one back).
    fn match_unrecorded(
        &self,
        key: &ring::hmac::Key,
        tags: &[Tag],
        out: &mut [Vec<ValueMatch>],
    ) -> Result<(), SecretsError> {
        let source = IndexSource {
            store: self,
            key,
            fresh: true,
            only_unrecorded: true,
        };
        let found = self.unrecorded.lookup(tags, true, &source)?;
        for ((hits, tag), matches) in found.into_iter().zip(tags).zip(out.iter_mut()) {
            for (path, version) in hits {
                let parsed = SecretPath::parse(&path).map_err(|_| SecretsError::Corrupt)?;
                match self.metadata(&parsed) {
                    Ok(meta) if meta.is_staged_and_kept(version) => {}
                    Ok(_) | Err(SecretsError::NotFound) => continue,
                    Err(e) => return Err(e),
                }
                let fields = source.fields_holding(&path, version, tag)?;
                if !fields.is_empty() {
                    matches.push(ValueMatch {
                        path,
                        version,
                        fields,
                    });
                }
            }
        }
        Ok(())
    }

    /// A match through the `scan/fp/` records (a store this process owns).
    fn match_recorded(&self, value: &[u8]) -> Result<Vec<ValueMatch>, SecretsError> {
        let key = self.print_key()?;
        let print = hex::encode(ring::hmac::sign(&key, value).as_ref());
        let prefix = format!("{FP}{print}/");
        let mut out = Vec::new();
        for (k, raw) in self.barrier.scan_prefix(&prefix)? {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            let Some((path, version)) = rest.rsplit_once('#') else {
                return Err(SecretsError::Corrupt);
            };
            let version: u64 = version.parse().map_err(|_| SecretsError::Corrupt)?;
            if !self.print_stands(path, version, &k)? {
                continue;
            }
            let names = FieldNames::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
            out.push(ValueMatch {
                path: path.to_owned(),
                version,
                fields: names.fields,
            });
        }
        Ok(out)
    }

    /// Whether the fingerprint record `print_key` of `path`'s `version` is
    /// one the store stands by: the metadata stages the version (not
    /// destroyed) and, on sled, the version's list of fingerprints names
    /// the record.
    fn print_stands(
        &self,
        path: &str,
        version: u64,
        print_key: &str,
    ) -> Result<bool, SecretsError> {
        let path = SecretPath::parse(path).map_err(|_| SecretsError::Corrupt)?;
        let meta = match self.metadata(&path) {
            Ok(meta) => meta,
            Err(SecretsError::NotFound) => return Ok(false),
            Err(e) => return Err(e),
        };
        if !meta.is_staged_and_kept(version) {
            return Ok(false);
        }
        if self.barrier.is_shared_store() {
            // On etcd a write's records go in one transaction: a staged
            // version's fingerprints are its own. (The stage is checked
            // still: a node of 0.6.5 or older, during a rolling upgrade,
            // drops a metadata-listed version's fingerprints from its
            // metadata without deleting them.)
            return Ok(true);
        }
        if let Some(record) = meta.version(version).filter(|v| v.prints_listed) {
            let suffix = version_suffix(&path, version);
            return Ok(record
                .prints
                .iter()
                .any(|tag| fp_key(tag, &suffix) == print_key));
        }
        let ver_key = format!("{VER}{}", version_suffix(&path, version));
        let Some(raw) = self.barrier.get(&ver_key)? else {
            return Ok(false);
        };
        let listed = VersionPrints::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
        Ok(listed.keys.iter().any(|k| k == print_key))
    }

    /// Fingerprint records of `path` that `after` no longer stands by and
    /// `planned` neither drops nor writes: the lists (and their
    /// fingerprints) of versions it does not stage, and the fingerprints of
    /// an earlier list of the version `planned` lists anew. After finished
    /// writes there are none; a write cut off by a crash leaves some, which
    /// the next write of the path finds here.
    pub(super) fn stray_prints(
        &self,
        path: &SecretPath,
        after: &MetaRecord,
        planned: &PrintOps,
    ) -> Result<Vec<String>, SecretsError> {
        let mut out = Vec::new();
        for (ver_key, version) in self.versioned_keys(VER, path)? {
            let written = |k: &String| planned.puts.iter().any(|(p, _)| p == k);
            // The list of the version this write makes already exists only
            // when a write of the same number was cut off: the fingerprints
            // it names and this write does not are strays.
            let relisted = written(&ver_key);
            if !relisted
                && (after.is_staged_and_kept(version) || planned.deletes.contains(&ver_key))
            {
                continue;
            }
            if let Some(raw) = self.barrier.get(&ver_key)? {
                let listed =
                    VersionPrints::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
                out.extend(listed.keys.into_iter().filter(|k| !written(k)));
            }
            if !relisted {
                out.push(ver_key);
            }
        }
        Ok(out)
    }

    /// How many fingerprint keys the store holds (for tests and tools).
    pub fn fingerprint_count(&self) -> Result<usize, SecretsError> {
        Ok(self.barrier.scan_keys(FP)?.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::barrier::{Barrier, BarrierOptions};
    use crate::policy::Capability;
    use crate::secrecy::SecretBytes;
    use crate::secrets::{DataLimits, PutRequest, Selector, Stage};
    use crate::storage::SledBackend;

    fn store() -> (tempfile::TempDir, SecretStore) {
        let (dir, store, _) = store_and_share();
        (dir, store)
    }

    /// [`store`], and the unseal share of its barrier.
    fn store_and_share() -> (tempfile::TempDir, SecretStore, crate::barrier::UnsealShare) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path()).unwrap();
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
        let share = barrier.init(1, 1).unwrap().remove(0);
        barrier.unseal(&share.0).unwrap();
        let store = SecretStore::new(Arc::new(barrier), DataLimits::default());
        (dir, store, share)
    }

    fn proof(path: &str, cap: Capability) -> crate::policy::Authorized {
        crate::policy::PolicySet::compile([&crate::policy::Policy::root()])
            .unwrap()
            .authorize(&format!("secret/{path}"), cap)
            .unwrap()
    }

    fn put(store: &SecretStore, path: &str, fields: &[(&str, &str)], stage: Stage) -> u64 {
        let data: SecretData = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), SecretBytes::from(*v)))
            .collect();
        let req = PutRequest {
            path: SecretPath::parse(path).unwrap(),
            data,
            cas: None,
            max_versions: None,
            owner: None,
            stage,
        };
        store
            .put(&proof(path, Capability::Write), req, 1_000)
            .unwrap()
    }

    fn matched(store: &SecretStore, value: &str) -> Vec<(String, u64, Vec<String>)> {
        store
            .match_value(value.as_bytes())
            .unwrap()
            .into_iter()
            .map(|m| (m.path, m.version, m.fields))
            .collect()
    }

    /// A Put on sled writes its records one at a time. Stopped after any
    /// number of them, as by a crash, readers get the old secret or the new
    /// one whole, and a value matches exactly when a version the metadata
    /// stages holds it, also after the next write reuses the version number
    /// of a write that never took effect.
    #[test]
    fn a_put_stopped_after_any_record_leaves_old_or_new_and_only_true_matches() {
        use std::sync::atomic::Ordering;
        let path = SecretPath::parse("app/db").unwrap();
        let write = |store: &SecretStore, password: &str| {
            let data: SecretData = [
                ("password".to_owned(), SecretBytes::from(password)),
                ("user".to_owned(), SecretBytes::from("user-Value-Same")),
            ]
            .into_iter()
            .collect();
            store.put(
                &proof("app/db", Capability::Write),
                PutRequest {
                    path: path.clone(),
                    data,
                    cas: None,
                    max_versions: Some(2),
                    owner: None,
                    stage: Stage::Current,
                },
                1_000,
            )
        };
        let mut stops = 0;
        for stop in 0.. {
            let (_dir, store) = store();
            write(&store, "first-Value-0001").unwrap();
            write(&store, "second-Value-002").unwrap();
            store.crash_after.store(stop, Ordering::SeqCst);
            let third = write(&store, "third-Value-0003");
            store.crash_after.store(usize::MAX, Ordering::SeqCst);
            let current = store.get(&path, Selector::Stage(Stage::Current)).unwrap();
            let password = current.data["password"].expose().to_vec();
            let took = current.version == 3;
            assert!(
                took || current.version == 2,
                "stop {stop}: version {}",
                current.version
            );
            let expected: &[u8] = if took {
                b"third-Value-0003"
            } else {
                b"second-Value-002"
            };
            assert_eq!(password, expected, "stop {stop}");
            // Version 1 loses its stage with the third write's metadata.
            assert_eq!(
                !matched(&store, "first-Value-0001").is_empty(),
                !took,
                "stop {stop}"
            );
            assert_eq!(
                matched(&store, "third-Value-0003"),
                if took {
                    vec![("app/db".into(), 3, vec!["password".into()])]
                } else {
                    vec![]
                },
                "stop {stop}"
            );
            assert_eq!(matched(&store, "second-Value-002").len(), 1, "stop {stop}");
            assert_eq!(matched(&store, "user-Value-Same").len(), 2, "stop {stop}");
            // The next write: version 3 again if the third never took effect.
            let next = write(&store, "fourth-Value-004").unwrap();
            assert_eq!(next, if took { 4 } else { 3 }, "stop {stop}");
            assert_eq!(
                matched(&store, "third-Value-0003").len(),
                usize::from(took),
                "stop {stop}: the unfinished write's value matched"
            );
            assert_eq!(
                matched(&store, "fourth-Value-004"),
                [("app/db".into(), next, vec!["password".into()])]
            );
            // The next write leaves nothing of a cut-off one behind: the
            // data of the two listed versions (`max_versions` 2) and the
            // fingerprints of the two staged ones (two fields each), nothing
            // else.
            assert_eq!(
                store
                    .barrier
                    .scan_keys("secrets/data/app/db#")
                    .unwrap()
                    .len(),
                2,
                "stop {stop}"
            );
            assert_eq!(store.fingerprint_count().unwrap(), 4, "stop {stop}");
            assert_eq!(
                store.barrier.scan_keys("scan/ver/app/db#").unwrap().len(),
                2,
                "stop {stop}"
            );
            if third.is_ok() {
                break;
            }
            stops += 1;
        }
        // data, two fingerprints and their list, metadata, then the pruned
        // version's data and version 1's fingerprints and list: each a stop.
        assert_eq!(stops, 9);
    }

    /// A store whose new versions list their fingerprints in the metadata
    /// (as on a shared store) when `in_meta`.
    fn store_listing(in_meta: bool) -> (tempfile::TempDir, SecretStore) {
        let (dir, store) = store();
        store
            .prints_in_meta
            .store(in_meta, std::sync::atomic::Ordering::SeqCst);
        (dir, store)
    }

    fn list_records(store: &SecretStore) -> usize {
        store.barrier.scan_keys(VER).unwrap().len()
    }

    #[test]
    fn current_and_previous_match_older_and_destroyed_do_not() {
        for in_meta in [false, true] {
            current_and_previous_match_older_and_destroyed_do_not_with(in_meta);
        }
    }

    fn current_and_previous_match_older_and_destroyed_do_not_with(in_meta: bool) {
        let (_dir, store) = store_listing(in_meta);
        put(
            &store,
            "app/db",
            &[("password", "first-Value-0001"), ("user", "u-Value-Same-1")],
            Stage::Current,
        );
        put(
            &store,
            "app/db",
            &[("password", "second-Value-002"), ("user", "u-Value-Same-1")],
            Stage::Current,
        );
        assert_eq!(
            matched(&store, "first-Value-0001"),
            [("app/db".into(), 1, vec!["password".into()])]
        );
        assert_eq!(
            matched(&store, "second-Value-002"),
            [("app/db".into(), 2, vec!["password".into()])]
        );
        assert_eq!(matched(&store, "u-Value-Same-1").len(), 2);
        // A third value: version 1 holds no stage any more.
        put(
            &store,
            "app/db",
            &[("password", "third-Value-0003")],
            Stage::Current,
        );
        assert!(matched(&store, "first-Value-0001").is_empty());
        assert_eq!(matched(&store, "second-Value-002").len(), 1);
        // Destroying the previous version drops its fingerprints at once.
        let path = SecretPath::parse("app/db").unwrap();
        store
            .destroy(&proof("app/db", Capability::Destroy), &path, 2, 2_000)
            .unwrap();
        assert!(matched(&store, "second-Value-002").is_empty());
        assert_eq!(matched(&store, "third-Value-0003").len(), 1);
        // Nothing else close matches, and the keys hold no value.
        assert!(matched(&store, "third-Value-0004").is_empty());
        assert_eq!(store.fingerprint_count().unwrap(), 1);
        // One list record for the one version with fingerprints, or none
        // when the metadata lists them.
        assert_eq!(
            list_records(&store),
            usize::from(!in_meta),
            "in_meta {in_meta}"
        );
    }

    #[test]
    fn pending_values_match_until_cleared_and_promotion_drops_the_old_previous() {
        for in_meta in [false, true] {
            pending_values_match_until_cleared_with(in_meta);
        }
    }

    fn pending_values_match_until_cleared_with(in_meta: bool) {
        let (_dir, store) = store_listing(in_meta);
        let path = SecretPath::parse("svc/key").unwrap();
        put(
            &store,
            "svc/key",
            &[("k", "v1-aaaaaaaaaaaa")],
            Stage::Current,
        );
        put(
            &store,
            "svc/key",
            &[("k", "v2-bbbbbbbbbbbb")],
            Stage::Current,
        );
        let p = put(
            &store,
            "svc/key",
            &[("k", "v3-cccccccccccc")],
            Stage::Pending,
        );
        assert_eq!(matched(&store, "v3-cccccccccccc").len(), 1);
        store.promote_pending(&path, p, 2_000).unwrap();
        assert!(matched(&store, "v1-aaaaaaaaaaaa").is_empty());
        assert_eq!(matched(&store, "v2-bbbbbbbbbbbb").len(), 1);
        let q = put(
            &store,
            "svc/key",
            &[("k", "v4-dddddddddddd")],
            Stage::Pending,
        );
        assert_eq!(q, 4);
        store.clear_pending(&path, 3_000).unwrap();
        assert!(matched(&store, "v4-dddddddddddd").is_empty());
        assert_eq!(matched(&store, "v3-cccccccccccc").len(), 1);
        // Versions 3 (current) and 2 (previous) hold fingerprints.
        assert_eq!(store.fingerprint_count().unwrap(), 2);
        assert_eq!(list_records(&store), if in_meta { 0 } else { 2 });
    }

    /// A sled store holding versions whose metadata lists their
    /// fingerprints (an etcd snapshot restored onto sled): a Put that takes
    /// a stage from one, stopped after any of its records, leaves nothing
    /// of its fingerprints behind once the next Put ran.
    #[test]
    fn a_cut_off_put_on_sled_leaves_nothing_of_a_metadata_listed_version() {
        use std::sync::atomic::Ordering;
        let fields = |p: &'static str| [("password", p), ("user", "user-Value-Same")];
        let mut stops = 0;
        for stop in 0.. {
            let (_dir, store) = store_listing(true);
            put(
                &store,
                "app/db",
                &fields("first-Value-0001"),
                Stage::Current,
            );
            put(
                &store,
                "app/db",
                &fields("second-Value-002"),
                Stage::Current,
            );
            store.prints_in_meta.store(false, Ordering::SeqCst);
            store.crash_after.store(stop, Ordering::SeqCst);
            let data: SecretData = fields("third-Value-0003")
                .iter()
                .map(|(k, v)| ((*k).to_owned(), SecretBytes::from(*v)))
                .collect();
            let third = store.put(
                &proof("app/db", Capability::Write),
                PutRequest {
                    path: SecretPath::parse("app/db").unwrap(),
                    data,
                    cas: None,
                    max_versions: None,
                    owner: None,
                    stage: Stage::Current,
                },
                1_000,
            );
            store.crash_after.store(usize::MAX, Ordering::SeqCst);
            let fourth = put(
                &store,
                "app/db",
                &fields("fourth-Value-004"),
                Stage::Current,
            );
            // Current and previous, two fields each; no list is left of a
            // version without a stage (version 2, listed in its metadata,
            // is previous when the third write did not take).
            assert_eq!(store.fingerprint_count().unwrap(), 4, "stop {stop}");
            assert!(
                matched(&store, "first-Value-0001").is_empty(),
                "stop {stop}"
            );
            // The third write took when its metadata was written.
            let took = fourth == 4;
            assert!(took || fourth == 3, "stop {stop}: {fourth}");
            assert_eq!(
                list_records(&store),
                if took { 2 } else { 1 },
                "stop {stop}"
            );
            if third.is_ok() {
                break;
            }
            stops += 1;
        }
        assert!(stops >= 5, "{stops}");
    }

    /// A store written before fingerprints were listed in the metadata (or
    /// copied from sled to etcd) has `scan/ver/` lists; writes that list in
    /// the metadata drop those lists with their versions' stages, and
    /// matches stay exact throughout.
    #[test]
    fn versions_listed_either_way_lose_their_fingerprints_with_their_stage() {
        let (_dir, store) = store_listing(false);
        let path = SecretPath::parse("mix/db").unwrap();
        let fields = |p: &'static str| [("password", p), ("user", "mix-User-Same")];
        put(&store, "mix/db", &fields("old-Value-00001"), Stage::Current);
        put(&store, "mix/db", &fields("old-Value-00002"), Stage::Current);
        assert_eq!(list_records(&store), 2);
        store
            .prints_in_meta
            .store(true, std::sync::atomic::Ordering::SeqCst);
        put(&store, "mix/db", &fields("new-Value-00003"), Stage::Current);
        // Version 1 (listed in `scan/ver/`) lost its stage, and its list.
        assert_eq!(list_records(&store), 1);
        assert!(matched(&store, "old-Value-00001").is_empty());
        assert_eq!(matched(&store, "old-Value-00002").len(), 1);
        assert_eq!(
            matched(&store, "new-Value-00003"),
            [("mix/db".into(), 3, vec!["password".into()])]
        );
        assert_eq!(
            matched(&store, "mix-User-Same")
                .into_iter()
                .map(|m| m.1)
                .collect::<Vec<_>>(),
            [2, 3]
        );
        put(&store, "mix/db", &fields("new-Value-00004"), Stage::Current);
        assert_eq!(list_records(&store), 0);
        assert!(matched(&store, "old-Value-00002").is_empty());
        let p = put(&store, "mix/db", &fields("new-Value-00005"), Stage::Pending);
        assert_eq!(matched(&store, "new-Value-00005").len(), 1);
        // Version 3 loses its stage by the promotion: its fingerprints,
        // listed in the metadata, go, and the metadata lists none for it.
        store.promote_pending(&path, p, 2_000).unwrap();
        assert!(matched(&store, "new-Value-00003").is_empty());
        let meta = store.metadata(&path).unwrap();
        let listed = |v: u64| meta.version(v).unwrap().prints.len();
        assert_eq!((listed(3), listed(4), listed(5)), (0, 2, 2));
        // Destroying the previous version drops its listed fingerprints.
        store
            .destroy(&proof("mix/db", Capability::Destroy), &path, 4, 3_000)
            .unwrap();
        assert!(matched(&store, "new-Value-00004").is_empty());
        // Version 5's two values; nothing else is left.
        assert_eq!(store.fingerprint_count().unwrap(), 2);
        assert_eq!(list_records(&store), 0);
    }

    /// A seal empties the index a Match filled (tags and paths); after
    /// the unseal the next Match reads it again and finds the same.
    #[test]
    fn a_seal_empties_the_index_a_match_filled() {
        use std::sync::atomic::Ordering;
        let (_dir, etcd_written, share) = store_and_share();
        etcd_written.prints_unrecorded.store(true, Ordering::SeqCst);
        put(
            &etcd_written,
            "app/a",
            &[("k", "sealed-Value-01")],
            Stage::Current,
        );
        let store = SecretStore::new(Arc::clone(&etcd_written.barrier), DataLimits::default());
        let found = [("app/a".to_owned(), 1, vec!["k".to_owned()])];
        assert_eq!(matched(&store, "sealed-Value-01"), found);
        assert_eq!(store.unrecorded.paths(), 1);
        store.barrier.seal();
        store.on_seal();
        assert_eq!(store.unrecorded.paths(), 0);
        assert!(store.match_value(b"sealed-Value-01").is_err(), "sealed");
        assert_eq!(store.unrecorded.paths(), 0);
        store.barrier.unseal(&share.0).unwrap();
        assert_eq!(matched(&store, "sealed-Value-01"), found);
    }

    /// An etcd snapshot of 0.6.10 or later restored onto sled holds
    /// versions whose fingerprints only their metadata lists (no record).
    /// A Match on sled finds them (read once, at the first Match of the
    /// process), as long as the metadata stages them, beside the versions
    /// written here (records), and the version that loses its stage to a
    /// write here stops matching.
    #[test]
    fn versions_an_etcd_snapshot_brought_to_sled_match_while_staged() {
        use std::sync::atomic::Ordering;
        let (_dir, etcd_written) = store();
        etcd_written.prints_unrecorded.store(true, Ordering::SeqCst);
        put(
            &etcd_written,
            "app/a",
            &[("k", "restored-Value-01")],
            Stage::Current,
        );
        put(
            &etcd_written,
            "app/a",
            &[("k", "restored-Value-02"), ("j", "restored-Value-02")],
            Stage::Current,
        );
        put(
            &etcd_written,
            "app/b",
            &[("k", "restored-Value-02")],
            Stage::Pending,
        );
        assert_eq!(etcd_written.fingerprint_count().unwrap(), 0);
        assert_eq!(list_records(&etcd_written), 0);
        // The same store opened by a process of its own (the index starts
        // empty), writing as sled does.
        let store = SecretStore::new(Arc::clone(&etcd_written.barrier), DataLimits::default());
        let mut two = matched(&store, "restored-Value-02");
        two.sort();
        assert_eq!(
            two,
            [
                ("app/a".to_owned(), 2, vec!["j".to_owned(), "k".to_owned()]),
                ("app/b".to_owned(), 1, vec!["k".to_owned()]),
            ]
        );
        assert_eq!(
            matched(&store, "restored-Value-01"),
            [("app/a".to_owned(), 1, vec!["k".to_owned()])]
        );
        // A write here: version 1 loses its stage, version 3 has records.
        put(
            &store,
            "app/a",
            &[("k", "sled-Value-000003")],
            Stage::Current,
        );
        assert!(matched(&store, "restored-Value-01").is_empty());
        assert_eq!(
            matched(&store, "sled-Value-000003"),
            [("app/a".to_owned(), 3, vec!["k".to_owned()])]
        );
        assert_eq!(matched(&store, "restored-Value-02").len(), 2);
        // Destroyed: gone from the answer.
        store
            .destroy(
                &proof("app/b", Capability::Destroy),
                &SecretPath::parse("app/b").unwrap(),
                1,
                9,
            )
            .unwrap();
        assert_eq!(
            matched(&store, "restored-Value-02"),
            [("app/a".to_owned(), 2, vec!["j".to_owned(), "k".to_owned()])]
        );
    }
}

//! Tests: a sled store standing in for etcd's traits. `TestSled::shared`
//! says it is shared: two barriers over it are two nodes, each with its own
//! in-process locks, and its conditional writes check and write under one
//! mutex, as an etcd transaction does. `TestSled::bounded` takes batches
//! (conditional ones too) of at most so many operations and bytes, as etcd
//! does, records each batch's size and can fail one.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use super::{Backend, BatchOp, CasOutcome, Expected, KeyValues, SledBackend, StorageError};
use crate::barrier::{Barrier, BarrierOptions};

pub struct TestSled {
    inner: SledBackend,
    shared: bool,
    max_ops: usize,
    max_bytes: usize,
    /// The number of operations of each batch, in order.
    pub sizes: Mutex<Vec<usize>>,
    /// The batch (counted from 1) that fails.
    fail_at: Option<usize>,
    txn: Mutex<()>,
}

impl TestSled {
    pub fn shared(path: &std::path::Path) -> Self {
        Self::open(path, true, usize::MAX, usize::MAX, None)
    }

    /// Shared, and bounded as [`TestSled::bounded`] (no batch fails).
    pub fn shared_bounded(path: &std::path::Path, max_ops: usize, max_bytes: usize) -> Self {
        Self::open(path, true, max_ops, max_bytes, None)
    }

    pub fn bounded(
        path: &std::path::Path,
        max_ops: usize,
        max_bytes: usize,
        fail_at: Option<usize>,
    ) -> Self {
        Self::open(path, false, max_ops, max_bytes, fail_at)
    }

    fn open(
        path: &std::path::Path,
        shared: bool,
        max_ops: usize,
        max_bytes: usize,
        fail_at: Option<usize>,
    ) -> Self {
        Self {
            inner: SledBackend::open(path).unwrap(),
            shared,
            max_ops,
            max_bytes,
            sizes: Mutex::new(Vec::new()),
            fail_at,
            txn: Mutex::new(()),
        }
    }

    /// Checks a batch against the bounds, records its size and fails the
    /// one `fail_at` names.
    fn admit(&self, ops: &[BatchOp]) -> Result<(), StorageError> {
        let bytes: usize = ops
            .iter()
            .map(|op| match op {
                BatchOp::Put(k, v) => k.len() + v.len(),
                BatchOp::Delete(k) => k.len(),
            })
            .sum();
        assert!(
            ops.len() <= self.max_ops && bytes <= self.max_bytes,
            "a batch over the bounds"
        );
        let mut sizes = self.sizes.lock().unwrap();
        sizes.push(ops.len());
        if Some(sizes.len()) == self.fail_at {
            return Err(StorageError::Io("batch: refused".into()));
        }
        Ok(())
    }
}

/// Two barriers ("nodes") over one shared store in `path`, both unsealed.
pub fn two_barriers(path: &std::path::Path) -> (Barrier, Barrier) {
    two_barriers_over(Arc::new(TestSled::shared(path)))
}

/// Two barriers ("nodes") over `backend` (a shared one), both unsealed.
pub fn two_barriers_over(backend: Arc<dyn Backend>) -> (Barrier, Barrier) {
    let one = Barrier::new(backend.clone(), BarrierOptions::default()).unwrap();
    let shares = one.init(1, 1).unwrap();
    one.unseal(&shares[0].0).unwrap();
    let two = Barrier::new(backend, BarrierOptions::default()).unwrap();
    two.unseal(&shares[0].0).unwrap();
    (one, two)
}

impl Backend for TestSled {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(key)
    }
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        let _txn = self.txn.lock().unwrap();
        self.inner.put(key, value)
    }
    fn delete(&self, key: &[u8]) -> Result<(), StorageError> {
        let _txn = self.txn.lock().unwrap();
        self.inner.delete(key)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StorageError> {
        self.inner.scan_prefix(prefix)
    }
    fn scan_range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<KeyValues, StorageError> {
        self.inner.scan_range(start, end, limit)
    }
    fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, StorageError> {
        let _txn = self.txn.lock().unwrap();
        self.inner.compare_and_swap(key, expected, new)
    }
    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let _txn = self.txn.lock().unwrap();
        self.admit(&ops)?;
        self.inner.batch(ops)
    }
    fn batch_if(&self, expect: Expected, ops: Vec<BatchOp>) -> Result<bool, StorageError> {
        let _txn = self.txn.lock().unwrap();
        self.admit(&ops)?;
        for (key, value) in &expect {
            if self.inner.get(key)?.as_ref() != value.as_ref() {
                return Ok(false);
            }
        }
        self.inner.batch(ops)?;
        Ok(true)
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.inner.flush()
    }
    fn is_shared(&self) -> bool {
        self.shared
    }
    fn max_batch_ops(&self) -> usize {
        self.max_ops
    }
    fn max_batch_bytes(&self) -> usize {
        self.max_bytes
    }
}

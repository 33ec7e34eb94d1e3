//! Tests: a sled store that says it is shared, as etcd is. Two barriers
//! over it are two nodes, each with its own in-process locks; its
//! conditional writes check and write under one mutex, as an etcd
//! transaction does.

#![allow(clippy::unwrap_used)]

use super::{Backend, BatchOp, CasOutcome, Expected, KeyValues, SledBackend, StorageError};

pub struct SharedSled {
    inner: SledBackend,
    txn: std::sync::Mutex<()>,
}

impl SharedSled {
    pub fn open(path: &std::path::Path) -> Self {
        Self {
            inner: SledBackend::open(path).unwrap(),
            txn: std::sync::Mutex::new(()),
        }
    }
}

impl Backend for SharedSled {
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
        self.inner.batch(ops)
    }
    fn batch_if(&self, expect: Expected, ops: Vec<BatchOp>) -> Result<bool, StorageError> {
        let _txn = self.txn.lock().unwrap();
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
        true
    }
}

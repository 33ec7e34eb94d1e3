//! STUB: the sled implementation of `Backend` is being written.
pub struct SledBackend;

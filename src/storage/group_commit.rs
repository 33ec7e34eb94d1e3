//! STUB: group commit is being written.
pub struct GroupCommit;

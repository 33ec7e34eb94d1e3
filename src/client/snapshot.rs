//! `Sys.SnapshotSave`: the snapshot streamed from the server, chunk by chunk.

use super::{Client, ClientError};
use crate::proto::v1::{SnapshotChunk, SnapshotSaveRequest};

/// The chunks of a snapshot being saved; their `data`, in order, is the file.
pub struct SnapshotStream {
    inner: tonic::Streaming<SnapshotChunk>,
}

impl std::fmt::Debug for SnapshotStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStream").finish_non_exhaustive()
    }
}

impl SnapshotStream {
    /// The next chunk, `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<SnapshotChunk>, ClientError> {
        Ok(self.inner.message().await?)
    }
}

impl Client {
    /// Asks for a snapshot (`admin` on `sys/snapshot`). The server takes it
    /// before the first chunk arrives.
    pub async fn snapshot_save(&self) -> Result<SnapshotStream, ClientError> {
        let req = self.request(SnapshotSaveRequest {});
        let inner = self.sys().snapshot_save(req).await?.into_inner();
        Ok(SnapshotStream { inner })
    }
}

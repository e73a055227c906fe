//! Storing a file in a content destination (`layout = "content"`): its bytes once, as a
//! blob named by its content, and a pointer at its own key.
//!
//! The steps, in the order the collector's protocol needs them (docs/FORMAT.md, "Collecting
//! blobs"):
//! 1. name the blob (the plan from the file's first block, the name from its SHA-256);
//! 2. look for it: the index first, then one HEAD; upload it only when it is missing;
//! 3. write the pointer;
//! 4. HEAD the blob again *after* the pointer is written, and upload it when it is gone: a
//!    sweep may have set it aside between step 2 and step 3, before it could see the pointer.
//!    A sweep that lists pointers after step 3 sees the reference; one that listed them
//!    before has set the blob aside before step 4 looks, and step 4 puts it back.

use std::sync::Arc;

use crate::content;
use crate::destination::StoreError;
use crate::format::layout;
use crate::format::pointer::{POINTER_FORMAT, Pointer};
use crate::index::{BlobRef, Job, Method, ObjectRow};
use crate::pipeline::Pipeline;

use super::transfer::{self, Link, Target, Transferred};
use super::{Step, Worker};

/// A blob as found or sent: its key and stored bytes, and whether this job sent it.
struct Placed {
    key: String,
    stored_size: u64,
    uploaded: bool,
}

impl Worker {
    /// Store `job` as a blob and a pointer. `here`: what the index knows at the file's key.
    pub(super) async fn store_by_content(
        &self,
        job: &Job,
        here: Option<ObjectRow>,
    ) -> Result<Step, StoreError> {
        let identity = self.pipeline.identity();
        let blobs = Arc::new(self.pipeline.for_blobs());
        let pointer_key = layout::pointer_key(&job.key, blobs.key.is_some());
        if let Some(h) = &here
            && h.sha256 == job.sha256
            && h.pipeline == identity
            && (h.stored_key == pointer_key || stored_by_path(h))
        {
            // Already there: as a pointer, or (written before this destination changed
            // layout) as the file's own object, which stays as it is.
            return Ok(Step::Done(Method::Skip, h.clone()));
        }
        // Taken before anything is written: blob and pointer are durable before the file is
        // recorded stored.
        let ticket = self.dest.ticket();
        let (roots, job_c, blobs_c) = (self.roots.clone(), job.clone(), blobs.clone());
        let probed =
            tokio::task::spawn_blocking(move || transfer::probe_plan(&roots, &job_c, &blobs_c))
                .await
                .map_err(|e| StoreError::Retryable(format!("read task failed: {e}")))??;
        let Some((plan, mode)) = probed else {
            return Ok(Step::Changed);
        };
        let (namespace, name) = blobs.blob_name(&job.sha256);
        let blob_key = crate::format::pointer::blob_key(&namespace, &name, plan);
        let target = Target::Blob { namespace, name };
        let Some(mut placed) = self.find_or_send(job, &blobs, &blob_key, &target).await? else {
            return Ok(Step::Changed);
        };
        let pointer = Pointer {
            pointer: POINTER_FORMAT,
            blob: placed.key.clone(),
            size: job.stat.size,
            stored_size: placed.stored_size,
            sha256: hex::encode(job.sha256),
            mode,
            mtime_ns: job.stat.mtime_ns,
            path: job.key.clone(),
        };
        let pointer_size = content::put_pointer(&self.dest, &blobs, &pointer_key, &pointer).await?;
        // Step 4: the blob must still be there now that the pointer is.
        if content::head_blob(&self.dest, &placed.key).await?.is_none() {
            tracing::info!(dest = %self.dest.name, blob = %placed.key, key = %pointer_key, "blob gone after its pointer was written (a sweep set it aside); uploading it again");
            match self.send_blob(job, &blobs, &target).await? {
                Some(again) => placed = again,
                None => return Ok(Step::Changed),
            }
        }
        self.dest.persist(ticket).await?;
        let method = if placed.uploaded {
            Method::Upload
        } else {
            Method::Reuse
        };
        let step = Step::Done(
            method,
            ObjectRow {
                key: job.key.clone(),
                stored_key: pointer_key,
                sha256: job.sha256,
                size: job.stat.size,
                stored_size: pointer_size,
                pipeline: identity,
                blob: Some(BlobRef {
                    key: placed.key,
                    stored_size: placed.stored_size,
                    uploaded: placed.uploaded,
                }),
            },
        );
        self.delete_replaced(&step, here.as_ref()).await?;
        Ok(step)
    }

    /// The blob `blob_key`: known to the index, found by a HEAD, or else sent. `None` when the
    /// file changed while it was read.
    async fn find_or_send(
        &self,
        job: &Job,
        blobs: &Arc<Pipeline>,
        blob_key: &str,
        target: &Target,
    ) -> Result<Option<Placed>, StoreError> {
        let (dest, key) = (self.dest.name.clone(), blob_key.to_string());
        if let Some(stored_size) = self.blocking(move |i| i.known_blob(&dest, &key)).await? {
            return Ok(Some(Placed {
                key: blob_key.to_string(),
                stored_size,
                uploaded: false,
            }));
        }
        if let Some(meta) = content::head_blob(&self.dest, blob_key).await? {
            return Ok(Some(Placed {
                key: blob_key.to_string(),
                stored_size: meta.size,
                uploaded: false,
            }));
        }
        self.send_blob(job, blobs, target).await
    }

    /// Read the file once through the blob pipeline and store it as its blob.
    async fn send_blob(
        &self,
        job: &Job,
        blobs: &Arc<Pipeline>,
        target: &Target,
    ) -> Result<Option<Placed>, StoreError> {
        let link = Link {
            dest: &self.dest,
            global_limit: self.global_limit.as_deref(),
            multipart_slots: &self.multipart_slots,
            bytes: &self.stats.bytes,
            metrics: &self.metrics,
        };
        let sent = transfer::send(
            &link,
            job,
            self.roots.clone(),
            blobs.clone(),
            target.clone(),
        )
        .await?;
        Ok(match sent {
            Transferred::Changed => None,
            Transferred::Stored {
                stored_key,
                stored_size,
                ..
            } => Some(Placed {
                key: stored_key,
                stored_size,
                uploaded: true,
            }),
        })
    }
}

/// Whether the row is a file's own object stored under today's layout rule (not a pointer).
fn stored_by_path(h: &ObjectRow) -> bool {
    let parsed = layout::parse(&h.stored_key);
    !parsed.pointer && layout::stored_key(&h.key, parsed.plan) == h.stored_key
}

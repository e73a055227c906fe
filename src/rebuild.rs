//! `--rebuild-index`: recover from a lost or damaged index without uploading everything again.
//!
//! The damaged file (with its `-wal` and `-shm`) is moved aside, never deleted, and a fresh
//! index is created. Each destination is then listed under this node's watch prefixes, and
//! every object whose content hash can be read back is recorded as held: the `sha256`
//! metadata of unencrypted objects (a HEAD request), or the metadata record inside encrypted
//! ones (the first chunk, decrypted with the configured keys). The catch-up scan then hashes
//! the local files again (a local read) and the upload workers skip every file whose content
//! the destination already holds at its key. Objects whose hash cannot be read back (plain
//! objects in a `file://` store, which keeps no metadata) are uploaded again: same key, same
//! content.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use object_store::{Attribute, GetOptions, GetRange, ObjectMeta};

use crate::config::Config;
use crate::crypto::{CHUNK_LOG2, HEADER_LEN, TAG_LEN};
use crate::destination::{BadKey, Destination};
use crate::format::layout::INTERNAL_PREFIX;
use crate::format::layout::{Compression, Plan};
use crate::index::{Index, ObjectRow};
use crate::pipeline::{self, Pipeline};
use crate::scan::Root;

/// Requests in flight per destination while reading hashes back.
const CONCURRENCY: usize = 16;

/// What a rebuild found.
#[derive(Debug, Default)]
pub(crate) struct Rebuilt {
    /// Where the old index was moved, if there was one.
    pub moved_aside: Option<PathBuf>,
    /// Per destination, in configured order: what was recorded.
    pub destinations: Vec<RebuiltDest>,
    /// Keys object_store cannot address (not recorded; named, never fatal).
    pub bad_keys: Vec<DestBadKey>,
}

/// What a rebuild recorded from one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RebuiltDest {
    /// Destination name.
    pub name: String,
    /// Objects recorded as held.
    pub held: u64,
    /// Objects whose hash could not be read back (they will be uploaded again).
    pub unknown: u64,
}

/// A key of a destination that object_store cannot address.
#[derive(Debug, Clone)]
pub(crate) struct DestBadKey {
    /// Destination name.
    pub dest: String,
    /// The key and why.
    pub bad: BadKey,
}

/// Move the index aside, create a fresh one and fill it from the destinations.
pub(crate) async fn rebuild_index(config: &Config) -> anyhow::Result<Rebuilt> {
    let mut out = Rebuilt::default();
    let path = config.state_dir.join("index.sqlite3");
    if path.exists() {
        let suffix = format!("damaged-{}", crate::format::units::now_ms());
        for ext in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{ext}", path.display()));
            let to = PathBuf::from(format!("{}.{suffix}{ext}", path.display()));
            if from.exists() {
                std::fs::rename(&from, &to).with_context(|| {
                    format!("moving {} aside to {}", from.display(), to.display())
                })?;
            }
        }
        out.moved_aside = Some(PathBuf::from(format!("{}.{suffix}", path.display())));
        tracing::warn!(from = %path.display(), to = %out.moved_aside.as_ref().unwrap().display(), "moved the old index aside");
    }
    let index = Arc::new(Index::open(&config.state_dir)?);
    let pipeline = Arc::new(Pipeline::from_config(config)?);
    let roots = Root::from_config(config);
    for cfg in config.destinations() {
        let dest = Destination::open(cfg)?;
        let (mut held, mut unknown) = (0u64, 0u64);
        for root in &roots {
            let (h, u, bad) = rebuild_dest(&dest, &root.prefix, &pipeline, &index).await?;
            held += h;
            unknown += u;
            for b in bad {
                tracing::warn!(dest = %dest.name, key = %b.key, reason = %b.reason, "not recorded: a key object_store cannot address");
                out.bad_keys.push(DestBadKey {
                    dest: dest.name.clone(),
                    bad: b,
                });
            }
        }
        tracing::info!(dest = %dest.name, held, unknown, "index rebuilt from the destination");
        out.destinations.push(RebuiltDest {
            name: dest.name.clone(),
            held,
            unknown,
        });
    }
    Ok(out)
}

/// Record the objects of `dest` under `prefix`. Returns (recorded, hash unknown, keys
/// object_store cannot address).
async fn rebuild_dest(
    dest: &Destination,
    prefix: &str,
    pipeline: &Arc<Pipeline>,
    index: &Arc<Index>,
) -> anyhow::Result<(u64, u64, Vec<BadKey>)> {
    let listing = dest.list_under(prefix).await?;
    let (listed, bad_keys) = (listing.objects, listing.bad_keys);
    let rows: Vec<Option<ObjectRow>> = futures::stream::iter(listed)
        .filter_map(|meta| {
            let stored_key = dest.relative(meta.location.as_ref()).to_string();
            let skip = stored_key.starts_with(INTERNAL_PREFIX);
            async move { (!skip).then_some((stored_key, meta)) }
        })
        .map(|(stored_key, meta)| async move {
            match read_back(dest, pipeline, &stored_key, &meta).await {
                Ok(row) => row,
                Err(e) => {
                    tracing::warn!(dest = %dest.name, key = %meta.location, error = %format!("{e:#}"), "cannot read the object's hash back; it will be uploaded again");
                    None
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let unknown = rows.iter().filter(|r| r.is_none()).count() as u64;
    let rows: Vec<ObjectRow> = rows.into_iter().flatten().collect();
    let held = rows.len() as u64;
    let (index, name) = (index.clone(), dest.name.clone());
    tokio::task::spawn_blocking(move || index.record_objects(&name, &rows))
        .await
        .context("index task failed")??;
    Ok((held, unknown, bad_keys))
}

/// The index row for one object, if its content hash can be read back.
async fn read_back(
    dest: &Destination,
    pipeline: &Pipeline,
    stored_key: &str,
    meta: &ObjectMeta,
) -> anyhow::Result<Option<ObjectRow>> {
    if crate::format::layout::parse(stored_key).pointer {
        return read_back_pointer(dest, pipeline, stored_key, meta)
            .await
            .map(Some);
    }
    let (plan, logical) = Plan::from_key(stored_key);
    let compression_ok =
        plan.compression == Compression::None || plan.compression == pipeline.compression;
    let (sha256, size, same_pipeline) = if plan.encrypt {
        // The header and the first chunk hold the metadata record.
        let want = (HEADER_LEN + (1usize << CHUNK_LOG2) + TAG_LEN) as u64;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(0..want.min(meta.size))),
            ..Default::default()
        };
        let bytes = dest
            .store
            .get_opts(&meta.location, opts)
            .await
            .with_context(|| format!("reading {}", meta.location))?
            .bytes()
            .await
            .with_context(|| format!("reading {}", meta.location))?;
        let key_id = bytes.get(10..18).map(|b| b.to_vec());
        let (_, record) =
            pipeline::decoder(plan, &pipeline.keys, stored_key, Cursor::new(bytes))
                .with_context(|| format!("decrypting the metadata record of {}", meta.location))?;
        let Some(record) = record else {
            return Ok(None);
        };
        let same_key = pipeline
            .key
            .as_ref()
            .is_some_and(|k| key_id.as_deref() == Some(&k.id()[..]));
        (record.sha256, record.size, same_key && compression_ok)
    } else {
        let opts = GetOptions {
            head: true,
            ..Default::default()
        };
        let got = dest
            .store
            .get_opts(&meta.location, opts)
            .await
            .with_context(|| format!("reading the metadata of {}", meta.location))?;
        let Some(sha) = got
            .attributes
            .get(&Attribute::Metadata(crate::format::metadata::SHA256.into()))
        else {
            return Ok(None);
        };
        (
            sha.to_string(),
            meta.size,
            pipeline.key.is_none() && compression_ok,
        )
    };
    let Some(sha256) = hex::decode(&sha256)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
    else {
        return Ok(None);
    };
    Ok(Some(ObjectRow {
        key: logical.to_string(),
        stored_key: stored_key.to_string(),
        sha256,
        size,
        stored_size: meta.size,
        // Written under other settings: known (never a copy source for this pipeline), but
        // uploaded again under the current one.
        pipeline: if same_pipeline {
            pipeline.identity()
        } else {
            "rebuilt:other".to_string()
        },
        blob: None,
    }))
}

/// The index row for a content destination's pointer: the file's content, size and blob, as
/// the pointer records them.
async fn read_back_pointer(
    dest: &Destination,
    pipeline: &Pipeline,
    stored_key: &str,
    meta: &ObjectMeta,
) -> anyhow::Result<ObjectRow> {
    let p = crate::content::read_pointer(dest, &pipeline.keys, stored_key).await?;
    let sha256 = hex::decode(&p.sha256)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .with_context(|| format!("pointer {stored_key}: bad SHA-256"))?;
    let blob_plan = crate::format::layout::parse(&p.blob).plan;
    let blobs = pipeline.for_blobs();
    // Only a blob this pipeline would write counts as the same settings: otherwise the file
    // is uploaded again under the current ones.
    let (namespace, name) = blobs.blob_name(&sha256);
    let same = p.blob.starts_with(&format!(
        "{}/{namespace}/",
        crate::format::layout::BLOBS_PREFIX
    )) && p.blob.contains(&name)
        && (blob_plan.compression == Compression::None
            || blob_plan.compression == pipeline.compression);
    Ok(ObjectRow {
        key: p.path.clone(),
        stored_key: stored_key.to_string(),
        sha256,
        size: p.size,
        stored_size: meta.size,
        pipeline: if same {
            pipeline.identity()
        } else {
            "rebuilt:other".to_string()
        },
        blob: Some(crate::index::BlobRef {
            key: p.blob,
            stored_size: p.stored_size,
            uploaded: false,
        }),
    })
}

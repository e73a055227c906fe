//! The content layout against a destination (`layout = "content"`): writing and reading the
//! pointer objects that stand at files' keys, looking for blobs, and reading a blob even while
//! the collector has it set aside. The formats are in [`crate::format::pointer`]; the upload
//! path (`upload`), readers (`restore`, `serve`, `rebuild`) and the collector (`collect`) use
//! these.

use std::io::Read;

use bytes::Bytes;
use object_store::{
    Attribute, Attributes, GetResult, ObjectMeta, ObjectStore, ObjectStoreExt, PutOptions,
    PutPayload,
};

use crate::crypto::MasterKey;
use crate::destination::{Destination, StoreError, error_chain};
use crate::format::layout::{self, Compression, Plan};
use crate::format::pointer::{MAX_POINTER_BYTES, Pointer, trash_dir};
use crate::pipeline::{self, Meta, Pipeline};

/// Why a pointer could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ContentError {
    /// The pointer object is not in the destination.
    #[error("pointer {key} is missing from {dest}")]
    PointerMissing {
        /// Its stored key.
        key: String,
        /// The destination.
        dest: String,
    },
    /// The store failed.
    #[error("reading pointer {key} from {dest}: {message}")]
    Store {
        /// Its stored key.
        key: String,
        /// The destination.
        dest: String,
        /// What the store said.
        message: String,
    },
    /// The object is no pointer a reader may follow (damaged, planted, too large).
    #[error("pointer {key} in {dest} is refused: {message}")]
    Refused {
        /// Its stored key.
        key: String,
        /// The destination.
        dest: String,
        /// Why.
        message: String,
    },
}

/// The plan of a pointer object: never compressed, encrypted with the blob pipeline's key.
fn pointer_plan(pipeline: &Pipeline) -> Plan {
    Plan {
        compression: Compression::None,
        encrypt: pipeline.key.is_some(),
    }
}

/// The bytes of `pointer` as stored at `pointer_key` by `pipeline` (the blob pipeline,
/// [`Pipeline::for_blobs`]): its JSON, or that JSON in a container bound as a pointer.
pub(crate) fn encode_pointer(
    pipeline: &Pipeline,
    pointer_key: &str,
    pointer: &Pointer,
) -> std::io::Result<Vec<u8>> {
    let body = pointer.encode();
    let plan = pointer_plan(pipeline);
    if !plan.encrypt {
        return Ok(body);
    }
    let meta = Meta {
        size: body.len() as u64,
        mtime_ns: 0,
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body)),
        mode: None,
        path: Some(pointer.path.clone()),
    };
    pipeline::encode_bytes(
        pipeline,
        plan,
        &meta,
        &crate::crypto::pointer_binding(pointer_key),
        &body,
    )
}

/// Store `pointer` at `pointer_key` (relative to the destination base); the bytes stored.
pub(crate) async fn put_pointer(
    dest: &Destination,
    pipeline: &Pipeline,
    pointer_key: &str,
    pointer: &Pointer,
) -> Result<u64, StoreError> {
    let bytes = encode_pointer(pipeline, pointer_key, pointer)
        .map_err(|e| StoreError::Permanent(format!("encoding pointer {pointer_key}: {e}")))?;
    let size = bytes.len() as u64;
    let location = dest.path(pointer_key)?;
    let mut attributes = Attributes::new();
    if dest.supports_attributes {
        let ty = if pipeline.key.is_some() {
            "application/octet-stream"
        } else {
            "application/json"
        };
        attributes.insert(Attribute::ContentType, ty.into());
    }
    let opts = PutOptions {
        attributes,
        ..Default::default()
    };
    dest.store
        .put_opts(&location, PutPayload::from(Bytes::from(bytes)), opts)
        .await
        .map_err(|e| {
            StoreError::classify(format!("storing pointer {location} in {}", dest.name), &e)
        })?;
    Ok(size)
}

/// The blob at `blob` (relative to the destination base), if it is there: one HEAD.
pub(crate) async fn head_blob(
    dest: &Destination,
    blob: &str,
) -> Result<Option<ObjectMeta>, StoreError> {
    let location = dest.path(blob)?;
    match dest.store.head(&location).await {
        Ok(meta) => Ok(Some(meta)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(StoreError::classify(
            format!("looking for blob {location} in {}", dest.name),
            &e,
        )),
    }
}

/// GET the blob `blob`; when it is missing, the newest copy the collector set aside (a sweep
/// puts a blob it finds referenced again back, but a reader need not wait for it). `Ok(None)`:
/// neither is there.
pub(crate) async fn get_blob(
    dest: &Destination,
    blob: &str,
) -> Result<Option<(String, GetResult)>, StoreError> {
    let location = dest.path(blob)?;
    match dest.store.get(&location).await {
        Ok(got) => return Ok(Some((blob.to_string(), got))),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => {
            return Err(StoreError::classify(
                format!("downloading blob {location} from {}", dest.name),
                &e,
            ));
        }
    }
    let Some(aside) = newest_set_aside(dest, blob).await? else {
        return Ok(None);
    };
    let location = dest.path(&aside)?;
    match dest.store.get(&location).await {
        Ok(got) => {
            tracing::info!(dest = %dest.name, blob, copy = %aside, "blob read from the copy the collector set aside");
            Ok(Some((aside, got)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(StoreError::classify(
            format!("downloading {location} from {}", dest.name),
            &e,
        )),
    }
}

/// The key of the newest copy of `blob` in the collector's trash, if any.
pub(crate) async fn newest_set_aside(
    dest: &Destination,
    blob: &str,
) -> Result<Option<String>, StoreError> {
    let listing = dest.list_under(&trash_dir(blob)).await?;
    Ok(listing
        .objects
        .iter()
        .filter_map(|m| {
            let key = dest.relative(m.location.as_ref()).to_string();
            crate::format::pointer::parse_trash_key(&key)
                .filter(|(b, _)| b == blob)
                .map(|(_, ms)| (ms, key))
        })
        .max()
        .map(|(_, key)| key))
}

/// Read and check the pointer at `stored_key` (relative to the destination base) with any of
/// `keys`: at most [`MAX_POINTER_BYTES`], authenticated as a pointer for this key when
/// encrypted, naming this key's file and a blob of its own content.
pub(crate) async fn read_pointer(
    dest: &Destination,
    keys: &[MasterKey],
    stored_key: &str,
) -> Result<Pointer, ContentError> {
    let refused = |message: String| ContentError::Refused {
        key: stored_key.to_string(),
        dest: dest.name.clone(),
        message,
    };
    let bytes = fetch_pointer(dest, stored_key).await?;
    decode_pointer(keys, stored_key, &bytes).map_err(refused)
}

/// The bytes of the pointer object at `stored_key`, at most [`MAX_POINTER_BYTES`].
pub(crate) async fn fetch_pointer(
    dest: &Destination,
    stored_key: &str,
) -> Result<Bytes, ContentError> {
    let store_err = |message: String| ContentError::Store {
        key: stored_key.to_string(),
        dest: dest.name.clone(),
        message,
    };
    let refused = |message: String| ContentError::Refused {
        key: stored_key.to_string(),
        dest: dest.name.clone(),
        message,
    };
    let location = dest
        .path(stored_key)
        .map_err(|e| store_err(e.to_string()))?;
    let got = match dest.store.get(&location).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ContentError::PointerMissing {
                key: stored_key.to_string(),
                dest: dest.name.clone(),
            });
        }
        Err(e) => return Err(store_err(error_chain(&e))),
    };
    if got.meta.size > MAX_POINTER_BYTES {
        return Err(refused(format!(
            "{} bytes, more than a pointer may have ({MAX_POINTER_BYTES})",
            got.meta.size
        )));
    }
    got.bytes().await.map_err(|e| store_err(error_chain(&e)))
}

/// The key id in the header of an encrypted object's `bytes`, if they start with one.
pub(crate) fn header_key_id(bytes: &[u8]) -> Option<[u8; 8]> {
    if bytes.get(..8)? != crate::crypto::MAGIC {
        return None;
    }
    bytes.get(10..18)?.try_into().ok()
}

/// Decode the pointer object `bytes` stored at `stored_key` (see [`read_pointer`]).
pub(crate) fn decode_pointer(
    keys: &[MasterKey],
    stored_key: &str,
    bytes: &[u8],
) -> Result<Pointer, String> {
    let parsed = layout::parse(stored_key);
    if !parsed.pointer {
        return Err("not a pointer's key".into());
    }
    let body = if parsed.plan.encrypt {
        let (mut r, meta) = pipeline::decoder(parsed.plan, keys, stored_key, bytes)
            .map_err(|e| format!("does not authenticate as a pointer: {e}"))?;
        let mut body = Vec::new();
        r.by_ref()
            .take(MAX_POINTER_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("does not authenticate as a pointer: {e}"))?;
        if let Some(path) = meta.and_then(|m| m.path)
            && !layout::names_key(stored_key, &path)
        {
            return Err(format!("its record names another key ({path:?})"));
        }
        body
    } else {
        bytes.to_vec()
    };
    let pointer = Pointer::decode(stored_key, &body).map_err(|e| e.to_string())?;
    if !layout::names_key(stored_key, &pointer.path) {
        return Err(format!(
            "it names another file ({:?}) than the key it is stored under",
            pointer.path
        ));
    }
    if let Some(blob) = crate::format::pointer::BlobKey::parse(&pointer.blob)
        && blob.plan.encrypt != parsed.plan.encrypt
    {
        return Err(format!(
            "an {} pointer names an {} blob",
            if parsed.plan.encrypt {
                "encrypted"
            } else {
                "unencrypted"
            },
            if blob.plan.encrypt {
                "encrypted"
            } else {
                "unencrypted"
            }
        ));
    }
    Ok(pointer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pointer::{POINTER_FORMAT, blob_key};

    fn pointer(p: &Pipeline, path: &str, sha: [u8; 32]) -> Pointer {
        let (ns, name) = p.blob_name(&sha);
        Pointer {
            pointer: POINTER_FORMAT,
            blob: blob_key(&ns, &name, pointer_plan(p)),
            size: 3,
            stored_size: 90,
            sha256: hex::encode(sha),
            mode: 0o640,
            mtime_ns: 5,
            path: path.into(),
        }
    }

    #[test]
    fn an_encrypted_pointer_is_bound_to_its_key_as_a_pointer() {
        let key = MasterKey::from_bytes([7; 32]);
        let p = Pipeline {
            key: Some(key.clone()),
            keys: vec![key.clone()],
            ..Pipeline::plain()
        };
        let ptr = pointer(&p, "ci/a.bin", [1; 32]);
        let at = layout::pointer_key("ci/a.bin", true);
        let bytes = encode_pointer(&p, &at, &ptr).unwrap();
        assert_eq!(decode_pointer(&p.keys, &at, &bytes).unwrap(), ptr);
        // Moved to another file's key: refused.
        let other = layout::pointer_key("ci/b.bin", true);
        assert!(decode_pointer(&p.keys, &other, &bytes).is_err());
        // A file object at a pointer's key never passes for a pointer.
        let plan = pointer_plan(&p);
        let meta = Meta {
            size: 1,
            sha256: "00".into(),
            ..Default::default()
        };
        let file = pipeline::encode_bytes(&p, plan, &meta, &at, &ptr.encode()).unwrap();
        assert!(decode_pointer(&p.keys, &at, &file).is_err());
        // The blob name is keyed: not the content's SHA-256.
        assert!(!ptr.blob.contains(&hex::encode([1u8; 32])));
    }

    #[test]
    fn a_plain_pointer_must_name_its_own_file() {
        let p = Pipeline::plain();
        let ptr = pointer(&p, "ci/a.bin", [2; 32]);
        let at = layout::pointer_key("ci/a.bin", false);
        let bytes = encode_pointer(&p, &at, &ptr).unwrap();
        assert_eq!(decode_pointer(&[], &at, &bytes).unwrap(), ptr);
        let other = layout::pointer_key("ci/b.bin", false);
        assert!(decode_pointer(&[], &other, &bytes).is_err());
    }
}

//! The byte pipeline between a local file and an object: read once, hash, compress, encrypt on
//! the way up; decrypt, decompress, hash on the way down. Both directions stream with constant
//! memory and run on blocking threads.
//!
//! Object keys carry one suffix per applied stage, in pipeline order: `.gz` or `.zst`, then
//! `.enc` ([`crate::format::layout`] escapes names that already end like that). Files that would not
//! shrink (known compressed formats by extension; small files whose compressed form is not
//! smaller; larger ones whose first block compresses by less than 5%) are stored uncompressed.
//! Encrypted objects carry a small metadata record (size, mtime, mode, SHA-256, logical key)
//! inside the encryption, which is bound to the object's key, so a restore can verify and
//! restore metadata from the object and the key alone.

use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::{Config, Encryption};
use crate::crypto::{self, Decryptor, Encryptor, MasterKey};
use crate::format::layout::{Compression, Plan};

/// Size of the first block used to decide whether a file compresses.
pub const PROBE_BLOCK: usize = 64 * 1024;
/// Largest metadata record accepted when decoding.
const MAX_META: usize = 64 * 1024;

/// Extensions of formats that are already compressed.
const COMPRESSED_EXTENSIONS: &[&str] = &[
    "7z", "apk", "avi", "br", "bz2", "deb", "flac", "gif", "gz", "heic", "jar", "jpeg", "jpg",
    "lz4", "lzma", "mkv", "mov", "mp3", "mp4", "ogg", "png", "rar", "rpm", "tgz", "txz", "war",
    "webm", "webp", "whl", "woff", "woff2", "xz", "zip", "zst",
];

/// How objects are encoded, from `[pipeline]`, with the keys loaded.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Compression for files that shrink.
    pub compression: Compression,
    /// Compression level.
    pub level: i32,
    /// Key for new objects (`None`: no encryption).
    pub key: Option<MasterKey>,
    /// Every key objects may have been written with (current first).
    pub keys: Vec<MasterKey>,
    /// Files never compressed (`[pipeline] uncompressed`), so that they keep their own
    /// names in the store: the pages, styles and scripts of a browsable HTML report.
    pub uncompressed: globset::GlobSet,
    /// Accept manifests bound like files (sealed by 0.1.0; `[pipeline] legacy_manifests`).
    pub legacy_manifests: bool,
    /// The fleet's key for blobs of content destinations (`[pipeline] dedup_key_file`):
    /// blobs named and encrypted with it dedup across nodes.
    pub dedup_key: Option<MasterKey>,
}

impl Pipeline {
    /// Load keys as configured. Errors name the key file.
    pub fn from_config(cfg: &Config) -> Result<Pipeline, crypto::CryptoError> {
        let p = &cfg.pipeline;
        let key = match (p.encryption, &p.key_file) {
            (Encryption::Aes256Gcm, Some(path)) => Some(MasterKey::load(path)?),
            (Encryption::Aes256Gcm, None) => {
                return Err(crypto::CryptoError::KeyFile {
                    path: "(none)".into(),
                    message: "pipeline.key_file is required with encryption = \"aes-256-gcm\""
                        .into(),
                });
            }
            (Encryption::None, _) => None,
        };
        let mut keys: Vec<MasterKey> = key.iter().cloned().collect();
        if let (None, Some(path)) = (&key, &p.key_file) {
            // Restores may need the key even when new objects are not encrypted.
            if path.exists() {
                keys.push(MasterKey::load(path)?);
            }
        }
        for old in &p.old_key_files {
            keys.push(MasterKey::load(old)?);
        }
        let dedup_key = match &p.dedup_key_file {
            Some(path) => Some(MasterKey::load(path)?),
            None => None,
        };
        keys.extend(dedup_key.iter().cloned());
        // Only with encryption on: a plain blob is named by its SHA-256 anyway.
        let dedup_key = dedup_key.filter(|_| key.is_some());
        Ok(Pipeline {
            compression: p.compression,
            level: p.level.unwrap_or(match p.compression {
                Compression::Gzip => 6,
                _ => 3,
            }),
            key,
            keys,
            uncompressed: uncompressed_globs(&p.uncompressed),
            legacy_manifests: p.legacy_manifests,
            dedup_key,
        })
    }

    /// A pipeline that stores files as they are.
    pub fn plain() -> Pipeline {
        Pipeline {
            compression: Compression::None,
            level: 0,
            key: None,
            keys: Vec::new(),
            uncompressed: globset::GlobSet::empty(),
            legacy_manifests: false,
            dedup_key: None,
        }
    }

    /// The pipeline that writes blobs and pointers of content destinations: the same
    /// stages, encrypting with the fleet's dedup key when one is configured.
    pub fn for_blobs(&self) -> Pipeline {
        let mut p = self.clone();
        if p.key.is_some() && p.dedup_key.is_some() {
            p.key = p.dedup_key.clone();
        }
        p
    }

    /// The blob namespace and name of content `sha256` written by this pipeline (call on
    /// [`Pipeline::for_blobs`]): `sha256` and the hex hash without encryption, else the key's
    /// namespace and a keyed name (docs/FORMAT.md, "Content layout").
    pub fn blob_name(&self, sha256: &[u8; 32]) -> (String, String) {
        match &self.key {
            None => (
                crate::format::pointer::PLAIN_NAMESPACE.to_string(),
                hex::encode(sha256),
            ),
            Some(k) => (
                crate::format::pointer::key_namespace(&k.id_hex()),
                k.blob_name(sha256),
            ),
        }
    }

    /// Identifies the settings that decide how a given file is encoded: two uploads of the
    /// same content under the same identity produce equivalent objects.
    pub fn identity(&self) -> String {
        let c = match self.compression {
            Compression::None => "none".to_string(),
            Compression::Gzip => format!("gzip{}", self.level),
            Compression::Zstd => format!("zstd{}", self.level),
        };
        match &self.key {
            Some(k) => format!("{c}+aes256gcm:{}", k.id_hex()),
            None => c,
        }
    }

    /// Decide how to encode `path` given its first block (the whole file when shorter than
    /// [`PROBE_BLOCK`]: then it is compressed only if the result is smaller).
    pub fn plan(&self, path: &Path, first: &[u8]) -> Plan {
        let compression = match self.compression {
            Compression::None => Compression::None,
            _ if !compresses(path, first) => Compression::None,
            _ if self.uncompressed.is_match(path) => Compression::None,
            c if first.len() < PROBE_BLOCK && !self.shrinks(c, first) => Compression::None,
            c => c,
        };
        Plan {
            compression,
            encrypt: self.key.is_some(),
        }
    }
}

impl Pipeline {
    /// Whether the whole (small) file `data` compressed as configured is smaller than itself.
    fn shrinks(&self, c: Compression, data: &[u8]) -> bool {
        let out = Counter::default();
        let Ok(mut w) = encoder(
            self,
            Plan {
                compression: c,
                encrypt: false,
            },
            &Meta::default(),
            "",
            Box::new(out.clone()),
        ) else {
            return false;
        };
        if w.write_all(data).and_then(|_| w.finish()).is_err() {
            return false;
        }
        out.0.load(std::sync::atomic::Ordering::Relaxed) < data.len() as u64
    }
}

/// The `uncompressed` globs, matched against a file's whole path (so `*.html` matches at any
/// depth). Validated when the configuration is read.
fn uncompressed_globs(globs: &[String]) -> globset::GlobSet {
    crate::config::compile_globs(globs, crate::config::Separator::Any)
}

/// A sink that only counts what is written to it.
#[derive(Clone, Default)]
struct Counter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Write for Counter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Finish for Counter {
    fn finish(self: Box<Self>) -> io::Result<()> {
        Ok(())
    }
}

fn compresses(path: &Path, first: &[u8]) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if ext.is_some_and(|e| COMPRESSED_EXTENSIONS.contains(&e.as_str())) {
        return false;
    }
    if first.len() < 512 {
        return true;
    }
    match zstd::bulk::compress(first, 1) {
        Ok(c) => (c.len() as f64) < first.len() as f64 * 0.95,
        Err(_) => true,
    }
}

/// The attributes of an object encoded as `plan` from the file named `path` with `meta`, for
/// a store that keeps attributes: its content type and encoding, and for an unencrypted object
/// the original's metadata (an encrypted one carries it inside). Empty otherwise.
pub(crate) fn object_attributes(
    supports_attributes: bool,
    plan: Plan,
    path: &Path,
    meta: &Meta,
) -> object_store::Attributes {
    use crate::format::metadata;
    use object_store::Attribute;
    let mut attributes = object_store::Attributes::new();
    if !supports_attributes {
        return attributes;
    }
    attributes.insert(Attribute::ContentType, plan.content_type(path).into());
    if let Some(enc) = plan.content_encoding() {
        attributes.insert(Attribute::ContentEncoding, enc.into());
    }
    if !plan.encrypt {
        for (k, v) in [
            (metadata::SHA256, meta.sha256.clone()),
            (metadata::MTIME_NS, meta.mtime_ns.to_string()),
            (metadata::MODE, format!("{:o}", meta.mode.unwrap_or(0o644))),
            (metadata::SIZE, meta.size.to_string()),
        ] {
            attributes.insert(Attribute::Metadata(k.into()), v.into());
        }
    }
    attributes
}

/// What an encrypted object says about its original, inside the encryption.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// Original size in bytes.
    pub size: u64,
    /// Original modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// SHA-256 of the original, hex.
    pub sha256: String,
    /// Permission bits of the original (version 2 records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// The logical key (relative to the destination base), full even when the stored key
    /// is shortened (version 2 records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A writer stage that must be finished (flushing trailers) in order.
pub trait Finish: Write + Send {
    /// Finish this stage and every stage below it.
    fn finish(self: Box<Self>) -> io::Result<()>;
}

impl<W: Finish + ?Sized> Finish for Box<W> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        (*self).finish()
    }
}

impl Finish for Encryptor<Box<dyn Finish>> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        Encryptor::finish(*self)?.finish()
    }
}

impl Finish for zstd::stream::write::Encoder<'static, Box<dyn Finish>> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        zstd::stream::write::Encoder::finish(*self)?.finish()
    }
}

impl Finish for flate2::write::GzEncoder<Box<dyn Finish>> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        flate2::write::GzEncoder::finish(*self)?.finish()
    }
}

/// Build the encoding chain for `plan` in front of `sink`; when encrypting, binds the
/// container to `stored_key` (the object's key relative to the destination base, or for a
/// manifest [`crypto::manifest_binding`] of it) and writes the metadata record first.
pub fn encoder(
    pipeline: &Pipeline,
    plan: Plan,
    meta: &Meta,
    stored_key: &str,
    sink: Box<dyn Finish>,
) -> io::Result<Box<dyn Finish>> {
    let mut out = sink;
    if plan.encrypt {
        let key = pipeline
            .key
            .as_ref()
            .ok_or_else(|| io::Error::other("encryption planned without a key"))?;
        let mut enc = Encryptor::new(key, stored_key, out)?;
        let record = serde_json::to_vec(meta).map_err(io::Error::other)?;
        enc.write_all(&(record.len() as u32).to_be_bytes())?;
        enc.write_all(&record)?;
        out = Box::new(enc);
    }
    Ok(match plan.compression {
        Compression::None => out,
        Compression::Zstd => {
            let mut z = zstd::stream::write::Encoder::new(out, pipeline.level)?;
            z.include_checksum(true)?;
            Box::new(z)
        }
        Compression::Gzip => Box::new(flate2::write::GzEncoder::new(
            out,
            flate2::Compression::new(pipeline.level.clamp(0, 9) as u32),
        )),
    })
}

/// Encode a small object held in memory (`body`) as `plan`, bound to `bound` (see
/// [`encoder`]): a run's manifest, the quarantine list.
pub fn encode_bytes(
    pipeline: &Pipeline,
    plan: Plan,
    meta: &Meta,
    bound: &str,
    body: &[u8],
) -> io::Result<Vec<u8>> {
    /// The encoder's sink: a buffer shared with the caller.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Finish for Shared {
        fn finish(self: Box<Self>) -> io::Result<()> {
            Ok(())
        }
    }
    let sink = Shared::default();
    let mut w = encoder(pipeline, plan, meta, bound, Box::new(sink.clone()))?;
    w.write_all(body)?;
    w.finish()?;
    Ok(std::mem::take(
        &mut *sink.0.lock().unwrap_or_else(|p| p.into_inner()),
    ))
}

/// A `Read` that decrypts a stream of our container format.
pub struct DecryptReader<R: Read> {
    inner: R,
    dec: Decryptor,
    out: Vec<u8>,
    pos: usize,
    done: bool,
}

impl<R: Read> DecryptReader<R> {
    /// Decrypt `inner`, stored under `stored_key`, with any of `keys`.
    pub fn new(inner: R, keys: Vec<MasterKey>, stored_key: &str) -> Self {
        Self::with_bindings(inner, keys, &[stored_key])
    }

    /// Decrypt `inner`, bound to one of `bounds`, with any of `keys`.
    pub fn with_bindings(inner: R, keys: Vec<MasterKey>, bounds: &[&str]) -> Self {
        DecryptReader {
            inner,
            dec: Decryptor::with_bindings(keys, bounds),
            out: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl<R: Read> Read for DecryptReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut chunk = vec![0u8; 64 * 1024];
        while self.pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            self.out.clear();
            self.pos = 0;
            let n = self.inner.read(&mut chunk)?;
            let res = if n == 0 {
                self.done = true;
                self.dec.finish(&mut self.out)
            } else {
                self.dec.push(&chunk[..n], &mut self.out)
            };
            res.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        let n = (self.out.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Build the decoding chain for an object stored under `stored_key` (relative to the
/// destination base) whose key says `plan`: returns the plaintext reader and, for encrypted
/// objects, the metadata record.
///
/// This reads bytes, not meaning: a manifest's object (bound as a manifest, see
/// [`crypto::manifest_binding`]) decodes here too. Only [`manifest_decoder`] may be trusted
/// to say that an object is a manifest.
pub fn decoder<'a, R: Read + 'a>(
    plan: Plan,
    keys: &[MasterKey],
    stored_key: &str,
    inner: R,
) -> io::Result<(Box<dyn Read + 'a>, Option<Meta>)> {
    if is_manifest_key(stored_key) {
        let manifest = crypto::manifest_binding(stored_key);
        decode_bound(plan, keys, &[stored_key, &manifest], inner)
    } else if crate::format::pointer::BlobKey::parse(stored_key).is_some() {
        // A blob is bound to its content key only (no file object passes for one).
        decode_bound(plan, keys, &[&crypto::blob_binding(stored_key)], inner)
    } else if crate::format::layout::parse(stored_key).pointer {
        decode_bound(plan, keys, &[&crypto::pointer_binding(stored_key)], inner)
    } else {
        decode_bound(plan, keys, &[stored_key], inner)
    }
}

/// The decoding chain for a run's manifest stored under `stored_key`: it authenticates only
/// as a manifest, never as a file stored at the same key. `legacy` also accepts a manifest
/// sealed before manifests had their own binding (`[pipeline] legacy_manifests`).
pub fn manifest_decoder<'a, R: Read + 'a>(
    plan: Plan,
    keys: &[MasterKey],
    stored_key: &str,
    legacy: bool,
    inner: R,
) -> io::Result<(Box<dyn Read + 'a>, Option<Meta>)> {
    let manifest = crypto::manifest_binding(stored_key);
    if legacy {
        decode_bound(plan, keys, &[&manifest, stored_key], inner)
    } else {
        decode_bound(plan, keys, &[&manifest], inner)
    }
}

/// The decoding chain for the quarantine list stored under `stored_key`: it authenticates
/// only as the list ([`crypto::quarantine_binding`]), never as a file or a manifest.
pub fn quarantine_decoder<'a, R: Read + 'a>(
    plan: Plan,
    keys: &[MasterKey],
    stored_key: &str,
    inner: R,
) -> io::Result<(Box<dyn Read + 'a>, Option<Meta>)> {
    let bound = crypto::quarantine_binding(stored_key);
    decode_bound(plan, keys, &[&bound], inner)
}

/// The decoding chain for a segment of a growing file stored under `stored_key`: it
/// authenticates only as that segment ([`crate::format::segment::binding`]), never as a file,
/// a manifest or another segment.
pub fn segment_decoder<'a, R: Read + 'a>(
    plan: Plan,
    keys: &[MasterKey],
    stored_key: &str,
    inner: R,
) -> io::Result<(Box<dyn Read + 'a>, Option<Meta>)> {
    let bound = crate::format::segment::binding(stored_key);
    decode_bound(plan, keys, &[&bound], inner)
}

/// Whether `stored_key` names a run's manifest (`…/_run/manifest.json` and its suffixes).
pub fn is_manifest_key(stored_key: &str) -> bool {
    let logical = crate::format::layout::parse(stored_key).logical;
    logical
        .strip_suffix(crate::format::manifest::MANIFEST_NAME)
        .and_then(|r| r.strip_suffix('/'))
        .and_then(|r| r.strip_suffix(crate::format::manifest::RUN_DIR))
        .is_some_and(|r| r.is_empty() || r.ends_with('/'))
}

fn decode_bound<'a, R: Read + 'a>(
    plan: Plan,
    keys: &[MasterKey],
    bounds: &[&str],
    inner: R,
) -> io::Result<(Box<dyn Read + 'a>, Option<Meta>)> {
    let mut meta = None;
    let mut r: Box<dyn Read + 'a> = Box::new(inner);
    if plan.encrypt {
        let mut d = DecryptReader::with_bindings(r, keys.to_vec(), bounds);
        let mut len = [0u8; 4];
        d.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_META {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("metadata record of {len} bytes is too large"),
            ));
        }
        let mut record = vec![0u8; len];
        d.read_exact(&mut record)?;
        meta = Some(serde_json::from_slice(&record).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad metadata record: {e}"),
            )
        })?);
        r = Box::new(d);
    }
    let r: Box<dyn Read + 'a> = match plan.compression {
        Compression::None => r,
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
    };
    Ok((r, meta))
}

/// Copy `r` into `w`, returning the SHA-256 and length of what was copied.
pub fn copy_hashed(r: &mut dyn Read, w: &mut dyn Write) -> io::Result<([u8; 32], u64)> {
    thread_local! {
        // One buffer per thread, reused: allocating and zeroing 256 KiB per small file
        // cost more than hashing it.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
    }
    BUF.with(|buf| {
        // A reentrant call (a reader or writer that itself copies) gets its own buffer.
        let mut own;
        let mut borrowed = buf.try_borrow_mut();
        let buf: &mut [u8] = match borrowed.as_deref_mut() {
            Ok(b) => b,
            Err(_) => {
                own = vec![0u8; 256 * 1024];
                &mut own
            }
        };
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        loop {
            let n = match r.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n])?;
            total += n as u64;
        }
        Ok((hasher.finalize().into(), total))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Finish for Shared {
        fn finish(self: Box<Self>) -> io::Result<()> {
            Ok(())
        }
    }

    fn pipeline(c: Compression, encrypt: bool) -> Pipeline {
        let key = MasterKey::from_bytes([5; 32]);
        Pipeline {
            compression: c,
            level: 3,
            key: encrypt.then(|| key.clone()),
            keys: vec![key],
            uncompressed: globset::GlobSet::empty(),
            legacy_manifests: false,
            dedup_key: None,
        }
    }

    #[test]
    fn uncompressed_globs_keep_their_files_stored_as_they_are() {
        let p = Pipeline {
            uncompressed: uncompressed_globs(&["*.html".into(), "*.css".into()]),
            ..pipeline(Compression::Zstd, false)
        };
        let text = b"<html>".repeat(PROBE_BLOCK);
        let plan = |name: &str| p.plan(Path::new(name), &text[..PROBE_BLOCK]);
        assert_eq!(plan("/ci/run/report/index.html"), Plan::STORED);
        assert_eq!(plan("/ci/run/report/deep/style.css"), Plan::STORED);
        assert_eq!(plan("/ci/run/log.txt").compression, Compression::Zstd);
    }

    fn encode(p: &Pipeline, name: &str, data: &[u8]) -> (Plan, Vec<u8>) {
        let plan = p.plan(Path::new(name), &data[..data.len().min(PROBE_BLOCK)]);
        let sink = Shared::default();
        let meta = Meta {
            size: data.len() as u64,
            mtime_ns: 7,
            sha256: hex::encode(Sha256::digest(data)),
            ..Default::default()
        };
        let key = crate::format::layout::stored_key(name, plan);
        let mut w = encoder(p, plan, &meta, &key, Box::new(sink.clone())).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap();
        let out = sink.0.lock().unwrap().clone();
        (plan, out)
    }

    #[test]
    fn every_combination_round_trips() {
        let text: Vec<u8> = b"INFO all good\n".repeat(20_000);
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            for enc in [false, true] {
                let p = pipeline(c, enc);
                let (plan, obj) = encode(&p, "a.log", &text);
                assert_eq!(plan.compression, c);
                let key = format!("a.log{}", plan.suffix());
                let (parsed, logical) = Plan::from_key(&key);
                assert_eq!((parsed, logical), (plan, "a.log"));
                let (mut r, meta) = decoder(parsed, &p.keys, &key, &obj[..]).unwrap();
                let mut out = Vec::new();
                r.read_to_end(&mut out).unwrap();
                assert_eq!(out, text, "{c:?} enc={enc}");
                assert_eq!(meta.is_some(), enc);
                if enc {
                    assert!(!obj.windows(13).any(|w| w == b"INFO all good"));
                }
            }
        }
    }

    #[test]
    fn incompressible_files_are_stored_as_is() {
        let p = pipeline(Compression::Zstd, false);
        let mut random = vec![0u8; 100_000];
        fastrand::fill(&mut random);
        assert_eq!(
            encode(&p, "x.bin", &random).0.compression,
            Compression::None
        );
        assert_eq!(
            encode(&p, "x.png", &[b'a'; 10_000]).0.compression,
            Compression::None
        );
        assert_eq!(
            encode(&p, "x.txt", &[b'a'; 10_000]).0.compression,
            Compression::Zstd
        );
        // Output not smaller than the input: as-is, 0- and 1-byte files included.
        for small in [&b""[..], b"x", b"abc", b"hello world"] {
            for c in [Compression::Gzip, Compression::Zstd] {
                let p = pipeline(c, false);
                assert_eq!(encode(&p, "x.txt", small).0.compression, Compression::None);
            }
        }
    }

    #[test]
    fn truncated_compressed_objects_fail() {
        for c in [Compression::Gzip, Compression::Zstd] {
            let p = pipeline(c, false);
            let (plan, obj) = encode(&p, "a.log", &b"line of log\n".repeat(50_000));
            let cut = &obj[..obj.len() - 9];
            let (mut r, _) = decoder(plan, &[], "a.log", cut).unwrap();
            let mut out = Vec::new();
            assert!(
                r.read_to_end(&mut out).is_err(),
                "{c:?} truncation not detected"
            );
        }
    }
}

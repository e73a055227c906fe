//! Client-side encryption: master keys (key files, key ids, `keygen`) and the streaming
//! container format specified in `docs/FORMAT.md`.
//!
//! The format follows the STREAM construction (as in Tink's AES-GCM-HKDF streaming AEAD): a
//! fresh per-object key is derived with HKDF-SHA256 from the master key, a random salt and the
//! whole header; the plaintext is cut into fixed-size chunks, each sealed with AES-256-GCM under
//! the nonce `prefix ‖ counter ‖ last-flag`. Changing any header byte changes the key, so every
//! chunk fails; reordering changes counters; truncation or extension breaks the last-flag.
//! Memory use is one chunk, whatever the object size.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};

/// First bytes of every encrypted object.
pub const MAGIC: &[u8; 8] = b"PSYNCENC";
/// Format version written: 2 binds the object's key into the per-object key.
pub const VERSION: u8 = 2;
/// The first format version (no key binding), still read.
pub const VERSION_1: u8 = 1;
/// log2 of the plaintext chunk size written by this version (64 KiB).
pub const CHUNK_LOG2: u8 = 16;
/// Header length in bytes.
pub const HEADER_LEN: usize = 8 + 1 + 1 + 8 + 32 + 7;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
const HKDF_INFO: &[u8] = b"panoptic-sync v1 object key";
const HKDF_INFO_V2: &[u8] = b"panoptic-sync v2 object key";
/// The HKDF salt of blob names in a keyed namespace (`MasterKey::blob_name`).
const BLOB_NAME_SALT: &[u8] = b"panoptic-sync blob name v1";
const KEY_ID_CONTEXT: &[u8] = b"panoptic-sync key id v1";

/// Why a key or an object could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key file is missing, unreadable, badly formatted or too open.
    #[error("key file {path}: {message}")]
    KeyFile {
        /// The key file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The object is not in our format or was written by an unknown version.
    #[error("not a panoptic-sync encrypted object: {0}")]
    Format(String),
    /// The object was encrypted under a key we do not have.
    #[error("encrypted with key id {0}, which is not among the configured keys")]
    UnknownKey(String),
    /// Authentication failed: tampered, truncated, reordered or wrong key.
    #[error(
        "authentication failed at chunk {0}: the object is damaged, truncated or was encrypted with another key"
    )]
    Auth(u64),
    /// A version 2 object failed at its first chunk: most likely written for another key
    /// (copied, moved or replayed there), or damaged.
    #[error(
        "authentication failed at chunk 0: the object was written under another key (copied, moved or replayed here) or is damaged"
    )]
    Misplaced,
}

/// A 256-bit master key and its public id.
#[derive(Clone)]
pub struct MasterKey {
    key: [u8; 32],
    id: [u8; 8],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "MasterKey(id {})", self.id_hex())
    }
}

impl MasterKey {
    /// A key from raw bytes.
    pub fn from_bytes(key: [u8; 32]) -> MasterKey {
        let digest = Sha256::new()
            .chain_update(KEY_ID_CONTEXT)
            .chain_update(key)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        MasterKey { key, id }
    }

    /// A new random key.
    pub fn generate() -> Result<MasterKey, CryptoError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| CryptoError::KeyFile {
            path: "<new key>".into(),
            message: format!("no randomness available: {e}"),
        })?;
        Ok(MasterKey::from_bytes(key))
    }

    /// The key id written in object headers.
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// The key id as hex.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// Load a key file: 64 hex digits (whitespace ignored). Refused if group or others have
    /// any access to it, or if it belongs to another user than this process's (or root): its
    /// owner can replace it.
    pub fn load(path: &Path) -> Result<MasterKey, CryptoError> {
        let err = |message: String| CryptoError::KeyFile {
            path: path.display().to_string(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let (owner, me) = (
            std::os::unix::fs::MetadataExt::uid(&meta),
            rustix::process::geteuid().as_raw(),
        );
        if owner != me && owner != 0 {
            return Err(err(format!(
                "belongs to user id {owner}, not to this process's user ({me}) or root: its owner could replace the key; run: chown {me} {}",
                path.display()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "is accessible by group or others (mode {mode:04o}); run: chmod 600 {}",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let hex_digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = hex::decode(&hex_digits)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| err("must hold exactly 64 hex digits (a 256-bit key)".into()))?;
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes);
        Ok(MasterKey::from_bytes(key))
    }

    /// Write this key to a new file with mode 0600 (never overwriting an existing file).
    pub fn write_new(&self, path: &Path) -> Result<(), CryptoError> {
        let err = |message: String| CryptoError::KeyFile {
            path: path.display().to_string(),
            message,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(format!("cannot create: {e}")))?;
        writeln!(f, "{}", hex::encode(self.key))
            .and_then(|_| f.sync_all())
            .map_err(|e| err(format!("cannot write: {e}")))
    }

    /// The name of the blob holding content `sha256` in this key's namespace: 32 bytes of
    /// HKDF-SHA256 (salt `panoptic-sync blob name v1`, IKM this key, info the SHA-256), as
    /// hex. A keyed name: without the key, a name says nothing about the content.
    pub fn blob_name(&self, sha256: &[u8; 32]) -> String {
        let hk = Hkdf::<Sha256>::new(Some(BLOB_NAME_SALT), &self.key);
        let mut okm = [0u8; 32];
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(sha256, &mut okm);
        hex::encode(okm)
    }

    /// The key as hex (for `keygen` to stdout only).
    pub fn to_hex(&self) -> String {
        hex::encode(self.key)
    }

    /// The per-object cipher. Version 2 headers bind `bound` (the object's key relative to
    /// the destination base) into the derivation; version 1 headers bind nothing.
    fn object_cipher(&self, header: &[u8], bound: &[u8]) -> Result<ChunkCipher, CryptoError> {
        let salt = &header[18..50];
        let hk = Hkdf::<Sha256>::new(Some(salt), &self.key);
        let mut okm = [0u8; 32];
        let mut info = Vec::with_capacity(HKDF_INFO.len() + header.len() + 4 + bound.len());
        if header[8] == VERSION_1 {
            info.extend_from_slice(HKDF_INFO);
            info.extend_from_slice(header);
        } else {
            info.extend_from_slice(HKDF_INFO_V2);
            info.extend_from_slice(header);
            info.extend_from_slice(&(bound.len() as u32).to_be_bytes());
            info.extend_from_slice(bound);
        }
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(&info, &mut okm);
        ChunkCipher::new(&okm)
    }
}

/// AES-256-GCM over one chunk at a time (aws-lc-rs: AES-NI/VAES and CLMUL where the CPU has
/// them). Every chunk has its own nonce (see [`nonce`]) and no associated data.
struct ChunkCipher(LessSafeKey);

impl ChunkCipher {
    fn new(key: &[u8; 32]) -> Result<ChunkCipher, CryptoError> {
        let key = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| CryptoError::Format("AES-256-GCM refused the derived key".into()))?;
        Ok(ChunkCipher(LessSafeKey::new(key)))
    }

    /// Encrypt `buf` in place and append the 16-byte tag.
    fn seal(&self, nonce: [u8; 12], buf: &mut Vec<u8>) -> Result<(), ()> {
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), buf)
            .map_err(|_| ())
    }

    /// Check and decrypt `chunk` (ciphertext + tag) in place, leaving the plaintext.
    fn open(&self, nonce: [u8; 12], chunk: &mut Vec<u8>) -> Result<(), ()> {
        let len = self
            .0
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), chunk)
            .map_err(|_| ())?
            .len();
        chunk.truncate(len);
        Ok(())
    }
}

fn nonce(prefix: &[u8], counter: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = last as u8;
    n
}

/// Streaming encryptor: a `Write` that seals whatever is written into `inner`.
pub struct Encryptor<W: Write> {
    inner: W,
    cipher: ChunkCipher,
    prefix: [u8; 7],
    counter: u32,
    chunk: usize,
    buf: Vec<u8>,
}

impl<W: Write> Encryptor<W> {
    /// Start a version 2 object bound to `bound` (its key relative to the destination base)
    /// with a random salt and nonce prefix; writes the header at once.
    pub fn new(key: &MasterKey, bound: &str, inner: W) -> std::io::Result<Encryptor<W>> {
        let mut random = [0u8; 39];
        getrandom::fill(&mut random).map_err(std::io::Error::other)?;
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&random[..32]);
        let mut prefix = [0u8; 7];
        prefix.copy_from_slice(&random[32..]);
        Self::with_parameters(key, salt, prefix, Some(bound), inner)
    }

    /// Start an object with the given salt and nonce prefix (for test vectors only: reusing
    /// them with the same key breaks confidentiality). `bound: None` writes version 1.
    pub fn with_parameters(
        key: &MasterKey,
        salt: [u8; 32],
        prefix: [u8; 7],
        bound: Option<&str>,
        mut inner: W,
    ) -> std::io::Result<Encryptor<W>> {
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.push(if bound.is_some() { VERSION } else { VERSION_1 });
        header.push(CHUNK_LOG2);
        header.extend_from_slice(&key.id);
        header.extend_from_slice(&salt);
        header.extend_from_slice(&prefix);
        inner.write_all(&header)?;
        let chunk = 1usize << CHUNK_LOG2;
        Ok(Encryptor {
            cipher: key
                .object_cipher(&header, bound.unwrap_or("").as_bytes())
                .map_err(std::io::Error::other)?,
            inner,
            prefix,
            counter: 0,
            chunk,
            buf: Vec::with_capacity(chunk + TAG_LEN),
        })
    }

    fn seal(&mut self, last: bool) -> std::io::Result<()> {
        let n = nonce(&self.prefix, self.counter, last);
        self.cipher
            .seal(n, &mut self.buf)
            .map_err(|()| std::io::Error::other("AES-GCM encryption failed"))?;
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("object too large for the chunk counter"))?;
        Ok(())
    }

    /// Seal the last chunk and return the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.seal(true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            // A full chunk is sealed only once more data follows: the last chunk must be
            // known to be last.
            if self.buf.len() == self.chunk {
                self.seal(false)?;
            }
            let take = (self.chunk - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What a manifest's container is bound to instead of its bare key: the key behind a prefix
/// that no file's key can carry (no path holds a NUL byte). A file object stored at a
/// manifest's key therefore never authenticates as a manifest (`docs/FORMAT.md`).
pub fn manifest_binding(stored_key: &str) -> String {
    format!("\0manifest\0{stored_key}")
}

/// What the quarantine list's container is bound to: its key behind a prefix of its own, so
/// neither a file object nor a manifest stored at that key passes for the list
/// (`docs/FORMAT.md`).
pub fn quarantine_binding(stored_key: &str) -> String {
    format!("\0quarantine\0{stored_key}")
}

/// What a blob's container is bound to: its key behind a prefix of its own, so a blob is
/// bound to its content key (never to a file's path) and no file object or manifest passes
/// for a blob (`docs/FORMAT.md`, "Content layout").
pub fn blob_binding(stored_key: &str) -> String {
    format!("\0blob\0{stored_key}")
}

/// What a pointer's container is bound to: its key behind a prefix of its own, so a file
/// object stored at a pointer's key never passes for a pointer.
pub fn pointer_binding(stored_key: &str) -> String {
    format!("\0pointer\0{stored_key}")
}

/// Streaming decryptor: push ciphertext in, get authenticated plaintext out.
pub struct Decryptor {
    keys: Vec<MasterKey>,
    /// The bindings accepted, in order of preference; the first chunk picks one.
    bounds: Vec<Vec<u8>>,
    version: u8,
    /// One cipher per binding until the first chunk authenticates under one of them.
    state: Option<(Vec<ChunkCipher>, [u8; 7], usize)>,
    /// Which of `bounds` the object turned out to be bound to.
    chosen: Option<usize>,
    counter: u32,
    buf: Vec<u8>,
}

impl Decryptor {
    /// A decryptor that accepts objects written under any of `keys`, for an object stored
    /// under the key `bound` (relative to the destination base; version 2 objects written for
    /// another key fail).
    pub fn new(keys: Vec<MasterKey>, bound: &str) -> Decryptor {
        Self::with_bindings(keys, &[bound])
    }

    /// A decryptor that accepts an object bound to any one of `bounds` (a version 1 object
    /// binds nothing and is accepted under any). [`Decryptor::binding`] then says which.
    pub fn with_bindings(keys: Vec<MasterKey>, bounds: &[&str]) -> Decryptor {
        Decryptor {
            keys,
            bounds: bounds.iter().map(|b| b.as_bytes().to_vec()).collect(),
            version: 0,
            state: None,
            chosen: None,
            counter: 0,
            buf: Vec::new(),
        }
    }

    /// The index (in the bindings given) of the binding the first chunk authenticated under.
    pub fn binding(&self) -> Option<usize> {
        self.chosen
    }

    /// The container version, once the header has been read (0 before).
    pub fn version(&self) -> u8 {
        self.version
    }

    fn parse_header(&mut self) -> Result<bool, CryptoError> {
        if self.state.is_some() {
            return Ok(true);
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(false);
        }
        let header: Vec<u8> = self.buf.drain(..HEADER_LEN).collect();
        if &header[..8] != MAGIC {
            return Err(CryptoError::Format("bad magic".into()));
        }
        if header[8] != VERSION && header[8] != VERSION_1 {
            return Err(CryptoError::Format(format!(
                "unknown version {}",
                header[8]
            )));
        }
        let log2 = header[9];
        if !(10..=24).contains(&log2) {
            return Err(CryptoError::Format(format!("bad chunk size 2^{log2}")));
        }
        let id = &header[10..18];
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| CryptoError::UnknownKey(hex::encode(id)))?;
        let mut prefix = [0u8; 7];
        prefix.copy_from_slice(&header[50..57]);
        // A version 1 object binds nothing: one cipher serves every binding.
        let ciphers = if header[8] == VERSION_1 {
            vec![key.object_cipher(&header, b"")?]
        } else {
            self.bounds
                .iter()
                .map(|b| key.object_cipher(&header, b))
                .collect::<Result<Vec<_>, _>>()?
        };
        self.state = Some((ciphers, prefix, 1usize << log2));
        self.version = header[8];
        Ok(true)
    }

    fn open(&mut self, len: usize, last: bool, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let Some((ciphers, prefix, _)) = &mut self.state else {
            return Err(CryptoError::Format("missing header".into()));
        };
        let n = nonce(prefix, self.counter, last);
        let mut sealed: Vec<u8> = self.buf.drain(..len).collect();
        let mut opened = None;
        if let [cipher] = &ciphers[..] {
            if cipher.open(n, &mut sealed).is_ok() {
                opened = Some((0, sealed));
            }
        } else {
            for (i, cipher) in ciphers.iter().enumerate() {
                // Tried on a copy: a failed open may leave the buffer changed.
                let mut chunk = sealed.clone();
                if cipher.open(n, &mut chunk).is_ok() {
                    opened = Some((i, chunk));
                    break;
                }
            }
        }
        let Some((i, chunk)) = opened else {
            return Err(if self.counter == 0 && self.version == VERSION {
                CryptoError::Misplaced
            } else {
                CryptoError::Auth(self.counter as u64)
            });
        };
        if ciphers.len() > 1 {
            // The first chunk has chosen: every later chunk must be under the same binding.
            let keep = ciphers.swap_remove(i);
            *ciphers = vec![keep];
            self.chosen = Some(i);
        } else if self.chosen.is_none() {
            self.chosen = Some(if self.version == VERSION_1 { 0 } else { i });
        }
        out.extend_from_slice(&chunk);
        self.counter = self.counter.wrapping_add(1);
        Ok(())
    }

    /// Add ciphertext; append any plaintext that is now authenticated to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.buf.extend_from_slice(data);
        if !self.parse_header()? {
            return Ok(());
        }
        let Some((_, _, chunk)) = self.state else {
            return Ok(());
        };
        let sealed = chunk + TAG_LEN;
        // Keep at least one whole sealed chunk back: it may be the last one.
        while self.buf.len() > sealed {
            self.open(sealed, false, out)?;
        }
        Ok(())
    }

    /// The ciphertext has ended: authenticate the last chunk.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if !self.parse_header()? {
            return Err(CryptoError::Format("truncated header".into()));
        }
        if self.buf.len() < TAG_LEN {
            return Err(CryptoError::Auth(self.counter as u64));
        }
        // The last chunk is empty only when the whole plaintext is (docs/FORMAT.md): a
        // plaintext of whole chunks ends with a full one, so an empty chunk after full ones
        // is no object this format writes.
        if self.buf.len() == TAG_LEN && self.counter > 0 {
            return Err(CryptoError::Format(
                "an empty final chunk after full chunks".into(),
            ));
        }
        self.open(self.buf.len(), true, out)
    }
}

/// Decrypt a whole object stored under `bound` in memory (tests, fuzzing, small objects).
pub fn decrypt_all(keys: Vec<MasterKey>, bound: &str, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut d = Decryptor::new(keys, bound);
    let mut out = Vec::new();
    d.push(data, &mut out)?;
    d.finish(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_of_another_user_is_refused() {
        // Reproduced: a 0600 key owned by `nobody` was accepted by an agent running as root
        // (its owner can replace the key). Needs root to give the file away, as CI runs.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "00".repeat(32)).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        assert!(MasterKey::load(&path).is_ok(), "our own key");
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("not root: cannot give the key file to another user; skipped");
            return;
        }
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let e = match MasterKey::load(&path) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a key of another user was accepted"),
        };
        assert!(e.contains("belongs to user id 65534"), "{e}");
    }

    fn key(b: u8) -> MasterKey {
        MasterKey::from_bytes([b; 32])
    }

    fn encrypt(k: &MasterKey, data: &[u8]) -> Vec<u8> {
        let mut e = Encryptor::new(k, "k/x.enc", Vec::new()).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn an_empty_final_chunk_after_full_chunks_is_refused() {
        // Reproduced: an independent decoder written from FORMAT.md refused it, the binary
        // accepted it. FORMAT.md: the last chunk is empty only when the whole plaintext is.
        let k = key(3);
        let data = vec![7u8; 65536];
        let mut e = Encryptor::new(&k, "k/x.enc", Vec::new()).unwrap();
        e.write_all(&data).unwrap();
        e.seal(false).unwrap(); // the full chunk, not last
        e.seal(true).unwrap(); // then an empty last chunk
        let crafted = e.inner;
        let err = decrypt_all(vec![k.clone()], "k/x.enc", &crafted).unwrap_err();
        assert!(err.to_string().contains("empty final chunk"), "{err}");
        // The canonical form of the same plaintext, and an empty plaintext, still decode.
        assert_eq!(
            decrypt_all(vec![k.clone()], "k/x.enc", &encrypt(&k, &data)).unwrap(),
            data
        );
        assert!(
            decrypt_all(vec![k.clone()], "k/x.enc", &encrypt(&k, &[]))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn round_trips_at_every_boundary() {
        let k = key(7);
        for len in [0, 1, 65535, 65536, 65537, 3 * 65536, 200_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let ct = encrypt(&k, &data);
            assert_eq!(
                ct.len(),
                HEADER_LEN + len + len.div_ceil(65536).max(1) * TAG_LEN
            );
            // Fed in odd pieces.
            let mut d = Decryptor::new(vec![key(1), k.clone()], "k/x.enc");
            let mut out = Vec::new();
            for piece in ct.chunks(7777) {
                d.push(piece, &mut out).unwrap();
            }
            d.finish(&mut out).unwrap();
            assert_eq!(out, data, "len {len}");
        }
    }

    #[test]
    fn detects_tampering_truncation_reordering_and_wrong_keys() {
        let k = key(9);
        let data = vec![42u8; 3 * 65536 + 10];
        let ct = encrypt(&k, &data);
        let sealed = 65536 + TAG_LEN;
        let mut flipped = ct.clone();
        flipped[HEADER_LEN + 100] ^= 1;
        assert!(matches!(
            decrypt_all(vec![k.clone()], "k/x.enc", &flipped),
            Err(CryptoError::Misplaced)
        ));
        // Moved, copied or replayed under another key: the first chunk fails.
        assert!(matches!(
            decrypt_all(vec![k.clone()], "k/y.enc", &ct),
            Err(CryptoError::Misplaced)
        ));
        assert_eq!(decrypt_all(vec![k.clone()], "k/x.enc", &ct).unwrap(), data);
        let mut header = ct.clone();
        header[20] ^= 1; // salt
        assert!(decrypt_all(vec![k.clone()], "k/x.enc", &header).is_err());
        // Truncated at a chunk boundary: the new last chunk was not sealed as last.
        let cut = &ct[..HEADER_LEN + 2 * sealed];
        assert!(matches!(
            decrypt_all(vec![k.clone()], "k/x.enc", cut),
            Err(CryptoError::Auth(1))
        ));
        let mut swapped = ct[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&ct[HEADER_LEN + sealed..HEADER_LEN + 2 * sealed]);
        swapped.extend_from_slice(&ct[HEADER_LEN..HEADER_LEN + sealed]);
        swapped.extend_from_slice(&ct[HEADER_LEN + 2 * sealed..]);
        assert!(decrypt_all(vec![k.clone()], "k/x.enc", &swapped).is_err());
        let mut extended = ct.clone();
        extended.extend_from_slice(&[0u8; 40]);
        assert!(decrypt_all(vec![k.clone()], "k/x.enc", &extended).is_err());
        assert!(matches!(
            decrypt_all(vec![key(3)], "k/x.enc", &ct),
            Err(CryptoError::UnknownKey(_))
        ));
        assert!(matches!(
            decrypt_all(vec![k], "k/x.enc", b"plain text"),
            Err(CryptoError::Format(_))
        ));
    }

    #[test]
    fn a_file_object_never_authenticates_as_a_manifest() {
        let k = key(7);
        let seal = |bound: &str| {
            let mut e = Encryptor::new(&k, bound, Vec::new()).unwrap();
            e.write_all(&vec![3u8; 200_000]).unwrap();
            e.finish().unwrap()
        };
        let at = "ci/n/r1/_run/manifest.json.zst.enc";
        let manifest = manifest_binding(at);
        let file = seal(at);
        let only_manifest = Decryptor::with_bindings(vec![k.clone()], &[&manifest]);
        let mut out = Vec::new();
        let mut d = only_manifest;
        assert!(matches!(
            d.push(&file, &mut out),
            Err(CryptoError::Misplaced)
        ));
        // A reader of bytes accepts either and says which it was, for every chunk.
        for (object, want) in [(seal(&manifest), 1), (file, 0)] {
            let mut d = Decryptor::with_bindings(vec![k.clone()], &[at, &manifest]);
            let mut out = Vec::new();
            d.push(&object, &mut out).unwrap();
            d.finish(&mut out).unwrap();
            assert_eq!(out.len(), 200_000);
            assert_eq!(d.binding(), Some(want));
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        let k = key(0xab);
        assert!(!format!("{k:?}").contains("abab"));
    }
}

#[cfg(test)]
mod vectors {
    use super::*;

    /// The test vectors of docs/FORMAT.md (`bound: None`: version 1).
    pub(super) fn vector(plaintext: &[u8], bound: Option<&str>) -> Vec<u8> {
        let key = MasterKey::from_bytes(std::array::from_fn(|i| i as u8));
        let salt: [u8; 32] = std::array::from_fn(|i| 0x20 + i as u8);
        let prefix: [u8; 7] = std::array::from_fn(|i| 0x40 + i as u8);
        let mut e = Encryptor::with_parameters(&key, salt, prefix, bound, Vec::new()).unwrap();
        e.write_all(plaintext).unwrap();
        e.finish().unwrap()
    }

    /// The key the version 2 vectors are bound to.
    pub(super) const BOUND: &str = "ci/runner-17/logs/run.txt.enc";

    #[test]
    fn format_md_vectors_hold() {
        let doc = include_str!("../docs/FORMAT.md");
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        for bound in [None, Some(BOUND)] {
            let v1 = hex::encode(vector(b"", bound));
            let v2 = hex::encode(vector(b"panoptic-sync test vector\n", bound));
            let v3 = hex::encode(Sha256::digest(vector(&big, bound)));
            for v in [&v1, &v2, &v3] {
                assert!(
                    doc.contains(v.as_str()),
                    "docs/FORMAT.md lacks {v} ({bound:?})"
                );
            }
            // And they decrypt.
            let key = MasterKey::from_bytes(std::array::from_fn(|i| i as u8));
            let pt = decrypt_all(
                vec![key],
                bound.unwrap_or("anything"),
                &hex::decode(v2).unwrap(),
            )
            .unwrap();
            assert_eq!(pt, b"panoptic-sync test vector\n");
        }
        // The keyed blob name of the empty content.
        let key = MasterKey::from_bytes(std::array::from_fn(|i| i as u8));
        let empty: [u8; 32] = Sha256::digest(b"").into();
        let name = key.blob_name(&empty);
        assert!(doc.contains(&format!("named `{name}`")), "{name}");
    }
}

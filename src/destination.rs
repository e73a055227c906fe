//! Destinations: an `object_store` store built from a URL plus options, the key layout, the
//! signer for presigned URLs, and the split of store errors into retryable and permanent ones.
//!
//! Cloud stores (S3, GCS, Azure) are built from the builder's `from_env()` first, so each
//! cloud's usual environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`; a systemd
//! `EnvironmentFile=`) and credential chains work, then the URL and the configured `options`
//! are applied on top. `file://` destinations use `LocalFileSystem`, which writes to a staging
//! file and renames it, so no object is ever visible half-written.
//!
//! Listings are made here, not by object_store, which ends a listing at the first key it
//! cannot parse (see the `list` submodule).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ClientConfigKey, ObjectMeta, ObjectStore, RetryConfig};

use crate::config::{self, Kind, kind_of};

mod confined;
mod durable;
mod list;

use confined::ConfinedLocal;
use durable::{Durability, Ticket};
use list::{Lister, LocalLister, RemoteLister};

/// A store error, split by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying soon: network trouble, timeouts, 5xx, throttling.
    #[error("{0}")]
    Retryable(String),
    /// Will not fix itself: access denied, missing bucket, invalid key. Retried slowly.
    #[error("{0}")]
    Permanent(String),
}

impl StoreError {
    /// Whether retrying soon can help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StoreError::Permanent(_))
    }

    /// Classify an object_store error, prefixing `context` (what was done, to which key).
    pub fn classify(context: impl fmt::Display, err: &object_store::Error) -> StoreError {
        let text = error_chain(err);
        let permanent = match err {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::UnknownConfigurationKey { .. } => true,
            _ => is_permanent_text(&text),
        };
        let message = format!("{context}: {text}");
        if permanent {
            StoreError::Permanent(message)
        } else {
            StoreError::Retryable(message)
        }
    }
}

fn is_permanent_text(text: &str) -> bool {
    if text.contains("NoSuchBucket")
        || text.contains("AccessDenied")
        || text.contains("builder error")
    {
        return true;
    }
    // "status code: 4xx" other than 408 (timeout) and 429 (throttled) will not fix itself.
    text.match_indices("status code: 4").any(|(i, m)| {
        let code = &text[i + m.len() - 1..(i + m.len() + 2).min(text.len())];
        code != "408" && code != "429"
    })
}

/// The error and its sources on one line (server messages often span several).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let text = error_chain_raw(err);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn error_chain_raw(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// One configured destination, ready to use.
#[derive(Clone)]
pub struct Destination {
    /// The configured name.
    pub name: String,
    /// The store (already rooted at the bucket or directory).
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix taken from the URL path (empty for `file://`).
    pub base: String,
    /// Uploads in flight.
    pub concurrency: usize,
    /// Base of public links, if configured.
    pub public_base_url: Option<String>,
    /// The URL, for messages (never holds credentials: those live in options).
    pub url: String,
    /// Whether the store keeps object attributes (Content-Type, metadata); `file://` does not.
    pub supports_attributes: bool,
    /// Presigns GET URLs (S3, GCS, Azure).
    pub signer: Option<Arc<dyn Signer>>,
    /// The destination's bandwidth cap (`max_rate`).
    pub limiter: Option<Arc<crate::throttle::Limiter>>,
    /// How files are laid out (`layout`): at their own keys, or as blobs and pointers.
    pub layout: config::Layout,
    /// `layout = "content"`: how long an unreferenced blob is kept (`blob_grace`).
    pub blob_grace: std::time::Duration,
    /// How listings are made (our own, tolerant of bad keys: see [`Destination::list_under`]).
    lister: Lister,
    /// `file://` with `sync = "batch"`: writes are made durable in groups (see
    /// [`Destination::persist`]).
    durability: Option<Arc<Durability>>,
    /// `file://`: the store, to map keys to files (its root resolved once, when opened).
    local: Option<Arc<LocalFileSystem>>,
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

/// How long an unreferenced blob is kept unless `blob_grace` says otherwise.
pub(crate) const DEFAULT_BLOB_GRACE: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

/// Per-request limits (a hung server must never hold a worker forever), applied only where
/// the environment or the options did not set them.
const CLIENT_DEFAULTS: &[(ClientConfigKey, &str)] = &[
    (ClientConfigKey::ConnectTimeout, "5s"),
    (ClientConfigKey::Timeout, "120s"),
];

/// object_store's own retries handle a blip; longer outages are retried by our queue.
fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

/// Our S3 default where neither the environment nor the options chose: over TLS (AWS, or an
/// `https://` endpoint) the body is sent as `UNSIGNED-PAYLOAD`, so each PUT hashes its body
/// once less (TLS already protects it in transit, and every object is checked against its
/// SHA-256, or its AEAD tag, when it is read back); over plain `http://` the payload stays
/// signed, the only integrity check of the body on the wire. `unsigned_payload = "false"`
/// signs it over TLS too.
fn s3_defaults(b: AmazonS3Builder, chosen: bool) -> AmazonS3Builder {
    if chosen {
        return b;
    }
    let tls = b
        .get_config_value(&AmazonS3ConfigKey::Endpoint)
        .is_none_or(|e| e.to_ascii_lowercase().starts_with("https://"));
    if tls {
        b.with_config(AmazonS3ConfigKey::UnsignedPayload, "true")
    } else {
        b
    }
}

impl Destination {
    /// Build the store for a configured destination.
    pub fn open(cfg: &config::Destination) -> anyhow::Result<Destination> {
        let url = &cfg.url;
        let name = &cfg.name;
        let (kind, base) =
            kind_of(url).map_err(|e| anyhow::anyhow!("destination {name:?}: {e}"))?;
        let options = config::Config::options_of(cfg);
        // Whether the environment or the options chose how S3 bodies are signed.
        let unsigned_chosen = std::env::var_os("AWS_UNSIGNED_PAYLOAD").is_some()
            || options.keys().any(|k| {
                matches!(
                    k.to_ascii_lowercase().as_str(),
                    "unsigned_payload" | "aws_unsigned_payload"
                )
            });
        let bad_option =
            |k: &str| anyhow::anyhow!("destination {name:?}: unknown {kind:?} option {k:?}");
        let built = |e: object_store::Error| anyhow::anyhow!("destination {name:?} ({url}): {e}");
        let remote = |lister: Result<RemoteLister, String>| {
            lister
                .map(|l| Lister::Remote(Arc::new(l)))
                .map_err(|e| anyhow::anyhow!("destination {name:?} ({url}): {e}"))
        };
        // The three cloud builders share their API but no trait: from_env(), then the URL,
        // then the options, then our client defaults where nothing set them.
        macro_rules! cloud_store {
            ($builder:ty, $key:ident, |$p:ident| $pre:expr, |$b:ident, $s:ident| $extra:expr) => {{
                let mut b = <$builder>::from_env()
                    .with_retry(retry_config())
                    .with_url(url.as_str());
                for (k, v) in options {
                    let key =
                        $key::from_str(&k.to_ascii_lowercase()).map_err(|_| bad_option(&k))?;
                    b = b.with_config(key, v);
                }
                for (key, value) in CLIENT_DEFAULTS {
                    if b.get_config_value(&$key::Client(*key)).is_none() {
                        b = b.with_config($key::Client(*key), *value);
                    }
                }
                let b = {
                    let $p = b;
                    $pre
                };
                let s = Arc::new(b.clone().build().map_err(built)?);
                let extra = {
                    let ($b, $s) = (&b, &s);
                    $extra
                };
                (
                    s.clone() as Arc<dyn ObjectStore>,
                    Some(s as Arc<dyn Signer>),
                    extra,
                )
            }};
        }
        let (mut durability, mut local) = (None, None);
        let (store, signer, lister): (Arc<dyn ObjectStore>, Option<Arc<dyn Signer>>, Lister) =
            match kind {
                Kind::Local => {
                    let dir = url.to_file_path().map_err(|()| {
                        anyhow::anyhow!(
                            "destination {name:?}: {url} is not an absolute file:// path"
                        )
                    })?;
                    std::fs::create_dir_all(&dir).map_err(|e| {
                        anyhow::anyhow!(
                            "destination {name:?}: cannot create {}: {e}",
                            dir.display()
                        )
                    })?;
                    // `each`: object_store syncs every object and its directory before the
                    // write returns. `batch`: no sync per object; `persist` syncs the
                    // filesystem once for every object written before it.
                    let batch = cfg.sync == config::SyncMode::Batch;
                    let fs = Arc::new(
                        LocalFileSystem::new_with_prefix(&dir)
                            .map_err(|e| anyhow::anyhow!("destination {name:?}: {e}"))?
                            .with_fsync(!batch),
                    );
                    local = Some(fs.clone());
                    if batch {
                        durability = Some(Arc::new(Durability::open(&dir).map_err(|e| {
                            anyhow::anyhow!(
                                "destination {name:?}: cannot open {}: {e}",
                                dir.display()
                            )
                        })?));
                    }
                    let lister = LocalLister::new(&dir)
                        .map_err(|e| anyhow::anyhow!("destination {name:?}: {e}"))?;
                    let confined = ConfinedLocal::new(fs, &dir).map_err(|e| {
                        anyhow::anyhow!("destination {name:?}: cannot open {}: {e}", dir.display())
                    })?;
                    (Arc::new(confined), None, Lister::Local(Arc::new(lister)))
                }
                // object_store parses the URL only in build(): the bucket or container of an
                // `s3://`, `gs://` or `az://` URL is its host. Other URL forms (an account or
                // endpoint in the URL) keep object_store's listing.
                Kind::S3 => cloud_store!(
                    AmazonS3Builder,
                    AmazonS3ConfigKey,
                    |b| s3_defaults(b, unsigned_chosen),
                    |b, s| {
                        match (url.scheme(), url.host_str()) {
                            ("s3" | "s3a", Some(bucket)) => {
                                remote(RemoteLister::s3(b, bucket, s.clone()))?
                            }
                            _ => Lister::Store,
                        }
                    }
                ),
                Kind::Gcs => {
                    cloud_store!(GoogleCloudStorageBuilder, GoogleConfigKey, |b| b, |b, s| {
                        match (url.scheme(), url.host_str()) {
                            ("gs", Some(bucket)) => {
                                remote(RemoteLister::gcs(b, bucket, s.clone()))?
                            }
                            _ => Lister::Store,
                        }
                    })
                }
                Kind::Azure => {
                    cloud_store!(MicrosoftAzureBuilder, AzureConfigKey, |b| b, |b, s| {
                        match (url.scheme(), url.host_str(), url.username()) {
                            ("az" | "adl" | "azure" | "abfs" | "abfss", Some(container), "") => {
                                remote(RemoteLister::azure(b, container, s.clone()))?
                            }
                            _ => Lister::Store,
                        }
                    })
                }
            };
        let base = if kind == Kind::Local {
            String::new()
        } else {
            base.trim_matches('/').to_string()
        };
        if !base.is_empty() {
            ObjectPath::parse(&base).map_err(|e| {
                anyhow::anyhow!("destination {name:?}: bad key prefix in {url}: {e}")
            })?;
        }
        Ok(Destination {
            name: name.clone(),
            store,
            base,
            concurrency: cfg.concurrency(),
            public_base_url: cfg.public_base_url.clone(),
            url: url.to_string(),
            supports_attributes: kind != Kind::Local,
            signer,
            limiter: cfg
                .max_rate
                .map(|r| Arc::new(crate::throttle::Limiter::new(r))),
            layout: cfg.layout,
            blob_grace: cfg.blob_grace.unwrap_or(DEFAULT_BLOB_GRACE),
            lister,
            durability,
            local,
        })
    }

    /// The file holding `stored_key`, when this is a `file://` store.
    pub(crate) fn local_file(&self, stored_key: &str) -> Option<std::path::PathBuf> {
        let fs = self.local.as_ref()?;
        fs.path_to_filesystem(&self.path(stored_key).ok()?).ok()
    }

    /// Whether this is a `file://` store that syncs each object as it is written
    /// (`sync = "each"`): what is set on an object afterwards (its mode and mtime) must then
    /// be synced too, as nothing else will sync it before it is counted stored.
    fn syncs_each_object(&self) -> bool {
        self.local.is_some() && self.durability.is_none()
    }

    /// Give a stored file of this `file://` store (from [`Destination::local_file`]) the
    /// original's mode and mtime (and long name), on a blocking thread; made durable before
    /// this returns when the store syncs each object, and otherwise by [`Destination::persist`].
    pub(crate) async fn apply_meta(
        &self,
        file: std::path::PathBuf,
        meta: crate::filemeta::FileMeta,
    ) -> Result<std::io::Result<()>, tokio::task::JoinError> {
        let sync = self.syncs_each_object();
        tokio::task::spawn_blocking(move || crate::filemeta::apply(&file, &meta, sync)).await
    }

    /// Take before writing an object that must be durable before it is counted stored, and
    /// hand to [`Destination::persist`] after.
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        self.durability.as_ref().map(|d| d.ticket())
    }

    /// Return once what was written since `ticket` is durable. A cloud store's successful PUT
    /// already is, and so is a `file://` object written with `sync = "each"`; with
    /// `sync = "batch"` objects are written without a sync each (a staging file renamed into
    /// place), so this syncs the filesystem once for every object written by then (group
    /// commit: see the `durable` module).
    pub(crate) async fn persist(&self, ticket: Option<Ticket>) -> Result<(), StoreError> {
        match (&self.durability, ticket) {
            (Some(d), Some(t)) => d.wait(t).await.map_err(|e| {
                StoreError::Retryable(format!("making writes to {} durable: {e}", self.name))
            }),
            _ => Ok(()),
        }
    }

    /// A listed object's key relative to this destination's base (the inverse of
    /// [`Destination::path`]; the key bound into an encrypted object).
    pub fn relative<'a>(&self, key: &'a str) -> &'a str {
        if self.base.is_empty() {
            return key;
        }
        key.strip_prefix(self.base.as_str())
            .and_then(|k| k.strip_prefix('/'))
            .unwrap_or(key)
    }

    /// The full object path for a key relative to this destination's base.
    pub fn path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        let full = if self.base.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.base)
        };
        ObjectPath::parse(&full)
            .map_err(|e| StoreError::Permanent(format!("invalid object key {full:?}: {e}")))
    }
}

/// What a listing under a prefix found.
#[derive(Debug, Default)]
pub struct Listing {
    /// The full key listed under (every object's location starts with it); empty for the root.
    pub list_key: String,
    /// The objects object_store can address.
    pub objects: Vec<ObjectMeta>,
    /// Keys object_store cannot address (`//`, a `.` or `..` segment, a control character; a
    /// file name that is not UTF-8), written into the bucket by some other client. They fail alone: each caller names them
    /// and goes on with the rest.
    pub bad_keys: Vec<BadKey>,
}

/// A listed key that object_store cannot parse, so it cannot be read, copied or deleted
/// through it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadKey {
    /// The key, with control characters escaped (safe to print).
    pub key: String,
    /// Why object_store refuses it.
    pub reason: String,
}

impl fmt::Display for BadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl BadKey {
    fn new(raw_key: &str, err: &object_store::path::Error) -> BadKey {
        Self::with_reason(raw_key, &error_chain(err))
    }

    fn with_reason(raw_key: &str, why: &str) -> BadKey {
        BadKey {
            key: printable(raw_key),
            reason: format!(
                "object_store cannot address this key ({}); rename or delete it with another tool",
                printable(why)
            ),
        }
    }
}

/// `s` with every control character (C0, DEL, C1: terminal escape sequences included)
/// replaced by its `\u{..}` escape, so text from the bucket or another node can be printed.
pub(crate) fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Destination {
    /// Every object under `prefix` (relative to the base; empty for everything), listed once
    /// for restore, rebuild, retention and the fleet view. Keys object_store cannot address
    /// come back in [`Listing::bad_keys`], so the rest of the prefix is still usable: S3, GCS
    /// and Azure are listed with requests of our own, `file://` with a walk of our own
    /// (`destination/list.rs`). A cloud URL naming an account or endpoint rather than a bucket
    /// or container uses object_store's listing, which stops at such a key: that is an error
    /// naming the key.
    pub async fn list_under(&self, prefix: &str) -> Result<Listing, StoreError> {
        let prefix = prefix.trim_matches('/');
        let list_key = match (self.base.is_empty(), prefix.is_empty()) {
            (true, true) => String::new(),
            (true, false) => prefix.to_string(),
            (false, true) => self.base.clone(),
            (false, false) => format!("{}/{prefix}", self.base),
        };
        let list_path = (!list_key.is_empty())
            .then(|| ObjectPath::parse(&list_key))
            .transpose()
            .map_err(|e| StoreError::Permanent(format!("bad prefix {prefix:?}: {e}")))?;
        let context = || format!("listing {:?} under {list_key:?} ({})", self.name, self.url);
        let raw_prefix = list_path
            .as_ref()
            .map(|p| format!("{p}/"))
            .unwrap_or_default();
        let (objects, bad_keys) = match &self.lister {
            Lister::Remote(remote) => remote.list(&raw_prefix).await,
            Lister::Local(local) => local.list(&raw_prefix).await,
            Lister::Store => {
                let mut objects = Vec::new();
                let mut stream = self.store.list(list_path.as_ref());
                while let Some(item) = stream.next().await {
                    objects.push(item.map_err(|e| StoreError::classify(context(), &e))?);
                }
                Ok((objects, Vec::new()))
            }
        }
        .map_err(|e| StoreError::Retryable(format!("{}: {e}", context())))?;
        Ok(Listing {
            list_key,
            objects,
            bad_keys,
        })
    }
}

/// The public link of the object at `stored_key` under a destination's `public_base_url`.
pub(crate) fn public_url(base: &str, stored_key: &str) -> String {
    format!("{}/{stored_key}", base.trim_end_matches('/'))
}

/// Open the primary (the first configured destination).
pub(crate) fn open_primary(cfg: &config::Config) -> anyhow::Result<Destination> {
    Destination::open(
        cfg.destinations()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no destination is configured"))?,
    )
}

/// Open every configured destination, in order (the first is the primary).
pub(crate) fn open_all(cfg: &config::Config) -> anyhow::Result<Vec<Destination>> {
    cfg.destinations().map(Destination::open).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn s3_bodies_go_unsigned_over_tls_only_unless_chosen() {
        use super::{AmazonS3Builder, AmazonS3ConfigKey, s3_defaults};
        let unsigned = |b: AmazonS3Builder| {
            b.get_config_value(&AmazonS3ConfigKey::UnsignedPayload)
                .unwrap()
        };
        let with = |e: Option<&str>| match e {
            Some(e) => AmazonS3Builder::new().with_endpoint(e),
            None => AmazonS3Builder::new(),
        };
        assert_eq!(unsigned(s3_defaults(with(None), false)), "true", "AWS");
        assert_eq!(
            unsigned(s3_defaults(with(Some("HTTPS://minio:9000")), false)),
            "true"
        );
        assert_eq!(
            unsigned(s3_defaults(with(Some("http://127.0.0.1:9000")), false)),
            "false"
        );
        // Chosen by the options or the environment: left as chosen.
        assert_eq!(unsigned(s3_defaults(with(None), true)), "false");
    }

    use super::*;

    #[test]
    fn only_a_file_store_syncing_each_object_syncs_what_is_set_after_the_write() {
        // Regression: with `sync = "each"` the object's bytes were synced by the store, but
        // the mode, mtime and long name set on it afterwards were never synced before it was
        // counted stored.
        let dir = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(dir.path()).unwrap();
        let text = format!(
            "[[watch]]\npath = \"/a\"\n\
             [[destination]]\nname = \"each\"\nurl = \"{url}each\"\n\
             [[destination]]\nname = \"batch\"\nurl = \"{url}batch\"\nsync = \"batch\"\n\
             [[destination]]\nname = \"cloud\"\nurl = \"s3://b/x\"\n\
             options = {{ access_key_id = \"k\", secret_access_key = \"s\", region = \"r\", \
             endpoint = \"http://127.0.0.1:9\", metadata_endpoint = \"http://127.0.0.1:9\" }}\n"
        );
        let cfg = config::Config::parse(&text, "t.toml").unwrap();
        let dests = open_all(&cfg).unwrap();
        let syncs: Vec<bool> = dests.iter().map(|d| d.syncs_each_object()).collect();
        assert_eq!(syncs, [true, false, false]);
    }

    #[test]
    fn printable_escapes_every_control_character() {
        assert_eq!(printable("plain/key.log"), "plain/key.log");
        assert_eq!(
            printable("a\u{1b}[31mb\u{7}\u{9b}c\u{7f}é"),
            "a\\u{1b}[31mb\\u{7}\\u{9b}c\\u{7f}é"
        );
    }

    #[test]
    fn status_codes_classify() {
        assert!(is_permanent_text(
            "Server returned non-2xx status code: 403 Forbidden"
        ));
        assert!(!is_permanent_text(
            "Server returned non-2xx status code: 429 Too Many"
        ));
        assert!(!is_permanent_text(
            "Server returned non-2xx status code: 503 SlowDown"
        ));
        assert!(!is_permanent_text(
            "error sending request: connection refused"
        ));
        assert!(is_permanent_text("NoSuchBucket: the bucket does not exist"));
    }
}

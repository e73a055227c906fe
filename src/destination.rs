//! Destinations: an `object_store` store built from a URL plus options, the key layout, and the
//! split of store errors into retryable and permanent ones.
//!
//! Cloud stores are built from the builder's `from_env()` first, so the usual `AWS_*` variables
//! (and a systemd `EnvironmentFile=`) work, then the URL and the configured `options` are applied
//! on top. `file://` destinations use `LocalFileSystem`, which writes to a staging file and
//! renames it, so no object is ever visible half-written.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::config;

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
    if text.contains("NoSuchBucket") || text.contains("AccessDenied") {
        return true;
    }
    // "status code: 4xx" other than 408 (timeout) and 429 (throttled) will not fix itself.
    text.match_indices("status code: 4").any(|(i, m)| {
        let code = &text[i + m.len() - 1..(i + m.len() + 2).min(text.len())];
        code != "408" && code != "429"
    })
}

/// The error and its sources on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
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

/// Check that every option name is one the store for `url` understands.
pub fn check_options(url: &url::Url, options: &BTreeMap<String, String>) -> Result<(), String> {
    match url.scheme() {
        "file" => match options.keys().next() {
            Some(k) => Err(format!(
                "unknown option {k:?}: file:// destinations take no options"
            )),
            None => Ok(()),
        },
        _ => {
            for key in options.keys() {
                AmazonS3ConfigKey::from_str(&key.to_ascii_lowercase())
                    .map_err(|_| format!("unknown S3 option {key:?}"))?;
            }
            Ok(())
        }
    }
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
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

/// Per-request limits: a hung server must never hold a worker forever.
fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
}

/// object_store's own retries handle a blip; longer outages are retried by our queue.
fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

impl Destination {
    /// Build the store for a configured destination.
    pub fn open(cfg: &config::Destination) -> anyhow::Result<Destination> {
        let url = &cfg.url;
        let (store, base): (Arc<dyn ObjectStore>, String) = match url.scheme() {
            "file" => {
                let dir = url.to_file_path().map_err(|()| {
                    anyhow::anyhow!(
                        "destination {:?}: {url} is not an absolute file:// path",
                        cfg.name
                    )
                })?;
                std::fs::create_dir_all(&dir).map_err(|e| {
                    anyhow::anyhow!(
                        "destination {:?}: cannot create {}: {e}",
                        cfg.name,
                        dir.display()
                    )
                })?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| anyhow::anyhow!("destination {:?}: {e}", cfg.name))?
                    .with_fsync(true);
                (Arc::new(fs), String::new())
            }
            _ => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_client_options(client_options())
                    .with_retry(retry_config())
                    .with_url(url.as_str());
                for (k, v) in config::Config::options_of(cfg) {
                    let key =
                        AmazonS3ConfigKey::from_str(&k.to_ascii_lowercase()).map_err(|_| {
                            anyhow::anyhow!("destination {:?}: unknown S3 option {k:?}", cfg.name)
                        })?;
                    builder = builder.with_config(key, v);
                }
                let store = builder
                    .build()
                    .map_err(|e| anyhow::anyhow!("destination {:?} ({url}): {e}", cfg.name))?;
                let base = url.path().trim_matches('/').to_string();
                (Arc::new(store), base)
            }
        };
        if !base.is_empty() {
            ObjectPath::parse(&base).map_err(|e| {
                anyhow::anyhow!("destination {:?}: bad key prefix in {url}: {e}", cfg.name)
            })?;
        }
        Ok(Destination {
            name: cfg.name.clone(),
            store,
            base,
            concurrency: cfg.concurrency,
            public_base_url: cfg.public_base_url.clone(),
            url: url.to_string(),
            supports_attributes: url.scheme() != "file",
        })
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

/// Open every configured destination, in order (the first is the primary).
pub fn open_all(cfg: &config::Config) -> anyhow::Result<Vec<Destination>> {
    cfg.destinations().map(Destination::open).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Listings that survive keys object_store cannot parse.
//!
//! object_store 0.14 turns every listed key into a `Path` and ends the whole listing at the
//! first one `Path::parse` refuses, so one key written by another client hides every other
//! key of the prefix (upstream: apache/arrow-rs-object-store#341). The listers here make the
//! request object_store would make, with its credentials and its HTTP client, and parse the
//! keys one by one: a key it cannot address goes to `Listing::bad_keys`.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectMeta;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ClientOptions};

use super::{BadKey, error_chain, printable};

/// What a lister found: the objects object_store can address, and the keys it cannot.
pub(super) type Listed = (Vec<ObjectMeta>, Vec<BadKey>);

/// How a destination lists.
#[derive(Clone)]
pub(super) enum Lister {
    /// object_store's own listing. It parses every key of a page into a `Path` and ends the
    /// whole listing at the first key it cannot parse (the key is named in the error).
    Store,
    /// S3: our own paginated ListObjectsV2, signed with object_store's credentials, which
    /// keeps every key as the raw string the server sent.
    S3(Arc<S3Lister>),
    /// `file://`: our own walk of the directory, as object_store's `LocalFileSystem` walks it.
    Local(Arc<LocalLister>),
}

/// A ListObjectsV2 client that tolerates keys object_store cannot parse.
///
/// object_store 0.14 turns every `<Key>` of a page into a `Path` and fails the page (and with
/// it the stream) on the first one `Path::parse` refuses, so one key written by another client
/// hides every other key of the prefix (upstream: apache/arrow-rs-object-store#341). This is the
/// smallest workaround: the same request object_store makes, signed with its
/// `AwsAuthorizer` and sent with its HTTP client, but the keys are parsed one by one.
pub(super) struct S3Lister {
    store: Arc<AmazonS3>,
    client: HttpClient,
    /// `https://host/bucket` or, virtual-hosted, `https://bucket.host`: as object_store builds it.
    bucket_endpoint: String,
    region: String,
}

/// The part of a ListObjectsV2 answer we use.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListPage {
    #[serde(default)]
    contents: Vec<ListEntry>,
    #[serde(default)]
    is_truncated: bool,
    next_continuation_token: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListEntry {
    key: String,
    size: u64,
    last_modified: chrono::DateTime<chrono::Utc>,
    #[serde(rename = "ETag")]
    e_tag: Option<String>,
}

/// Keys per ListObjectsV2 page (the S3 maximum).
const LIST_PAGE: &str = "1000";

impl S3Lister {
    pub(super) fn new(
        b: &AmazonS3Builder,
        bucket: &str,
        store: Arc<AmazonS3>,
    ) -> Result<S3Lister, String> {
        let get = |k: AmazonS3ConfigKey| b.get_config_value(&k);
        let region = get(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = get(AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        // As object_store's builder does (S3 Express zonal endpoints aside).
        let bucket_endpoint = match (get(AmazonS3ConfigKey::Endpoint), virtual_hosted) {
            (Some(e), true) => e,
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let mut options = ClientOptions::new();
        for key in [
            ClientConfigKey::AllowHttp,
            ClientConfigKey::AllowInvalidCertificates,
            ClientConfigKey::ConnectTimeout,
            ClientConfigKey::Timeout,
            ClientConfigKey::ProxyUrl,
            ClientConfigKey::ProxyCaCertificate,
            ClientConfigKey::ProxyExcludes,
        ] {
            if let Some(v) = get(AmazonS3ConfigKey::Client(key)) {
                options = options.with_config(key, v);
            }
        }
        let client = ReqwestConnector::default()
            .connect(&options)
            .map_err(|e| error_chain(&e))?;
        Ok(S3Lister {
            store,
            client,
            bucket_endpoint,
            region,
        })
    }

    /// Every key under `prefix` (a full key ending in `/`, or empty for the whole bucket).
    pub(super) async fn list(&self, prefix: &str) -> Result<Listed, String> {
        let mut out = Listed::default();
        let mut token: Option<String> = None;
        loop {
            let mut url = url::Url::parse(&self.bucket_endpoint)
                .map_err(|e| format!("bad endpoint {}: {e}", self.bucket_endpoint))?;
            {
                let mut q = url.query_pairs_mut();
                if let Some(t) = &token {
                    q.append_pair("continuation-token", t);
                }
                q.append_pair("list-type", "2");
                q.append_pair("max-keys", LIST_PAGE);
                if !prefix.is_empty() {
                    q.append_pair("prefix", prefix);
                }
            }
            let page = self.page(&url).await?;
            for entry in page.contents {
                match ObjectPath::parse(&entry.key) {
                    Ok(location) => out.0.push(ObjectMeta {
                        location,
                        last_modified: entry.last_modified,
                        size: entry.size,
                        e_tag: entry.e_tag,
                        version: None,
                    }),
                    Err(e) => out.1.push(BadKey::new(&entry.key, &e)),
                }
            }
            match page.next_continuation_token {
                Some(t) if page.is_truncated && !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    /// One page, retried like object_store retries (a few times, on errors worth retrying).
    async fn page(&self, url: &url::Url) -> Result<ListPage, String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.page_once(url).await {
                Ok(page) => return Ok(page),
                Err((retry, e)) if retry && attempt < 4 => {
                    tracing::debug!(error = %e, attempt, "listing page failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    async fn page_once(&self, url: &url::Url) -> Result<ListPage, (bool, String)> {
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| (true, format!("getting credentials: {}", error_chain(&e))))?;
        let mut request = http::Request::builder()
            .method(http::Method::GET)
            .uri(url.as_str())
            .body(HttpRequestBody::empty())
            .map_err(|e| (false, format!("building the request: {e}")))?;
        AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(|e| (false, format!("signing the request: {}", error_chain(&e))))?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| (true, error_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| (true, error_chain(&e)))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.chars().take(500).collect();
            let retry = status.is_server_error() || status.as_u16() == 429;
            return Err((
                retry,
                format!("status code: {status}: {}", printable(text.trim())),
            ));
        }
        quick_xml::de::from_reader(body.as_ref())
            .map_err(|e| (false, format!("parsing the listing: {e}")))
    }
}

/// A `file://` listing that tolerates file names object_store cannot address.
///
/// `LocalFileSystem::list` walks the directory and converts each file's path into a `Path`;
/// the first name it cannot convert (a control character, bytes that are not UTF-8) ends the
/// walk with an error. This walks the same way (walkdir,
/// symbolic links followed, broken ones and vanished files skipped, object_store's staging
/// files `name#<digits>` skipped) but converts the names one by one. `e_tag` is left out:
/// object_store makes one from inode, mtime and size, and no caller of a listing reads it.
pub(super) struct LocalLister {
    /// The store's directory, canonicalised as `LocalFileSystem::new_with_prefix` does.
    root: std::path::PathBuf,
}

impl LocalLister {
    pub(super) fn new(dir: &std::path::Path) -> Result<LocalLister, String> {
        let root = std::fs::canonicalize(dir)
            .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
        Ok(LocalLister { root })
    }

    /// Every file under `prefix` (a parsed `Path` and a `/`, or empty for the whole store),
    /// walked on a blocking thread.
    pub(super) async fn list(self: &Arc<Self>, prefix: &str) -> Result<Listed, String> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        tokio::task::spawn_blocking(move || this.walk(&prefix))
            .await
            .map_err(|e| format!("the listing task failed: {e}"))?
    }

    fn walk(&self, prefix: &str) -> Result<Listed, String> {
        let mut dir = self.root.clone();
        dir.extend(prefix.split('/').filter(|s| !s.is_empty()));
        let (mut objects, mut bad_keys) = (Vec::new(), Vec::new());
        for entry in walkdir::WalkDir::new(&dir).min_depth(1).follow_links(true) {
            let entry = match entry {
                Ok(entry) => entry,
                // Gone since the directory was read (a staging file renamed, a file deleted).
                Err(e)
                    if e.io_error().map(|io| io.kind()) == Some(std::io::ErrorKind::NotFound) =>
                {
                    continue;
                }
                Err(e) => return Err(format!("walking {}: {e}", dir.display())),
            };
            let path = entry.path();
            // `is_file` follows links: directories, broken links and other kinds are skipped.
            if !path.is_file() {
                continue;
            }
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            let raw = rel.to_string_lossy().into_owned();
            // object_store's staging files (`<name>#<digits>`) are not objects.
            if let Some((_, suffix)) = raw.rsplit('/').next().unwrap_or_default().split_once('#')
                && !suffix.is_empty()
                && suffix.bytes().all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let Some(key) = rel.to_str() else {
                bad_keys.push(BadKey::with_reason(&raw, "the file name is not UTF-8"));
                continue;
            };
            let location = match ObjectPath::parse(key) {
                Ok(location) => location,
                Err(e) => {
                    bad_keys.push(BadKey::new(key, &e));
                    continue;
                }
            };
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e)
                    if e.io_error().map(|io| io.kind()) == Some(std::io::ErrorKind::NotFound) =>
                {
                    continue;
                }
                Err(e) => return Err(format!("reading the metadata of {}: {e}", path.display())),
            };
            let last_modified = meta
                .modified()
                .map_err(|e| format!("reading the mtime of {}: {e}", path.display()))?;
            objects.push(ObjectMeta {
                location,
                last_modified: last_modified.into(),
                size: meta.len(),
                e_tag: None,
                version: None,
            });
        }
        Ok((objects, bad_keys))
    }
}

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
use object_store::azure::{AzureAuthorizer, AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::client::{
    HttpClient, HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector,
};
use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder, GoogleConfigKey};
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
    /// S3, GCS, Azure: our own paginated listing requests, signed with object_store's
    /// credentials, which keep every key as the string the server sent.
    Remote(Arc<RemoteLister>),
    /// `file://`: our own walk of the directory, as object_store's `LocalFileSystem` walks it.
    Local(Arc<LocalLister>),
}

/// A listing client for S3, GCS and Azure that tolerates keys object_store cannot parse.
///
/// object_store 0.14 turns every key of a page into a `Path` and fails the page (and with it
/// the stream) on the first one `Path::parse` refuses. This is the smallest workaround: the
/// request object_store makes (S3 and GCS: ListObjectsV2, which GCS's XML API speaks too;
/// Azure: List Blobs), to the URL its builder would use, authorised with the store's own
/// credentials and authorizer and sent with object_store's HTTP client, but every key is
/// parsed on its own.
pub(super) struct RemoteLister {
    service: Service,
    client: HttpClient,
    /// The bucket's or container's URL, as object_store builds it (never credentials).
    endpoint: String,
    /// `skip_signature`: requests go unsigned, as object_store sends them.
    skip_signature: bool,
}

/// Whose credentials sign the requests, and how.
enum Service {
    S3 {
        store: Arc<AmazonS3>,
        region: String,
    },
    Gcs {
        store: Arc<GoogleCloudStorage>,
    },
    Azure {
        store: Arc<MicrosoftAzure>,
        account: String,
    },
}

/// The part of a ListObjectsV2 answer we use.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListPage {
    #[serde(default)]
    contents: Vec<ListEntry>,
    /// S3 always sends it; GCS's XML API may not (object_store follows the token alone).
    is_truncated: Option<bool>,
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

/// The part of a List Blobs answer we use.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BlobsPage {
    blobs: Blobs,
    next_marker: Option<String>,
}

#[derive(serde::Deserialize)]
struct Blobs {
    #[serde(rename = "Blob", default)]
    blobs: Vec<Blob>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Blob {
    name: BlobName,
    properties: BlobProperties,
}

/// A blob name; Azure percent-encodes one that holds characters XML cannot carry (a control
/// character) and says so with `Encoded="true"`. (object_store 0.14 ignores the attribute and
/// lists such a blob under its encoded name.)
#[derive(serde::Deserialize)]
struct BlobName {
    #[serde(rename = "@Encoded", default)]
    encoded: Option<bool>,
    #[serde(rename = "$text", default)]
    text: String,
}

#[derive(serde::Deserialize)]
struct BlobProperties {
    #[serde(rename = "Last-Modified", deserialize_with = "rfc1123")]
    last_modified: chrono::DateTime<chrono::Utc>,
    #[serde(rename = "Content-Length")]
    content_length: u64,
    #[serde(rename = "Etag")]
    e_tag: Option<String>,
    /// `directory` for the directories of a hierarchical namespace (not objects).
    #[serde(rename = "ResourceType")]
    resource_type: Option<String>,
}

fn rfc1123<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<chrono::DateTime<chrono::Utc>, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    chrono::DateTime::parse_from_rfc2822(&text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(serde::de::Error::custom)
}

/// Keys per ListObjectsV2 page on S3 (its maximum; object_store sends no page size to GCS
/// or Azure, which then use their own defaults, 1,000 and 5,000).
const S3_LIST_PAGE: &str = "1000";

/// The Azure REST version object_store 0.14 speaks (sent by its authorizer; by us when
/// requests go unsigned).
const AZURE_VERSION: &str = "2023-11-03";

/// Where object_store's GCS client goes unless told otherwise.
const GCS_BASE_URL: &str = "https://storage.googleapis.com";

/// A boolean option as object_store parses it.
fn truthy(value: Option<String>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.to_ascii_lowercase().as_str(),
            "1" | "true" | "on" | "yes" | "y"
        )
    })
}

/// An HTTP client with the store's client options (timeouts, proxy, TLS, plain HTTP).
fn http_client(
    get: impl Fn(ClientConfigKey) -> Option<String>,
    allow_http: bool,
) -> Result<HttpClient, String> {
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
        if let Some(v) = get(key) {
            options = options.with_config(key, v);
        }
    }
    // Azurite: object_store allows plain HTTP whatever the options say.
    if allow_http {
        options = options.with_allow_http(true);
    }
    ReqwestConnector::default()
        .connect(&options)
        .map_err(|e| error_chain(&e))
}

impl RemoteLister {
    /// For an `s3://bucket` destination.
    pub(super) fn s3(
        b: &AmazonS3Builder,
        bucket: &str,
        store: Arc<AmazonS3>,
    ) -> Result<RemoteLister, String> {
        let get = |k: AmazonS3ConfigKey| b.get_config_value(&k);
        let region = get(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = truthy(get(AmazonS3ConfigKey::VirtualHostedStyleRequest));
        // As object_store's builder does (S3 Express zonal endpoints aside).
        let endpoint = match (get(AmazonS3ConfigKey::Endpoint), virtual_hosted) {
            (Some(e), true) => e,
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        Ok(RemoteLister {
            client: http_client(|k| get(AmazonS3ConfigKey::Client(k)), false)?,
            skip_signature: truthy(get(AmazonS3ConfigKey::SkipSignature)),
            service: Service::S3 { store, region },
            endpoint,
        })
    }

    /// For a `gs://bucket` destination: the XML API at the base URL object_store uses (the
    /// `base_url` option, else the service account's `gcs_base_url`, else Google's).
    pub(super) fn gcs(
        b: &GoogleCloudStorageBuilder,
        bucket: &str,
        store: Arc<GoogleCloudStorage>,
    ) -> Result<RemoteLister, String> {
        let get = |k: GoogleConfigKey| b.get_config_value(&k);
        let base_url = match get(GoogleConfigKey::BaseUrl) {
            Some(url) => url,
            None => service_account_base_url(b)?.unwrap_or_else(|| GCS_BASE_URL.into()),
        };
        let bucket =
            percent_encoding::utf8_percent_encode(bucket, percent_encoding::NON_ALPHANUMERIC);
        Ok(RemoteLister {
            client: http_client(|k| get(GoogleConfigKey::Client(k)), false)?,
            skip_signature: truthy(get(GoogleConfigKey::SkipSignature)),
            service: Service::Gcs { store },
            endpoint: format!("{base_url}/{bucket}"),
        })
    }

    /// For an `az://container` destination: the account's blob endpoint (the `endpoint`
    /// option, Fabric's or Azure's), or Azurite's (`use_emulator`, `AZURITE_BLOB_STORAGE_URL`)
    /// with the account as the first path segment.
    pub(super) fn azure(
        b: &MicrosoftAzureBuilder,
        container: &str,
        store: Arc<MicrosoftAzure>,
    ) -> Result<RemoteLister, String> {
        let get = |k: AzureConfigKey| b.get_config_value(&k);
        let emulator = truthy(get(AzureConfigKey::UseEmulator));
        let (service_url, account) = if emulator {
            (
                std::env::var("AZURITE_BLOB_STORAGE_URL")
                    .unwrap_or_else(|_| "http://127.0.0.1:10000".into()),
                get(AzureConfigKey::AccountName).unwrap_or_else(|| "devstoreaccount1".into()),
            )
        } else {
            let account =
                get(AzureConfigKey::AccountName).ok_or("no storage account name (account_name)")?;
            let url = match get(AzureConfigKey::Endpoint) {
                Some(url) => url,
                None if truthy(get(AzureConfigKey::UseFabricEndpoint)) => {
                    format!("https://{account}.blob.fabric.microsoft.com")
                }
                None => format!("https://{account}.blob.core.windows.net"),
            };
            (url, account)
        };
        let mut endpoint = url::Url::parse(&service_url)
            .map_err(|e| format!("bad blob endpoint {service_url}: {e}"))?;
        endpoint
            .path_segments_mut()
            .map_err(|()| format!("bad blob endpoint {service_url}"))?
            .extend(emulator.then_some(account.as_str()))
            .push(container);
        Ok(RemoteLister {
            client: http_client(|k| get(AzureConfigKey::Client(k)), emulator)?,
            skip_signature: truthy(get(AzureConfigKey::SkipSignature)),
            service: Service::Azure { store, account },
            endpoint: endpoint.to_string(),
        })
    }

    /// Every key under `prefix` (a full key ending in `/`, or empty for the whole bucket).
    pub(super) async fn list(&self, prefix: &str) -> Result<Listed, String> {
        let mut out = Listed::default();
        let mut token: Option<String> = None;
        loop {
            let url = self.page_url(prefix, token.as_deref())?;
            let body = self.page(&url).await?;
            token = match self.service {
                Service::Azure { .. } => blobs_page(&body, prefix, &mut out),
                Service::S3 { .. } | Service::Gcs { .. } => list_v2_page(&body, &mut out),
            }
            .map_err(|e| format!("parsing the listing: {e}"))?;
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// The query of one page, with the parameters object_store sends.
    fn page_url(&self, prefix: &str, token: Option<&str>) -> Result<url::Url, String> {
        let mut url = url::Url::parse(&self.endpoint)
            .map_err(|e| format!("bad endpoint {}: {e}", self.endpoint))?;
        let mut q = url.query_pairs_mut();
        if let Service::Azure { .. } = self.service {
            q.append_pair("restype", "container");
            q.append_pair("comp", "list");
            if !prefix.is_empty() {
                q.append_pair("prefix", prefix);
            }
            if let Some(t) = token {
                q.append_pair("marker", t);
            }
        } else {
            if let Some(t) = token {
                q.append_pair("continuation-token", t);
            }
            q.append_pair("list-type", "2");
            if let Service::S3 { .. } = self.service {
                q.append_pair("max-keys", S3_LIST_PAGE);
            }
            if !prefix.is_empty() {
                q.append_pair("prefix", prefix);
            }
        }
        drop(q);
        Ok(url)
    }

    /// One page, retried like object_store retries (a few times, on errors worth retrying).
    async fn page(&self, url: &url::Url) -> Result<bytes::Bytes, String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.page_once(url).await {
                Ok(page) => return Ok(page),
                Err((retry, e)) if retry && attempt < 4 => {
                    tracing::debug!(error = %e, attempt, "listing page failed; retrying");
                    tokio::time::sleep(crate::format::units::retry_delay(
                        attempt,
                        Duration::from_millis(400),
                        Duration::from_secs(2),
                    ))
                    .await;
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    async fn page_once(&self, url: &url::Url) -> Result<bytes::Bytes, (bool, String)> {
        let mut request = http::Request::builder()
            .method(http::Method::GET)
            .uri(url.as_str())
            .body(HttpRequestBody::empty())
            .map_err(|e| (false, format!("building the request: {e}")))?;
        self.authorize(&mut request).await?;
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
        Ok(body)
    }

    /// Sign `request` as object_store signs its own (its authorizers, its credentials).
    async fn authorize(&self, request: &mut HttpRequest) -> Result<(), (bool, String)> {
        let credentials =
            |e: object_store::Error| (true, format!("getting credentials: {}", error_chain(&e)));
        let signing =
            |e: object_store::Error| (false, format!("signing the request: {}", error_chain(&e)));
        match &self.service {
            Service::Azure { .. } if self.skip_signature => {
                request.headers_mut().insert(
                    "x-ms-version",
                    http::HeaderValue::from_static(AZURE_VERSION),
                );
            }
            _ if self.skip_signature => {}
            Service::S3 { store, region } => {
                let credential = store
                    .credentials()
                    .get_credential()
                    .await
                    .map_err(credentials)?;
                AwsAuthorizer::new(&credential, "s3", region)
                    .try_authorize(request, None)
                    .map_err(signing)?;
            }
            Service::Gcs { store } => {
                let credential = store
                    .credentials()
                    .get_credential()
                    .await
                    .map_err(credentials)?;
                // An empty token (`disable_oauth`) goes unsent, as object_store leaves it.
                if !credential.bearer.is_empty() {
                    let mut value =
                        http::HeaderValue::try_from(format!("Bearer {}", credential.bearer))
                            .map_err(|_| {
                                (
                                    false,
                                    "the bearer token is not a valid header value".to_string(),
                                )
                            })?;
                    value.set_sensitive(true);
                    request
                        .headers_mut()
                        .insert(http::header::AUTHORIZATION, value);
                }
            }
            Service::Azure { store, account } => {
                let credential = store
                    .credentials()
                    .get_credential()
                    .await
                    .map_err(credentials)?;
                AzureAuthorizer::new(&credential, account)
                    .try_authorize(request)
                    .map_err(signing)?;
            }
        }
        Ok(())
    }
}

/// The objects of one ListObjectsV2 page into `out`; the next page's token.
fn list_v2_page(body: &[u8], out: &mut Listed) -> Result<Option<String>, quick_xml::DeError> {
    let page: ListPage = quick_xml::de::from_reader(body)?;
    for entry in page.contents {
        push(
            out,
            &entry.key,
            entry.size,
            entry.last_modified,
            entry.e_tag,
        );
    }
    Ok(page
        .next_continuation_token
        .filter(|t| !t.is_empty() && page.is_truncated != Some(false)))
}

/// The blobs of one List Blobs page into `out`, filtered as object_store filters them
/// (directories of a hierarchical namespace, a blob named as the prefix itself); the next
/// page's marker.
fn blobs_page(
    body: &[u8],
    prefix: &str,
    out: &mut Listed,
) -> Result<Option<String>, quick_xml::DeError> {
    let page: BlobsPage = quick_xml::de::from_reader(body)?;
    for blob in page.blobs.blobs {
        if blob.properties.resource_type.as_deref() == Some("directory") {
            continue;
        }
        let name = if blob.name.encoded == Some(true) {
            match percent_encoding::percent_decode_str(&blob.name.text).decode_utf8() {
                Ok(name) => name.into_owned(),
                Err(_) => {
                    out.1.push(BadKey::with_reason(
                        &blob.name.text,
                        "the name is not UTF-8",
                    ));
                    continue;
                }
            }
        } else {
            blob.name.text
        };
        if name.len() <= prefix.len() {
            continue;
        }
        let p = blob.properties;
        push(out, &name, p.content_length, p.last_modified, p.e_tag);
    }
    Ok(page.next_marker.filter(|m| !m.is_empty()))
}

/// One listed key: an object if object_store can address it, else a bad key.
fn push(
    out: &mut Listed,
    key: &str,
    size: u64,
    last_modified: chrono::DateTime<chrono::Utc>,
    e_tag: Option<String>,
) {
    match ObjectPath::parse(key) {
        Ok(location) => out.0.push(ObjectMeta {
            location,
            last_modified,
            size,
            e_tag,
            version: None,
        }),
        Err(e) => out.1.push(BadKey::new(key, &e)),
    }
}

/// `gcs_base_url` of the service account object_store was given (its builder reads it from
/// there when no `base_url` option is set).
fn service_account_base_url(b: &GoogleCloudStorageBuilder) -> Result<Option<String>, String> {
    #[derive(serde::Deserialize)]
    struct Account {
        gcs_base_url: Option<String>,
    }
    let text = match (
        b.get_config_value(&GoogleConfigKey::ServiceAccount),
        b.get_config_value(&GoogleConfigKey::ServiceAccountKey),
    ) {
        (Some(path), _) => std::fs::read_to_string(&path)
            .map_err(|e| format!("reading the service account {path}: {e}"))?,
        (None, Some(key)) => key,
        (None, None) => return Ok(None),
    };
    // serde_json's messages hold positions and types, never the key's text.
    let account: Account = serde_json::from_str(&text)
        .map_err(|e| format!("reading gcs_base_url from the service account: {e}"))?;
    Ok(account.gcs_base_url)
}

/// A `file://` listing that tolerates file names object_store cannot address.
///
/// `LocalFileSystem::list` walks the directory and converts each file's path into a `Path`;
/// the first name it cannot convert (a control character, bytes that are not UTF-8) ends the
/// walk with an error. This walks the same tree (walkdir; vanished files and object_store's
/// staging files `name#<digits>` skipped) but converts the names one by one, and never
/// follows a symbolic link: one planted in the store (`etclink -> /etc`) would make a restore
/// copy whatever it points at, so each is named as a bad key instead. `e_tag` is left out:
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
        for entry in walkdir::WalkDir::new(&dir).min_depth(1).follow_links(false) {
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
            if entry.file_type().is_symlink() {
                let raw = path
                    .strip_prefix(&self.root)
                    .unwrap_or(path)
                    .to_string_lossy();
                bad_keys.push(BadKey::with_reason(
                    &raw,
                    "a symbolic link in the store: never followed, not an object",
                ));
                continue;
            }
            // Directories and other kinds (FIFOs, sockets) are no objects.
            if !entry.file_type().is_file() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_names_are_decoded_and_filtered_as_object_store_filters_them() {
        // A name Azure had to percent-encode (it holds \x01), a directory of a hierarchical
        // namespace, a blob named as the prefix itself, a plain one.
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ContainerName="c"><Prefix>p/</Prefix><Blobs>
<Blob><Name Encoded="true">p/bad%01key.log</Name><Properties><Last-Modified>Thu, 01 Jul 2021 10:44:59 GMT</Last-Modified><Content-Length>7</Content-Length><Etag>0x1</Etag></Properties></Blob>
<Blob><Name>p/dir</Name><Properties><Last-Modified>Thu, 01 Jul 2021 10:44:59 GMT</Last-Modified><Content-Length>0</Content-Length><ResourceType>directory</ResourceType></Properties></Blob>
<Blob><Name>p/</Name><Properties><Last-Modified>Thu, 01 Jul 2021 10:44:59 GMT</Last-Modified><Content-Length>0</Content-Length></Properties></Blob>
<Blob><Name Encoded="false">p/ok%20.log</Name><Properties><Last-Modified>Thu, 01 Jul 2021 10:45:00 GMT</Last-Modified><Content-Length>3</Content-Length><Etag>0x2</Etag></Properties></Blob>
</Blobs><NextMarker>m2</NextMarker></EnumerationResults>"#;
        let mut out = Listed::default();
        let next = blobs_page(xml.as_bytes(), "p/", &mut out).unwrap();
        assert_eq!(next.as_deref(), Some("m2"));
        assert_eq!(out.0.len(), 1);
        assert_eq!(out.0[0].location.as_ref(), "p/ok%20.log");
        assert_eq!(out.0[0].size, 3);
        assert_eq!(out.0[0].e_tag.as_deref(), Some("0x2"));
        assert_eq!(out.0[0].last_modified.timestamp(), 1_625_136_300);
        assert_eq!(out.1.len(), 1);
        assert_eq!(out.1[0].key, "p/bad\\u{1}key.log");
    }

    #[test]
    fn a_list_v2_page_without_is_truncated_follows_its_token() {
        let page = |extra: &str| {
            format!(
                "<ListBucketResult><Contents><Key>a//b</Key><Size>1</Size>\
                 <LastModified>2026-01-01T00:00:00Z</LastModified></Contents>{extra}</ListBucketResult>"
            )
        };
        let mut out = Listed::default();
        let next = list_v2_page(
            page("<NextContinuationToken>t</NextContinuationToken>").as_bytes(),
            &mut out,
        );
        assert_eq!(next.unwrap().as_deref(), Some("t"));
        assert_eq!((out.0.len(), out.1.len()), (0, 1));
        let done = list_v2_page(
            page(
                "<IsTruncated>false</IsTruncated><NextContinuationToken>t</NextContinuationToken>",
            )
            .as_bytes(),
            &mut out,
        );
        assert_eq!(done.unwrap(), None);
        assert_eq!(list_v2_page(page("").as_bytes(), &mut out).unwrap(), None);
    }

    #[test]
    fn booleans_parse_as_object_store_parses_them() {
        for yes in ["true", "TRUE", "1", "yes", "on", "y"] {
            assert!(truthy(Some(yes.into())), "{yes}");
        }
        for no in ["false", "0", "no", "", "maybe"] {
            assert!(!truthy(Some(no.into())), "{no}");
        }
        assert!(!truthy(None));
    }
}

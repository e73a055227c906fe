//! `panoptic-sync serve`: a read-only HTTP gateway over one destination, so runs can be
//! browsed from an encrypted or `file://` store (and from any store through one URL).
//!
//! Paths mirror the runs: `GET /<prefix>/<run>/<path>` answers the file's original bytes
//! (decrypted, decompressed, authenticated as `restore` authenticates them) with its type;
//! `/<prefix>/<run>/` the run's page, rendered from its manifest; `/<prefix>/` the runs under a
//! prefix (a node's run list), newest first; `/` the fleet page; `/latest/<branch>` redirects
//! to the newest sealed run of that branch. Bodies are streamed (one decode buffer per
//! request, whatever the file's size), single HTTP ranges are answered, and nothing is ever
//! written to disk.
//!
//! Every request needs `Authorization: Bearer <token>` when a token file is given; without
//! one the gateway refuses to listen on anything but a loopback address. A file served whole
//! is checked against the manifest's SHA-256 before its last bytes are sent: a damaged or
//! swapped object ends in a broken response, never in a complete wrong one. Files are served
//! with `Content-Security-Policy: sandbox` (scripts allowed, origin opaque), so a CI job's
//! HTML report cannot read the gateway's other pages. A path no sealed run holds but that has
//! segments (an open run, a log still being written) answers what they hold ([`growing`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, Entry, Manifests};
use crate::destination::Destination;
use crate::format::layout;
use crate::format::manifest::{Manifest, ManifestFile, RUN_DIR};
use crate::httpd::Limits;
use crate::pipeline::{self, Pipeline};

mod growing;

/// How long a listing of the store's runs is reused.
const CATALOG_TTL: Duration = Duration::from_secs(5);
/// Runs listed on a prefix's page.
const LISTED_RUNS: usize = 200;

/// How `serve` runs.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Address to listen on.
    pub(crate) listen: SocketAddr,
    /// File holding the bearer token (one line).
    pub(crate) token_file: Option<PathBuf>,
}

/// The store's runs by key prefix.
type Runs = Arc<BTreeMap<String, Entry>>;

struct Gateway {
    dest: Destination,
    pipeline: Pipeline,
    token: Option<String>,
    manifests: Manifests,
    catalog: tokio::sync::Mutex<Option<(Instant, Runs)>>,
}

/// Read the token: the file's first line, at least 16 characters.
pub(crate) fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(
        token.len() >= 16,
        "token file {}: the token must be at least 16 characters",
        path.display()
    );
    Ok(token)
}

/// Serve `dest` until `shutdown`.
pub(crate) async fn run(
    dest: Destination,
    pipeline: Pipeline,
    opts: &Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let token = opts.token_file.as_deref().map(read_token).transpose()?;
    if token.is_none() && !opts.listen.ip().is_loopback() {
        return Err(crate::error::UsageError(format!(
            "serve: refusing to listen on {} without --token-file (anyone who can reach it could read every run)",
            opts.listen
        ))
        .into());
    }
    let listener = crate::httpd::bind(opts.listen, "serve").await?;
    let name = dest.name.clone();
    let gateway = Arc::new(Gateway {
        dest,
        pipeline,
        token,
        manifests: Manifests::default(),
        catalog: tokio::sync::Mutex::new(None),
    });
    let app = axum::Router::new().fallback(handle).with_state(gateway);
    tracing::info!(addr = %opts.listen, destination = %name, "serving runs");
    eprintln!("serving {name} on http://{}/ (Ctrl-C stops)", opts.listen);
    crate::httpd::serve(listener, app, Limits::GATEWAY, "serve", shutdown).await;
    Ok(())
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn html(body: String) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn redirect(to: &str) -> Response {
    match HeaderValue::from_str(to) {
        Ok(v) => (StatusCode::FOUND, [(header::LOCATION, v)]).into_response(),
        Err(_) => text(StatusCode::BAD_REQUEST, "bad redirect target"),
    }
}

/// Constant-time comparison of the presented token.
fn authorized(gw: &Gateway, headers: &HeaderMap) -> bool {
    let Some(want) = &gw.token else {
        return true;
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (
        Sha256::digest(want.as_bytes()),
        Sha256::digest(got.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn handle(State(gw): State<Arc<Gateway>>, req: Request<Body>) -> Response {
    if req.method() != axum::http::Method::GET && req.method() != axum::http::Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "read-only: GET and HEAD only\n",
        );
    }
    if !authorized(&gw, req.headers()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required\n",
        )
            .into_response();
    }
    let raw = req.uri().path().to_string();
    let Ok(path) = percent_encoding::percent_decode_str(&raw).decode_utf8() else {
        return text(StatusCode::BAD_REQUEST, "the path is not UTF-8\n");
    };
    let path = path.into_owned();
    match route(&gw, &path, req.headers()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(path = %crate::destination::printable(&path), error = %format!("{e:#}"), "serve: request failed");
            text(
                StatusCode::BAD_GATEWAY,
                format!("{}\n", crate::destination::printable(&format!("{e:#}"))),
            )
        }
    }
}

async fn route(gw: &Gateway, path: &str, headers: &HeaderMap) -> anyhow::Result<Response> {
    if path == "/" {
        return fleet_page(gw).await;
    }
    if let Some(branch) = path.strip_prefix("/latest/") {
        return latest(gw, branch.trim_end_matches('/')).await;
    }
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|s| s == "." || s == "..") {
        return Ok(text(StatusCode::BAD_REQUEST, "no . or .. segments\n"));
    }
    let runs = runs(gw).await?;
    // The longest run key prefix the path starts with, at a segment boundary.
    let mut cut = rel.len();
    loop {
        let head = rel[..cut].trim_end_matches('/');
        if let Some(entry) = runs.get(head) {
            let rest = &rel[head.len()..];
            return run_path(gw, entry, rest, headers).await;
        }
        match rel[..cut].rfind('/') {
            Some(i) => cut = i,
            None => break,
        }
    }
    let prefix = rel.trim_end_matches('/');
    let under: Vec<&Entry> = runs.values().filter(|e| e.parent() == prefix).collect();
    if !under.is_empty() {
        if !path.ends_with('/') {
            return Ok(redirect(&format!("{path}/")));
        }
        return run_list(gw, prefix, under).await;
    }
    // An open run, or a file still being written: what its segments hold.
    if let Some(resp) = growing::respond(gw, rel, path.ends_with('/')).await? {
        return Ok(resp);
    }
    Ok(text(StatusCode::NOT_FOUND, "no such run or file\n"))
}

/// The store's runs, listed at most every [`CATALOG_TTL`].
async fn runs(gw: &Gateway) -> anyhow::Result<Runs> {
    let mut cached = gw.catalog.lock().await;
    if let Some((at, runs)) = cached.as_ref()
        && at.elapsed() < CATALOG_TTL
    {
        return Ok(runs.clone());
    }
    let runs = Arc::new(catalog::list(&gw.dest, &gw.pipeline).await?);
    *cached = Some((Instant::now(), runs.clone()));
    Ok(runs)
}

async fn run_path(
    gw: &Gateway,
    entry: &Entry,
    rest: &str,
    headers: &HeaderMap,
) -> anyhow::Result<Response> {
    if rest.is_empty() {
        return Ok(redirect(&format!("/{}/", encode(&entry.key_prefix))));
    }
    let manifest = gw.manifests.get(&gw.dest, &gw.pipeline, entry).await?;
    let file = rest.trim_start_matches('/');
    if file.is_empty() {
        let stories = crate::seal::failure_stories(std::slice::from_ref(&gw.dest), &manifest).await;
        return Ok(html(crate::html::run_page::render_served(
            &manifest,
            stories.as_ref(),
        )));
    }
    if file == format!("{RUN_DIR}/manifest.json") {
        let body = serde_json::to_vec_pretty(&*manifest)?;
        return Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            body,
        )
            .into_response());
    }
    match manifest.files.iter().find(|f| f.path == file) {
        Some(f) => file_response(gw, f, headers).await,
        None => Ok(text(StatusCode::NOT_FOUND, "no such file in this run\n")),
    }
}

/// `path` with each segment percent-encoded.
fn encode(path: &str) -> String {
    path.split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, crate::html::href::SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// A single `bytes=a-b`, `bytes=a-` or `bytes=-n` range within `size`: `Some(Err(()))` when it
/// cannot be satisfied; `None` (the whole file) for anything else.
fn parse_range(headers: &HeaderMap, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return Some(Err(()));
            }
            (size.saturating_sub(n), size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.saturating_sub(1)),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(size.saturating_sub(1)),
        ),
    };
    if size == 0 || start > end || start >= size {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

async fn file_response(
    gw: &Gateway,
    f: &ManifestFile,
    headers: &HeaderMap,
) -> anyhow::Result<Response> {
    let range = match parse_range(headers, f.size) {
        Some(Err(())) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{}", f.size))],
            )
                .into_response());
        }
        Some(Ok(r)) => Some(r),
        None => None,
    };
    if gw.pipeline.key.is_some() && !layout::parse(&f.stored_key).plan.encrypt {
        anyhow::bail!(
            "object {} is not encrypted although a key is configured: refused",
            f.stored_key
        );
    }
    // In a content destination the bytes are the blob's its pointer names.
    let (read_key, get) =
        crate::restore::open_stored(&gw.dest, &gw.pipeline.keys, &f.stored_key, f.size).await?;
    let reader = crate::restore::download(gw.dest.store.clone(), get);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    let (keys, file) = (gw.pipeline.keys.clone(), f.clone());
    tokio::task::spawn_blocking(move || stream_file(reader, &keys, &file, &read_key, range, &tx));
    let body = Body::from_stream(tokio_stream_from(rx));
    let (status, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, b - a + 1),
        None => (StatusCode::OK, f.size),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&f.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox allow-scripts allow-popups allow-forms"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", f.sha256)) {
        h.insert(header::ETAG, etag);
    }
    if let Some((a, b)) = range
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{}", f.size))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Decode `f`'s object and send its bytes (all of them, or `range`). A whole file is checked
/// against the manifest before its last chunk goes out; any failure ends the body with an
/// error, which breaks the response.
fn stream_file(
    reader: crate::restore::Download,
    keys: &[crate::crypto::MasterKey],
    f: &ManifestFile,
    read_key: &str,
    range: Option<(u64, u64)>,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
) {
    let fail = |msg: String| {
        tracing::warn!(key = %f.stored_key, error = %msg, "serve: object refused");
        let _ = tx.blocking_send(Err(std::io::Error::other(msg)));
    };
    let plan = layout::parse(read_key).plan;
    let (mut r, meta) = match pipeline::decoder(plan, keys, read_key, reader) {
        Ok(d) => d,
        Err(e) => return fail(format!("object {read_key}: {e}")),
    };
    if let Some(m) = &meta
        && (m.size != f.size || !crate::restore::same_sha256(&m.sha256, &f.sha256))
    {
        return fail(format!(
            "object {} holds another content than the manifest lists",
            f.stored_key
        ));
    }
    let (start, end) = range.unwrap_or((0, f.size.saturating_sub(1)));
    let whole = range.is_none();
    let mut hasher = Sha256::new();
    let mut pos = 0u64;
    let mut held: Option<bytes::Bytes> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !whole && pos > end {
            break;
        }
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return fail(format!("object {}: {e}", f.stored_key)),
        };
        let chunk = &buf[..n];
        hasher.update(chunk);
        let (from, to) = (pos, pos + n as u64);
        pos = to;
        if pos > f.size {
            // Never decode past the listed size (a decompression bomb costs nothing more).
            return fail(format!(
                "object {} decodes to more than the {} bytes the manifest lists",
                f.stored_key, f.size
            ));
        }
        if to <= start {
            continue;
        }
        let a = start.saturating_sub(from) as usize;
        let b = if whole {
            n
        } else {
            ((end + 1).min(to) - from) as usize
        };
        let out = bytes::Bytes::copy_from_slice(&chunk[a..b]);
        if let Some(prev) = held.replace(out)
            && tx.blocking_send(Ok(prev)).is_err()
        {
            return; // the client went away
        }
    }
    if whole {
        let sha = hex::encode(hasher.finalize());
        if pos != f.size || !crate::restore::same_sha256(&sha, &f.sha256) {
            return fail(format!(
                "object {} does not match the manifest (size {pos}, SHA-256 {sha})",
                f.stored_key
            ));
        }
    }
    if let Some(last) = held {
        let _ = tx.blocking_send(Ok(last));
    }
}

async fn fleet_page(gw: &Gateway) -> anyhow::Result<Response> {
    let query = crate::results::fleet::Query {
        since: Duration::from_secs(30 * 86_400),
        branch: None,
        now_ms: crate::format::units::now_ms(),
    };
    let fleet = crate::report::fleet_in(&gw.dest, &query).await?;
    let runs = runs(gw).await?;
    let prefixes: std::collections::BTreeSet<&str> = runs.values().map(Entry::parent).collect();
    let page = crate::html::report::fleet_page(&fleet, Some("/"));
    // The run lists, linked from the top of the fleet page.
    let nav = crate::html::runs::prefix_links(prefixes.into_iter());
    Ok(html(page.replacen("<body>", &format!("<body>{nav}"), 1)))
}

async fn run_list(gw: &Gateway, prefix: &str, mut under: Vec<&Entry>) -> anyhow::Result<Response> {
    under.sort_by_key(|e| std::cmp::Reverse(e.modified_ms));
    under.truncate(LISTED_RUNS);
    let mut rows = Vec::new();
    for e in under {
        match gw.manifests.get(&gw.dest, &gw.pipeline, e).await {
            Ok(m) => rows.push(crate::html::runs::Row::of(&m)),
            Err(err) => rows.push(crate::html::runs::Row::unreadable(
                e.run(),
                &format!("{err:#}"),
            )),
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.sealed_ms));
    Ok(html(crate::html::runs::list_page(prefix, &rows, Some("/"))))
}

async fn latest(gw: &Gateway, branch: &str) -> anyhow::Result<Response> {
    let runs = runs(gw).await?;
    let mut best: Option<(i64, Arc<Manifest>)> = None;
    for e in runs.values() {
        let Ok(m) = gw.manifests.get(&gw.dest, &gw.pipeline, e).await else {
            continue;
        };
        let on_branch = m.ci.as_ref().and_then(|c| c.branch.as_deref()) == Some(branch);
        if on_branch && best.as_ref().is_none_or(|(ms, _)| m.sealed_ms > *ms) {
            best = Some((m.sealed_ms, m));
        }
    }
    Ok(match best {
        Some((_, m)) => redirect(&format!("/{}/", encode(&m.key_prefix))),
        None => text(StatusCode::NOT_FOUND, "no sealed run of this branch\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(range: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
        h
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(&h("bytes=0-9"), 100), Some(Ok((0, 9))));
        assert_eq!(parse_range(&h("bytes=90-"), 100), Some(Ok((90, 99))));
        assert_eq!(parse_range(&h("bytes=-10"), 100), Some(Ok((90, 99))));
        assert_eq!(parse_range(&h("bytes=50-500"), 100), Some(Ok((50, 99))));
        assert_eq!(parse_range(&h("bytes=100-"), 100), Some(Err(())));
        assert_eq!(parse_range(&h("bytes=5-1"), 100), Some(Err(())));
        assert_eq!(parse_range(&h("bytes=0-1,5-6"), 100), None);
        assert_eq!(parse_range(&h("items=0-1"), 100), None);
        assert_eq!(parse_range(&HeaderMap::new(), 100), None);
    }
}

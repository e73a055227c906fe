//! Growing files through `serve`: a path that no sealed run holds but that has segments (a
//! file still being written, or whose writer died) answers its durable prefix, decoded and
//! checked segment by segment (one segment in memory at a time), with `Cache-Control:
//! no-store`; a directory path with growing files under it (an open run) answers a page
//! listing each with its durable size. Segments are read as `restore` reads them
//! (`restore::partial`).

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use super::Gateway;
use crate::format::layout;
use crate::format::segment::{Chain, SegmentKey};
use crate::restore::partial;

/// The answer for `rel` (a logical key or prefix) when it names growing files; `None` when it
/// names none.
pub(super) async fn respond(
    gw: &Gateway,
    rel: &str,
    dir: bool,
) -> anyhow::Result<Option<Response>> {
    let rel = rel.trim_end_matches('/');
    if rel.is_empty() {
        return Ok(None);
    }
    if !dir && let Some(chain) = partial::growing_file(&gw.dest, rel).await? {
        return Ok(Some(stream(gw, rel, chain)?));
    }
    let files = partial::growing_under(&gw.dest, rel).await?;
    if files.is_empty() {
        return Ok(None);
    }
    if !dir {
        return Ok(Some(super::redirect(&format!("/{}/", super::encode(rel)))));
    }
    let mut listed = Vec::with_capacity(files.len());
    for (logical, chain) in files {
        let size = durable_size(gw, &chain).await;
        let name = logical
            .strip_prefix(rel)
            .unwrap_or(&logical)
            .trim_start_matches('/')
            .to_string();
        listed.push((name, size));
    }
    Ok(Some(super::html(crate::html::growing::page(rel, &listed))))
}

/// Where a chain's durable prefix ends: the offset of its last segment that follows on from
/// the one before, plus that segment's length (read); `None` when it cannot be read.
async fn durable_size(gw: &Gateway, chain: &Chain) -> Option<u64> {
    let mut last = chain.segments.first()?;
    for pair in chain.segments.windows(2) {
        // A later offset that is not past the previous one is a gap or an overlap: stop.
        if pair[1].offset <= pair[0].offset {
            break;
        }
        last = &pair[1];
    }
    let bytes = partial::segment_bytes(&gw.dest, &gw.pipeline.keys, last)
        .await
        .ok()?;
    Some(last.offset + bytes.len() as u64)
}

/// The durable prefix of a growing file as a streamed body: each segment decoded, checked and
/// sent in order; a gap ends the body, a bad segment breaks it.
fn stream(gw: &Gateway, rel: &str, chain: Chain) -> anyhow::Result<Response> {
    if gw.pipeline.key.is_some() && chain.segments.iter().any(|s| !s.plan.encrypt) {
        anyhow::bail!("a segment of {rel} is not encrypted although a key is configured: refused");
    }
    let dest = gw.dest.clone();
    let keys = gw.pipeline.keys.clone();
    let segments: Vec<SegmentKey> = chain.segments;
    let body = futures::stream::unfold((0usize, 0u64), move |(i, offset)| {
        let (dest, keys) = (dest.clone(), keys.clone());
        let seg = segments.get(i).cloned();
        async move {
            let seg = seg.filter(|s| s.offset == offset)?;
            match partial::segment_bytes(&dest, &keys, &seg).await {
                Ok(bytes) => {
                    let next = offset + bytes.len() as u64;
                    Some((Ok(bytes::Bytes::from(bytes)), (i + 1, next)))
                }
                Err(e) => {
                    tracing::warn!(key = %seg.key(), error = %format!("{e:#}"), "serve: segment refused");
                    let err = std::io::Error::other(format!("{e:#}"));
                    Some((Err(err), (usize::MAX, u64::MAX)))
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(layout::guess_type(std::path::Path::new(rel))),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox allow-scripts allow-popups allow-forms"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

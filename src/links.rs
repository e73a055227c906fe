//! `url PATH`: a link to a local file's object, or to a sealed run's page when PATH is a run
//! directory or `NODE/RUN` (any node's run, found by its manifest in the store). With `public_base_url` (the CDN case) it is that base plus the object's key;
//! otherwise a presigned GET URL (S3, GCS, Azure) valid for a limited time (a presigned page
//! opens, but its relative links need public or website access to the bucket). Presigned URLs
//! are printed for the user only, never logged.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::index::Index;
use crate::scan::Root;

/// The link for the local file `path` in destination `dest` (default: the primary).
pub(crate) async fn link(
    config: &Config,
    path: &Path,
    dest: Option<&str>,
    expires: Duration,
) -> anyhow::Result<String> {
    let dest = match dest {
        Some(name) => crate::restore::find_destination(config, name)?,
        None => crate::destination::open_primary(config)?,
    };
    // `NODE/RUN` (no such local path): any node's sealed run, by its manifest in the store.
    if !path.exists()
        && let Some((node, run)) = path.to_str().and_then(|p| p.split_once('/'))
        && !node.is_empty()
        && !run.is_empty()
        && !run.contains('/')
        && !path.is_absolute()
    {
        let pipeline = crate::pipeline::Pipeline::from_config(config)?;
        let (_, manifest) = crate::catalog::find(&dest, &pipeline, node, run).await?;
        if pipeline.key.is_some() {
            anyhow::bail!(
                "run {node}/{run} is encrypted, so no page is stored; browse it through `panoptic-sync serve`, or render it with `report --run {node}/{run} --html FILE`"
            );
        }
        let (key, _) = crate::html::run_page::stored_location(&manifest);
        return link_to(&dest, &key, expires).await;
    }
    if config.watch.is_empty() {
        return Err(crate::error::UsageError(format!(
            "{}: no such file, and not NODE/RUN; a link to a local file needs a [[watch]]",
            path.display()
        ))
        .into());
    }
    let path =
        std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    if let Some(run) = crate::runs::run_at(config, &path) {
        if config.pipeline.encryption != crate::config::Encryption::None {
            anyhow::bail!(
                "run {:?} is encrypted, so no page is stored; render it locally with `report --run {} --html FILE`",
                run.name,
                run.name
            );
        }
        let index = Index::open(&config.state_dir)?;
        let manifest = crate::runs::sealed_manifest(config, &index, &run.name)?;
        let (key, _) = crate::html::run_page::stored_location(&manifest);
        return link_to(&dest, &key, expires).await;
    }
    let roots = Root::from_config(config);
    let root = roots
        .iter()
        .find(|r| r.relative(&path).is_some())
        .with_context(|| format!("{} is not inside a watched directory", path.display()))?;
    let key = root.key_for(&path).map_err(anyhow::Error::msg)?;
    let index = Index::open(&config.state_dir)?;
    let object = index.object_at(&dest.name, &key)?.with_context(|| {
        format!(
            "{} has not been uploaded to {:?} yet (key {key})",
            path.display(),
            dest.name
        )
    })?;
    // A content destination's file: the link opens its blob (the bytes; a plain blob carries
    // the file's Content-Type and Content-Encoding), not the pointer.
    let target = object.blob.as_ref().map_or(&object.stored_key, |b| &b.key);
    link_to(&dest, target, expires).await
}

/// The link to the object at `stored_key` (relative to the destination's base).
async fn link_to(
    dest: &crate::destination::Destination,
    stored_key: &str,
    expires: Duration,
) -> anyhow::Result<String> {
    if let Some(base) = &dest.public_base_url {
        return Ok(crate::destination::public_url(base, stored_key));
    }
    let location = dest.path(stored_key)?;
    match &dest.signer {
        Some(signer) => {
            let url = signer
                .signed_url(http::Method::GET, &location, expires)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot presign {location} in {:?}: {}",
                        dest.name,
                        crate::destination::error_chain(&e)
                    )
                })?;
            Ok(url.to_string())
        }
        None => {
            let dir = dest
                .url
                .parse::<url::Url>()
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .context("file:// destination without a path")?;
            let file = dir.join(stored_key);
            url::Url::from_file_path(&file)
                .map(|u| u.to_string())
                .map_err(|()| anyhow::anyhow!("cannot make a URL of {}", file.display()))
        }
    }
}

//! Globs, built one way: validated while the configuration is parsed with the same builder
//! that compiles them, so a glob that parses is a glob that matches.

use std::fmt;
use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Deserializer};

use super::Watch;

/// What `*` may cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Separator {
    /// `*` stays within one path segment (`include`, `exclude`, `junit`: `**` crosses).
    Literal,
    /// `*` matches `/` too (`uncompressed`: `*.html` matches at any depth).
    Any,
}

/// One glob, as every caller builds it.
pub(crate) fn glob(pattern: &str, sep: Separator) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(sep == Separator::Literal)
        .build()
}

/// Compile `globs` (checked while parsing; one that does not build is left out).
pub(crate) fn compile_globs(globs: &[String], sep: Separator) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        if let Ok(g) = glob(g, sep) {
            b.add(g);
        }
    }
    b.build().unwrap_or_else(|_| GlobSet::empty())
}

pub(super) fn de_globs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let globs = Vec::<String>::deserialize(d)?;
    for g in &globs {
        glob(g, Separator::Literal)
            .map_err(|e| serde::de::Error::custom(format!("bad glob {g:?}: {e}")))?;
    }
    Ok(globs)
}

pub(super) fn de_opt_globs<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    let globs = Vec::<String>::deserialize(d)?;
    for g in &globs {
        glob(g, Separator::Any)
            .map_err(|e| serde::de::Error::custom(format!("bad glob {g:?}: {e}")))?;
    }
    Ok(Some(globs))
}

/// Compiled include/exclude filters of one watch root.
#[derive(Clone)]
pub struct Filter {
    include: GlobSet,
    exclude: GlobSet,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Filter")
    }
}

impl Filter {
    /// Compile the globs of `watch` (already checked while parsing).
    pub fn new(watch: &Watch) -> Filter {
        let build = |globs: &[String]| compile_globs(globs, Separator::Literal);
        Filter {
            include: build(&watch.include),
            exclude: build(&watch.exclude),
        }
    }

    /// Whether a file at `rel` (relative to the root) is to be uploaded.
    pub fn matches(&self, rel: &Path) -> bool {
        self.include.is_match(rel) && !self.exclude.is_match(rel)
    }
}

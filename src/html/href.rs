//! Links between the pages: path segments percent-encoded, and the way from a page to a run
//! or to a run list by its key prefix.

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

/// What must be escaped in one path segment of a relative URL (everything but unreserved
/// characters and a few safe sub-delimiters), so that `#`, `?`, `%` and `:` in a file name
/// stay part of the name.
pub(crate) const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'/')
    .add(b':')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']')
    .add(b'\'');

/// `path`'s segments percent-encoded, for a relative link.
pub(crate) fn encode_path(path: &str) -> String {
    let mut out = String::new();
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.extend(utf8_percent_encode(segment, SEGMENT));
    }
    out
}

/// The link to the run at `key_prefix` (its page), from a page whose way to the store's root
/// is `base` (`/` on `serve`, `../../` from the published fleet page).
pub(crate) fn run_href(base: &str, key_prefix: &str) -> String {
    let encoded: Vec<String> = key_prefix
        .split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect();
    format!("{base}{}/", encoded.join("/"))
}

/// The link to the run list holding the run at `key_prefix`.
pub(crate) fn list_href(base: &str, key_prefix: &str) -> String {
    run_href(base, key_prefix.rsplit_once('/').map_or("", |(p, _)| p))
}

//! The page `serve` answers for a directory holding growing files (files still being written,
//! or whose writer died): each file with its durable size, linked to its durable prefix.

use maud::{DOCTYPE, html};

use crate::html::href::encode_path;

/// The page for the growing files under `prefix`: `(name relative to prefix, durable bytes
/// or `None` when its last segment could not be read)`.
pub(crate) fn page(prefix: &str, files: &[(String, Option<u64>)]) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Growing files under " (prefix) }
            }
            body {
                h1 { "Growing files under " (prefix) }
                p { "Still being written, or their writer stopped before they settled: what is shown is each file's durable prefix, up to the last interval." }
                table {
                    thead { tr { th { "file" } th { "durable bytes" } } }
                    tbody {
                        @for (name, size) in files {
                            tr {
                                td { a href=(encode_path(name)) { (name) } }
                                td {
                                    @match size {
                                        Some(n) => (n),
                                        None => "unreadable",
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    .into_string()
}

//! The pages: HTML views of what `format/` defines, and nothing else (no store, no index, no
//! configuration). Every value from outside is escaped by maud's templates.
//!
//! - [`run_page`]: a sealed run's browsable page (`<run>/_run/index.html`);
//! - [`runs`]: the pages above a run (the runs under a prefix);
//! - [`report`]: the node report and the fleet page;
//! - [`fleet`]: the fleet's test results section;
//! - [`charts`]: inline SVG charts shared by both;
//! - [`href`]: the links between them;
//! - [`growing`]: the files still being written under a prefix, for `serve`.

pub(crate) mod charts;
pub(crate) mod fleet;
pub(crate) mod growing;
pub(crate) mod href;
pub(crate) mod report;
pub(crate) mod run_page;
pub(crate) mod runs;

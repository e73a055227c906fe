//! Object key → restore path: whatever the key, the path stays strictly inside the target.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use panoptic_sync::format::layout::Plan;
use panoptic_sync::restore::safe_target;

fuzz_target!(|data: &[u8]| {
    let Ok(key) = std::str::from_utf8(data) else { return };
    let to = Path::new("/restore/target");
    let (_, logical) = Plan::from_key(key);
    if let Ok(p) = safe_target(to, logical) {
        assert!(p.starts_with(to) && p != to, "{key:?} -> {p:?}");
        let rel = p.strip_prefix(to).unwrap();
        assert!(rel.components().all(|c| matches!(c, Component::Normal(_))), "{key:?}");
    }
});

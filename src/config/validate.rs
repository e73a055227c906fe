//! The checks a parsed configuration must pass before any work starts: every value in range,
//! notifiers well formed, and no two watches sharing a key space.

use super::*;

impl Config {
    /// Every check, in order; the first that fails is the error (`text` locates keys).
    pub(super) fn validate(&self, text: &str) -> Result<(), String> {
        if self.node_id.is_empty() || self.node_id.contains('/') || self.node_id.contains('\\') {
            return Err(format!(
                "node_id {:?} must be non-empty and contain no slashes",
                self.node_id
            ));
        }
        for (i, w) in self.watch.iter().enumerate() {
            let prefix = w.prefix.replace("{node}", &self.node_id);
            if !prefix.is_empty() && object_store::path::Path::parse(&prefix).is_err() {
                return Err(format!(
                    "watch[{i}].prefix {:?} is not a valid object key prefix (no empty, \".\" or \"..\" segments)",
                    w.prefix
                ));
            }
            if w.seal_after.is_some() && w.runs != Runs::Dir {
                return Err(format!(
                    "watch[{i}].seal_after needs runs = \"dir\" on the same watch"
                ));
            }
            if w.tail_interval < Duration::from_millis(100)
                || w.tail_interval > Duration::from_secs(3600)
            {
                return Err(format!(
                    "watch[{i}].tail_interval {:?} must be from 100ms to 1h",
                    w.tail_interval
                ));
            }
            if w.settle > Duration::from_secs(24 * 3600) {
                return Err(format!(
                    "watch[{i}].settle_ms {} is longer than a day",
                    w.settle.as_millis()
                ));
            }
        }
        self.check_key_spaces()?;
        if self.pipeline.encryption == Encryption::Aes256Gcm && self.pipeline.key_file.is_none() {
            return Err("pipeline.key_file is required when encryption = \"aes-256-gcm\"".into());
        }
        if let Some(level) = self.pipeline.level {
            let ok = match self.pipeline.compression {
                Compression::Gzip => (0..=9).contains(&level),
                Compression::Zstd => (1..=22).contains(&level),
                Compression::None => true,
            };
            if !ok {
                return Err(format!(
                    "pipeline.level {level} is out of range for {:?} (gzip 0-9, zstd 1-22)",
                    self.pipeline.compression
                ));
            }
        }
        if self.destination.is_empty() {
            return Err("at least one [[destination]] table is required".into());
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.destination {
            let line = line_of(text, d.span().start);
            let dest = d.get_ref();
            if dest.name.is_empty() || !names.insert(dest.name.clone()) {
                return Err(format!(
                    "destination at line {line}: name {:?} is empty or used twice",
                    dest.name
                ));
            }
            if dest.sync == SyncMode::Batch && !matches!(kind_of(&dest.url), Ok((Kind::Local, _))) {
                return Err(format!(
                    "destination {:?} at line {line}: sync = \"batch\" applies to file:// \
                     destinations only (a cloud store's PUT is durable when acknowledged)",
                    dest.name
                ));
            }
            if let Some(options) = &dest.options {
                let opt_line = line_of(text, options.span().start);
                check_options(&dest.url, options.get_ref()).map_err(|e| {
                    format!(
                        "destination {:?}, options at line {opt_line}: {e}",
                        dest.name
                    )
                })?;
            }
        }
        self.check_notify(text)
    }

    /// Each `[[notify]]` has exactly one of `url` and `command`, headers only with `url`,
    /// and a name of its own.
    fn check_notify(&self, text: &str) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for n in &self.notify {
            let line = line_of(text, n.span().start);
            let notify = n.get_ref();
            let name = notify.name();
            let at = format!("[[notify]] {name:?} at line {line}");
            match (&notify.url, &notify.command) {
                (Some(_), Some(_)) => {
                    return Err(format!("{at}: set either `url` or `command`, not both"));
                }
                (None, None) => {
                    return Err(format!(
                        "{at}: set one of `url` (an HTTP POST) or `command` (a program to run)"
                    ));
                }
                _ => {}
            }
            if let (Some(h), None) = (&notify.headers, &notify.url) {
                return Err(format!(
                    "{at}: `headers` (line {}) only apply to a `url`",
                    line_of(text, h.span().start)
                ));
            }
            if notify.command.is_some() && notify.format != NotifyFormat::Json {
                return Err(format!(
                    "{at}: format = {:?} applies to a `url` only; a `command` always gets the \
                     JSON document on its standard input",
                    notify.format.as_str()
                ));
            }
            if name.is_empty() || name.chars().any(char::is_control) || !names.insert(name) {
                return Err(format!("{at}: name {name:?} is empty or used twice"));
            }
        }
        Ok(())
    }

    /// Watches whose object keys could meet in a destination (every watch goes to every
    /// destination) are refused: equal prefixes, or one prefix inside another (an empty
    /// prefix is inside every other), so no two files ever share a key and `prune` always
    /// knows which watch's retention an object falls under.
    fn check_key_spaces(&self) -> Result<(), String> {
        let prefixes: Vec<String> = self
            .watch
            .iter()
            .map(|w| w.prefix.replace("{node}", &self.node_id))
            .collect();
        let inside = |inner: &str, outer: &str| {
            outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}/"))
        };
        for (i, a) in prefixes.iter().enumerate() {
            let internal = crate::format::layout::INTERNAL_PREFIX;
            if inside(a, internal) {
                return Err(format!(
                    "{} has prefix {a:?}, inside the agent's own {internal:?} prefix",
                    Lines::name(&format!("watch[{i}]"), self.lines.watch.get(i))
                ));
            }
            for (j, b) in prefixes.iter().enumerate().skip(i + 1) {
                if inside(a, b) || inside(b, a) {
                    return Err(format!(
                        "{} and {} could write the same object keys: their prefixes {a:?} and \
                         {b:?} are equal or one lies inside the other; give each watch a prefix \
                         of its own",
                        Lines::name(&format!("watch[{i}]"), self.lines.watch.get(i)),
                        Lines::name(&format!("watch[{j}]"), self.lines.watch.get(j)),
                    ));
                }
            }
        }
        Ok(())
    }
}

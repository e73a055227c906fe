//! The quarantine list: the failing tests a CI job may ignore for a while, one object in the
//! primary (`_panoptic-sync/quarantine.json`, `.enc` when a key is configured), read by `gate`
//! and written by `quarantine add|remove` (the feature is `crate::quarantine`).
//!
//! `{"format": 1, "entries": [{"test", "reason", "expires", "added_by", "added_ms"}]}`: a test is
//! named by its id, `class::name` (the class is the case's `classname`, or its suite's name
//! when it has none: the identity the fleet report uses), and every entry has an expiry, an
//! RFC 3339 UTC time after which it quarantines nothing. The schema is in docs/FORMAT.md.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

pub(crate) use super::layout::QUARANTINE_KEY;
/// The version of the list this build writes and reads.
pub(crate) const QUARANTINE_FORMAT: u32 = 1;
/// A list object larger than this is refused unread (a reader's memory is bounded).
pub(crate) const QUARANTINE_MAX_BYTES: u64 = 8 << 20;
/// Entries a list may hold.
pub(crate) const MAX_ENTRIES: usize = 10_000;
/// Characters of a reason kept.
pub(crate) const MAX_REASON: usize = 500;
/// Bytes of a test id accepted.
pub(crate) const MAX_TEST_ID: usize = 1000;
/// How far ahead an expiry may be: a quarantine is a loan, renewed by adding the entry again.
pub(crate) const MAX_AHEAD_DAYS: i64 = 90;

/// The quarantine list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Quarantine {
    /// [`QUARANTINE_FORMAT`].
    pub format: u32,
    /// One entry per test id, sorted by it.
    pub entries: Vec<Entry>,
}

impl Default for Quarantine {
    fn default() -> Quarantine {
        Quarantine {
            format: QUARANTINE_FORMAT,
            entries: Vec::new(),
        }
    }
}

/// One quarantined test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The test id, `class::name`.
    pub test: String,
    /// Why (a ticket, a note).
    pub reason: String,
    /// When it stops quarantining (RFC 3339, UTC).
    pub expires: DateTime<Utc>,
    /// The node that added it (its `node_id`).
    pub added_by: String,
    /// When it was added, ms since the epoch.
    pub added_ms: i64,
}

impl Entry {
    /// Whether the entry still quarantines its test at `now_ms`.
    pub(crate) fn active(&self, now_ms: i64) -> bool {
        now_ms < self.expires.timestamp_millis()
    }
}

impl Quarantine {
    /// Parse a list's bytes: the format must be this build's, and the caps hold.
    pub(crate) fn parse(body: &[u8]) -> Result<Quarantine, String> {
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        let v: Version =
            serde_json::from_slice(body).map_err(|e| format!("not a quarantine list: {e}"))?;
        if v.format != QUARANTINE_FORMAT {
            return Err(format!(
                "quarantine list format {} is not known to this build (it reads {QUARANTINE_FORMAT})",
                v.format
            ));
        }
        let q: Quarantine = serde_json::from_slice(body)
            .map_err(|e| format!("not a valid quarantine list: {e}"))?;
        if q.entries.len() > MAX_ENTRIES {
            return Err(format!(
                "{} entries, more than the {MAX_ENTRIES} a list may hold",
                q.entries.len()
            ));
        }
        Ok(q)
    }

    /// The list as stored: pretty JSON.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The entry for `test`, if any (expired or not).
    pub(crate) fn get(&self, test: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.test == test)
    }

    /// Add `entry`, replacing any entry for the same test; entries stay sorted by test id.
    pub(crate) fn upsert(&mut self, entry: Entry) {
        self.entries.retain(|e| e.test != entry.test);
        let at = self.entries.partition_point(|e| e.test < entry.test);
        self.entries.insert(at, entry);
    }

    /// Remove the entry for `test`; whether there was one.
    pub(crate) fn remove(&mut self, test: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.test != test);
        self.entries.len() != before
    }
}

/// A test's id: `class::name` (the class is `classname`, or the suite's name without one).
pub(crate) fn test_id(class: &str, name: &str) -> String {
    format!("{class}::{name}")
}

/// An expiry from the command line, at `now_ms`: a date `YYYY-MM-DD` (the entry holds through
/// that day, UTC: it expires at the next midnight) or a duration from now (`14d`, `36h`).
/// It must lie ahead, and at most [`MAX_AHEAD_DAYS`] days ahead.
pub(crate) fn parse_expiry(
    s: &str,
    now_ms: i64,
    duration: impl Fn(&str) -> Result<std::time::Duration, String>,
) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    let max_ms = MAX_AHEAD_DAYS * 86_400_000;
    let too_far = || {
        format!(
            "the expiry {s:?} is more than {MAX_AHEAD_DAYS} days ahead: a quarantine is \
             temporary (add the entry again to extend it)"
        )
    };
    let at = if let Ok(day) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        // A date counts whole: the last day allowed is the one 90 days from now.
        let last = DateTime::from_timestamp_millis(now_ms.saturating_add(max_ms))
            .map(|t| t.date_naive())
            .ok_or_else(too_far)?;
        if day > last {
            return Err(too_far());
        }
        day.succ_opt()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc())
            .ok_or_else(|| format!("bad expiry {s:?}: no such day"))?
    } else {
        let d = duration(s).map_err(|_| {
            format!("bad expiry {s:?}: want a date (YYYY-MM-DD) or a duration (like \"14d\")")
        })?;
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if ms > max_ms {
            return Err(too_far());
        }
        DateTime::from_timestamp_millis(now_ms.saturating_add(ms)).ok_or_else(too_far)?
    };
    if at.timestamp_millis() <= now_ms {
        return Err(format!("the expiry {s:?} is not in the future"));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(s: &str) -> Result<std::time::Duration, String> {
        let n: u64 = s
            .strip_suffix('d')
            .ok_or("no unit")?
            .parse()
            .map_err(|_| "bad")?;
        Ok(std::time::Duration::from_secs(n * 86_400))
    }

    const NOW: i64 = 1_750_000_000_000; // 2025-06-15T15:06:40Z

    #[test]
    fn a_date_holds_through_that_day_and_a_duration_from_now() {
        let at = parse_expiry("2025-06-20", NOW, days).unwrap();
        assert_eq!(at.to_rfc3339(), "2025-06-21T00:00:00+00:00");
        let at = parse_expiry("14d", NOW, days).unwrap();
        assert_eq!(at.timestamp_millis(), NOW + 14 * 86_400_000);
        // Today holds until midnight.
        assert!(parse_expiry("2025-06-15", NOW, days).is_ok());
    }

    #[test]
    fn an_expiry_in_the_past_too_far_ahead_or_unreadable_is_refused() {
        assert!(parse_expiry("2025-06-14", NOW, days).is_err());
        assert!(parse_expiry("0d", NOW, days).is_err());
        assert!(parse_expiry("91d", NOW, days).is_err());
        assert!(parse_expiry("90d", NOW, days).is_ok());
        assert!(parse_expiry("2026-01-01", NOW, days).is_err());
        // 90 days from 2025-06-15 is 2025-09-13.
        assert!(parse_expiry("2025-09-13", NOW, days).is_ok());
        assert!(parse_expiry("2025-09-14", NOW, days).is_err());
        assert!(parse_expiry("soon", NOW, days).is_err());
        assert!(parse_expiry("2025-02-30", NOW, days).is_err());
    }

    #[test]
    fn an_entry_is_active_until_its_expiry() {
        let e = Entry {
            test: test_id("a.B", "c"),
            reason: "r".into(),
            expires: DateTime::from_timestamp_millis(NOW).unwrap(),
            added_by: "n".into(),
            added_ms: 0,
        };
        assert!(e.active(NOW - 1));
        assert!(!e.active(NOW));
    }

    #[test]
    fn the_list_round_trips_and_stays_sorted() {
        let mut q = Quarantine::default();
        for t in ["b::x", "a::y", "b::x"] {
            q.upsert(Entry {
                test: t.into(),
                reason: "r".into(),
                expires: DateTime::from_timestamp_millis(NOW).unwrap(),
                added_by: "n".into(),
                added_ms: 1,
            });
        }
        assert_eq!(q.entries.len(), 2);
        assert_eq!(q.entries[0].test, "a::y");
        let json = q.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains(r#""expires": "2025-06-15T15:06:40Z""#),
            "{text}"
        );
        assert_eq!(Quarantine::parse(&json).unwrap(), q);
        assert!(q.remove("a::y"));
        assert!(!q.remove("a::y"));
    }

    #[test]
    fn another_format_or_a_malformed_list_is_refused() {
        assert!(
            Quarantine::parse(br#"{"format":2,"entries":[]}"#)
                .unwrap_err()
                .contains("format 2")
        );
        assert!(Quarantine::parse(b"[]").is_err());
        assert!(
            Quarantine::parse(br#"{"format":1,"entries":[{"test":"a::b","reason":"","expires":"soon","added_by":"n","added_ms":0}]}"#)
                .is_err()
        );
    }
}

//! Chat messages for a sealed run (`[[notify]] format = "slack" | "teams" | "google-chat"`):
//! the body each service's incoming webhook accepts, built once when the seal queues it.
//!
//! Run names, node names as a job reports them, branches, commits and test names are chosen
//! by CI jobs: hostile input. None of them may become markup in the service that shows it
//! (a link, a mention such as Slack's `<!channel>` or Google Chat's `<users/all>`):
//! - Slack: `&`, `<` and `>` escaped as Slack documents (`&amp;`, `&lt;`, `&gt;`), and every
//!   section `verbatim`, so Slack does not turn bare addresses or names into links either;
//! - Google Chat has no escape: `<` and `>` are shown as `‹` and `›`;
//! - Teams: such text goes only into `TextRun`s, which Adaptive Cards never read as Markdown.
//!
//! Each value is also cut to a bounded length and its control characters (a line break that
//! would forge a line of the message) become spaces. The only link is the run's page, built
//! here from the configured `public_base_url` (http or https) and the percent-encoded key.

use serde_json::{Value, json};

use crate::config::NotifyFormat;
use crate::format::results::TestSummary;

/// Characters kept of a run, node or branch name.
const MAX_NAME: usize = 100;
/// Characters kept of a commit.
const MAX_COMMIT: usize = 40;
/// Characters kept of one failed test's name.
const MAX_TEST: usize = 100;
/// Failed tests listed (all are counted).
pub(crate) const MAX_LISTED: usize = 5;
/// The label of the link to the run's page.
const PAGE_LINK: &str = "Open the run page";

/// What a chat message says about one sealed run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunFacts<'a> {
    /// Run name (hostile).
    pub run: &'a str,
    /// Node that sealed it.
    pub node: &'a str,
    /// The run's test summary, if it had JUnit XML (names in it hostile).
    pub tests: Option<&'a TestSummary>,
    /// Branch, or the tag of a tag build (hostile).
    pub branch: Option<&'a str>,
    /// Commit (hostile).
    pub commit: Option<&'a str>,
    /// The run's page: an http(s) URL from [`page_link`], safe to put in markup as it is.
    pub page_url: Option<&'a str>,
}

/// How a run ended, for a message's headline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Its tests passed ([`crate::format::results::TestCounts::passed_run`]).
    Passed,
    /// It failed ([`failed`]).
    Failed,
    /// No test result to judge by.
    NoTests,
}

impl Verdict {
    /// The verdict of a run with these test results.
    pub(crate) fn of(tests: Option<&TestSummary>) -> Verdict {
        match tests {
            _ if failed(tests) => Verdict::Failed,
            Some(t) if t.passed_run() => Verdict::Passed,
            _ => Verdict::NoTests,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Failed => "failed",
            Verdict::NoTests => "sealed",
        }
    }
}

/// A run that failed, for `only = "failures"` and the headline: a test failed or erred (the
/// run is not a passed run by [`crate::format::results::TestCounts::passed_run`] although it
/// has tests), or a JUnit file could not be read (it may hold failures). A run without JUnit
/// XML, or whose JUnit files hold no test case, has nothing failed to tell.
pub(crate) fn failed(tests: Option<&TestSummary>) -> bool {
    tests.is_some_and(|t| (t.tests > 0 && !t.passed_run()) || !t.unreadable.is_empty())
}

/// The link to a run's page for a chat message: `base` (a `public_base_url`) and the page's
/// stored key, every byte of the key but unreserved ones and `/` percent-encoded, and `|`,
/// `<`, `>`, `"` and spaces of the base too, so the URL cannot end a Slack or Google Chat
/// link early. `None` unless the result is an http or https URL.
pub(crate) fn page_link(base: &str, key: &str) -> Option<String> {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const KEY: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'/');
    let base = base
        .trim_end_matches('/')
        .replace('|', "%7C")
        .replace('<', "%3C")
        .replace('>', "%3E")
        .replace('"', "%22")
        .replace(' ', "%20");
    let link = format!("{base}/{}", utf8_percent_encode(key, KEY));
    let parsed = url::Url::parse(&link).ok()?;
    (matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some()).then_some(link)
}

/// The body for `format`; `None` for the JSON document, which is not built here.
pub(crate) fn body(format: NotifyFormat, facts: &RunFacts<'_>) -> Option<Value> {
    match format {
        NotifyFormat::Json => None,
        NotifyFormat::Slack => Some(slack(facts)),
        NotifyFormat::Teams => Some(teams(facts)),
        NotifyFormat::GoogleChat => Some(google_chat(facts)),
    }
}

/// What a chat message of a test's change of state says: a headline and facts (label, value),
/// every value as written by some job (escaped here per service).
pub(crate) struct EventFacts<'a> {
    /// `Test became flaky`, `Test broken`, `Test fixed`, `Quarantine expiring`.
    pub headline: &'a str,
    /// The test id.
    pub test: &'a str,
    /// Further facts: branch, commit, run, reason, expiry.
    pub facts: Vec<(&'static str, String)>,
    /// The run's page, when anyone can open it.
    pub page_url: Option<&'a str>,
}

/// The chat message of a test event for `format` (`None` for the JSON document).
pub(crate) fn event_body(format: NotifyFormat, e: &EventFacts<'_>) -> Option<Value> {
    let line = |esc: fn(&str) -> String| -> String {
        let mut text = esc(&clip(e.test, MAX_TEST));
        for (label, value) in &e.facts {
            text.push_str(&format!("\n{label}: {}", esc(&clip(value, MAX_TEST))));
        }
        text
    };
    match format {
        NotifyFormat::Json => None,
        NotifyFormat::Slack => {
            let mut blocks = vec![slack_section(format!(
                "*{}*\n{}",
                e.headline,
                line(slack_escape)
            ))];
            if let Some(url) = e.page_url {
                blocks.push(slack_section(format!(
                    "<{}|{PAGE_LINK}>",
                    slack_escape(url)
                )));
            }
            Some(json!({
                "text": format!("{}: {}", e.headline, slack_escape(&clip(e.test, MAX_TEST))),
                "blocks": blocks,
            }))
        }
        NotifyFormat::GoogleChat => {
            let mut text = format!("*{}*\n{}", e.headline, line(chat_escape));
            if let Some(url) = e.page_url {
                text.push_str(&format!("\n<{url}|{PAGE_LINK}>"));
            }
            Some(json!({ "text": text }))
        }
        NotifyFormat::Teams => {
            let mut body = vec![
                json!({"type": "TextBlock", "text": e.headline, "weight": "Bolder",
                       "size": "Medium", "wrap": true}),
                teams_fact("Test", &clip(e.test, MAX_TEST)),
            ];
            for (label, value) in &e.facts {
                body.push(teams_fact(label, &clip(value, MAX_TEST)));
            }
            let mut card = json!({
                "type": "AdaptiveCard",
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "version": "1.2",
                "body": body,
            });
            if let Some(url) = e.page_url {
                card["actions"] =
                    json!([{ "type": "Action.OpenUrl", "title": PAGE_LINK, "url": url }]);
            }
            Some(json!({
                "type": "message",
                "attachments": [{
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": null,
                    "content": card,
                }],
            }))
        }
    }
}

/// `s` cut to `max` characters (an ellipsis marks the cut), control characters as spaces.
fn clip(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// The text of a message, before any service's escaping: each part plain, hostile values
/// already clipped.
struct Lines {
    verdict: Verdict,
    run: String,
    node: String,
    /// `12 tests: …`, or why there is none.
    tests: String,
    branch: Option<String>,
    commit: Option<String>,
    /// The first failed tests, `class::name`.
    failures: Vec<String>,
    /// Failures not listed.
    more: u64,
}

impl Lines {
    fn of(f: &RunFacts<'_>) -> Lines {
        let (tests, failures, more) = match f.tests {
            Some(t) => {
                let listed: Vec<String> = t
                    .failures
                    .iter()
                    .take(MAX_LISTED)
                    .map(|x| clip(&format!("{}::{}", x.class, x.name), MAX_TEST))
                    .collect();
                let failing = t.failed.saturating_add(t.errors);
                let more = failing.saturating_sub(listed.len() as u64);
                (t.counts_line(), listed, more)
            }
            None => ("no JUnit XML".to_string(), Vec::new(), 0),
        };
        Lines {
            verdict: Verdict::of(f.tests),
            run: clip(f.run, MAX_NAME),
            node: clip(f.node, MAX_NAME),
            tests,
            branch: f.branch.map(|b| clip(b, MAX_NAME)),
            commit: f.commit.map(|c| clip(c, MAX_COMMIT)),
            failures,
            more,
        }
    }

    /// `Run r1 on n1 failed`, with `esc` applied to the names.
    fn headline(&self, esc: impl Fn(&str) -> String) -> String {
        format!(
            "Run {} on {} {}",
            esc(&self.run),
            esc(&self.node),
            self.verdict.word()
        )
    }

    /// `branch main, commit 0123abcd`, or `None` when neither is known.
    fn source(&self, esc: impl Fn(&str) -> String) -> Option<String> {
        let parts: Vec<String> = [("branch", &self.branch), ("commit", &self.commit)]
            .into_iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| format!("{k} {}", esc(v))))
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// `… and N more`, when failures were left out of the list.
    fn more_line(&self) -> Option<String> {
        (self.more > 0).then(|| format!("… and {} more", self.more))
    }
}

/// Slack's escape for text it reads as mrkdwn.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A Slack mrkdwn section that Slack does not pre-process (no automatic links or mentions).
fn slack_section(text: String) -> Value {
    json!({ "type": "section", "text": { "type": "mrkdwn", "text": text, "verbatim": true } })
}

/// A Slack incoming-webhook message: `text` (the notification's fallback) and `blocks`: a
/// section with the headline, test counts and source, one listing failed tests when any
/// failed, one with the link to the run's page when there is one.
pub(crate) fn slack(f: &RunFacts<'_>) -> Value {
    let l = Lines::of(f);
    let emoji = match l.verdict {
        Verdict::Passed => ":white_check_mark:",
        Verdict::Failed => ":x:",
        Verdict::NoTests => ":package:",
    };
    let mut main = format!(
        "{emoji} *{}*\n{}",
        l.headline(slack_escape),
        slack_escape(&l.tests)
    );
    if let Some(source) = l.source(slack_escape) {
        main.push('\n');
        main.push_str(&source);
    }
    let mut blocks = vec![slack_section(main)];
    if !l.failures.is_empty() {
        let mut text = String::from("*Failed tests*");
        for t in &l.failures {
            text.push_str("\n• ");
            text.push_str(&slack_escape(t));
        }
        if let Some(more) = l.more_line() {
            text.push('\n');
            text.push_str(&more);
        }
        blocks.push(slack_section(text));
    }
    if let Some(url) = f.page_url {
        blocks.push(slack_section(format!(
            "<{}|{PAGE_LINK}>",
            slack_escape(url)
        )));
    }
    json!({
        "text": format!("{}: {}", l.headline(slack_escape), slack_escape(&l.tests)),
        "blocks": blocks,
    })
}

/// Google Chat reads `<…>` as a link or mention and documents no escape for it.
fn chat_escape(s: &str) -> String {
    s.replace('<', "‹").replace('>', "›")
}

/// A Google Chat incoming-webhook message: `{"text": …}` in Chat's markup, the same lines as
/// Slack's, the page as `<url|Open the run page>`.
pub(crate) fn google_chat(f: &RunFacts<'_>) -> Value {
    let l = Lines::of(f);
    let mut text = format!("*{}*\n{}", l.headline(chat_escape), chat_escape(&l.tests));
    if let Some(source) = l.source(chat_escape) {
        text.push('\n');
        text.push_str(&source);
    }
    if !l.failures.is_empty() {
        text.push_str("\nFailed tests:");
        for t in &l.failures {
            text.push_str("\n• ");
            text.push_str(&chat_escape(t));
        }
        if let Some(more) = l.more_line() {
            text.push('\n');
            text.push_str(&more);
        }
    }
    if let Some(url) = f.page_url {
        text.push_str(&format!("\n<{url}|{PAGE_LINK}>"));
    }
    json!({ "text": text })
}

/// A `RichTextBlock` of plain `TextRun`s: a bold `label`, then `value` as it is (a `TextRun`
/// is never read as Markdown).
fn teams_fact(label: &str, value: &str) -> Value {
    json!({
        "type": "RichTextBlock",
        "inlines": [
            { "type": "TextRun", "text": format!("{label}: "), "weight": "Bolder" },
            { "type": "TextRun", "text": value },
        ],
    })
}

/// A Microsoft Teams message (incoming webhook, or a Workflows "when a webhook request is
/// received" flow): `{"type": "message", "attachments": [{"contentType":
/// "application/vnd.microsoft.card.adaptive", "contentUrl": null, "content": <card>}]}`; the
/// card (Adaptive Cards 1.2) has a coloured headline, one line per fact, the failed tests
/// (a line each), and an `Action.OpenUrl` to the run's page when there is one.
pub(crate) fn teams(f: &RunFacts<'_>) -> Value {
    let l = Lines::of(f);
    let (headline, color) = match l.verdict {
        Verdict::Passed => ("Run passed", "Good"),
        Verdict::Failed => ("Run failed", "Attention"),
        Verdict::NoTests => ("Run sealed", "Default"),
    };
    let mut body = vec![
        json!({
            "type": "TextBlock",
            "text": headline,
            "weight": "Bolder",
            "size": "Medium",
            "color": color,
            "wrap": true,
        }),
        teams_fact("Run", &l.run),
        teams_fact("Node", &l.node),
        teams_fact("Tests", &l.tests),
    ];
    if let Some(b) = &l.branch {
        body.push(teams_fact("Branch", b));
    }
    if let Some(c) = &l.commit {
        body.push(teams_fact("Commit", c));
    }
    if !l.failures.is_empty() {
        body.push(json!({ "type": "TextBlock", "text": "Failed tests", "weight": "Bolder" }));
        let lines = l.failures.iter().map(|t| format!("• {t}"));
        for line in lines.chain(l.more_line()) {
            body.push(json!({
                "type": "RichTextBlock",
                "inlines": [{ "type": "TextRun", "text": line }],
            }));
        }
    }
    let mut card = json!({
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.2",
        "body": body,
    });
    if let Some(url) = f.page_url {
        card["actions"] = json!([{ "type": "Action.OpenUrl", "title": PAGE_LINK, "url": url }]);
    }
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": card,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::results::{BadFile, Failure, Outcome};

    fn failing() -> TestSummary {
        TestSummary {
            tests: 9,
            passed: 2,
            failed: 6,
            errors: 1,
            failures: (0..7)
                .map(|i| Failure {
                    class: "c".into(),
                    name: if i == 0 {
                        "<!here> t&1".into()
                    } else {
                        format!("t{i}")
                    },
                    outcome: Outcome::Failed,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn facts<'a>(run: &'a str, tests: Option<&'a TestSummary>) -> RunFacts<'a> {
        RunFacts {
            run,
            node: "n1",
            tests,
            branch: Some("main"),
            commit: Some("0123abcd"),
            page_url: Some("https://cdn.example/b/n1/r1/index.html"),
        }
    }

    #[test]
    fn a_failed_run_is_one_with_a_failure_an_error_or_an_unreadable_file() {
        assert!(!failed(None));
        let passed = TestSummary {
            tests: 2,
            passed: 2,
            ..Default::default()
        };
        assert!(!failed(Some(&passed)));
        assert!(!failed(Some(&TestSummary::default())), "no test case");
        assert!(failed(Some(&failing())));
        let errored = TestSummary {
            tests: 1,
            errors: 1,
            ..Default::default()
        };
        assert!(failed(Some(&errored)));
        let unreadable = TestSummary {
            unreadable: vec![BadFile {
                path: "junit.xml".into(),
                error: "not XML".into(),
            }],
            ..passed.clone()
        };
        assert!(failed(Some(&unreadable)));
        assert_eq!(Verdict::of(Some(&passed)), Verdict::Passed);
        assert_eq!(Verdict::of(Some(&unreadable)), Verdict::Failed);
        assert_eq!(Verdict::of(None), Verdict::NoTests);
    }

    #[test]
    fn slack_escapes_what_it_reads_as_markup_and_never_pre_processes() {
        let t = failing();
        let v = slack(&facts(
            "<!channel> x & <https://evil.example|click>",
            Some(&t),
        ));
        let blocks = v["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 3, "{v:#}");
        for b in blocks {
            assert_eq!(b["type"], "section");
            assert_eq!(b["text"]["type"], "mrkdwn");
            assert_eq!(b["text"]["verbatim"], true);
        }
        let main = blocks[0]["text"]["text"].as_str().unwrap();
        assert_eq!(
            main,
            ":x: *Run &lt;!channel&gt; x &amp; &lt;https://evil.example|click&gt; on n1 failed*\n\
             9 tests: 2 passed, 6 failed, 1 errors, 0 skipped\nbranch main, commit 0123abcd"
        );
        let list = blocks[1]["text"]["text"].as_str().unwrap();
        assert_eq!(
            list,
            "*Failed tests*\n• c::&lt;!here&gt; t&amp;1\n• c::t1\n• c::t2\n• c::t3\n• c::t4\n… and 2 more"
        );
        assert_eq!(
            blocks[2]["text"]["text"],
            "<https://cdn.example/b/n1/r1/index.html|Open the run page>"
        );
        let text = v["text"].as_str().unwrap();
        assert!(text.starts_with("Run &lt;!channel&gt; x &amp;"), "{text}");
        // No `<` in the whole message but the one link's.
        let all = v.to_string();
        assert_eq!(all.matches('<').count(), 1, "{all}");
    }

    #[test]
    fn names_are_clipped_and_lose_their_line_breaks() {
        let long = format!("a\nb{}", "x".repeat(300));
        let v = slack(&RunFacts {
            page_url: None,
            branch: None,
            commit: None,
            ..facts(&long, None)
        });
        let blocks = v["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 1, "no failures, no link: {v:#}");
        let main = blocks[0]["text"]["text"].as_str().unwrap();
        let first = main.lines().next().unwrap();
        assert!(first.starts_with(":package: *Run a bxxx"), "{main}");
        assert!(first.contains("x… on n1 sealed*"), "{main}");
        assert_eq!(main.lines().nth(1), Some("no JUnit XML"));
        assert_eq!(main.lines().count(), 2, "{main}");
    }

    #[test]
    fn google_chat_gets_text_without_angle_brackets_from_names() {
        let t = failing();
        let v = google_chat(&facts("<users/all> x", Some(&t)));
        assert_eq!(v.as_object().unwrap().len(), 1, "{v:#}");
        let text = v["text"].as_str().unwrap();
        assert_eq!(
            text,
            "*Run ‹users/all› x on n1 failed*\n\
             9 tests: 2 passed, 6 failed, 1 errors, 0 skipped\nbranch main, commit 0123abcd\n\
             Failed tests:\n• c::‹!here› t&1\n• c::t1\n• c::t2\n• c::t3\n• c::t4\n… and 2 more\n\
             <https://cdn.example/b/n1/r1/index.html|Open the run page>"
        );
    }

    #[test]
    fn teams_gets_an_adaptive_card_with_names_only_in_text_runs() {
        let passed = TestSummary {
            tests: 2,
            passed: 2,
            ..Default::default()
        };
        let v = teams(&facts(
            "[x](https://evil.example) <at>all</at>",
            Some(&passed),
        ));
        assert_eq!(v["type"], "message");
        let att = v["attachments"].as_array().unwrap();
        assert_eq!(att.len(), 1);
        assert_eq!(
            att[0]["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert!(att[0]["contentUrl"].is_null());
        let card = &att[0]["content"];
        assert_eq!(card["type"], "AdaptiveCard");
        assert_eq!(card["version"], "1.2");
        let body = card["body"].as_array().unwrap();
        assert_eq!(body[0]["type"], "TextBlock");
        assert_eq!(body[0]["text"], "Run passed");
        assert_eq!(body[0]["color"], "Good");
        let facts: Vec<(String, String)> = body[1..]
            .iter()
            .map(|b| {
                assert_eq!(b["type"], "RichTextBlock");
                let runs = b["inlines"].as_array().unwrap();
                assert!(runs.iter().all(|r| r["type"] == "TextRun"));
                (
                    runs[0]["text"].as_str().unwrap().to_string(),
                    runs[1]["text"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let want = [
            ("Run: ", "[x](https://evil.example) <at>all</at>"),
            ("Node: ", "n1"),
            (
                "Tests: ",
                "2 tests: 2 passed, 0 failed, 0 errors, 0 skipped",
            ),
            ("Branch: ", "main"),
            ("Commit: ", "0123abcd"),
        ];
        assert_eq!(
            facts,
            want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
        );
        assert_eq!(
            card["actions"],
            json!([{
                "type": "Action.OpenUrl",
                "title": "Open the run page",
                "url": "https://cdn.example/b/n1/r1/index.html"
            }])
        );
    }

    #[test]
    fn the_page_link_is_encoded_and_only_http() {
        assert_eq!(
            page_link(
                "https://cdn.example/b/",
                "n1/<!channel> a|b&c#d?/index.html"
            )
            .as_deref(),
            Some("https://cdn.example/b/n1/%3C%21channel%3E%20a%7Cb%26c%23d%3F/index.html")
        );
        assert_eq!(
            page_link("https://cdn.example/a|b>", "k").as_deref(),
            Some("https://cdn.example/a%7Cb%3E/k")
        );
        assert_eq!(page_link("file:///srv/x", "k"), None);
        assert_eq!(page_link("not a url", "k"), None);
    }

    #[test]
    fn json_is_not_built_here() {
        let f = facts("r", None);
        assert!(body(NotifyFormat::Json, &f).is_none());
        for format in [
            NotifyFormat::Slack,
            NotifyFormat::Teams,
            NotifyFormat::GoogleChat,
        ] {
            assert!(body(format, &f).is_some());
        }
    }
}

#[cfg(test)]
mod event_tests {
    use super::*;

    #[test]
    fn a_test_event_reads_as_each_service_wants_and_escapes_names() {
        let e = EventFacts {
            headline: "Test broken",
            test: "cart::<b>checkout</b>",
            facts: vec![("Branch", "main".into())],
            page_url: Some("https://cdn.example/b/run/index.html"),
        };
        assert!(event_body(NotifyFormat::Json, &e).is_none());
        let slack = event_body(NotifyFormat::Slack, &e).unwrap();
        assert_eq!(
            slack["text"],
            "Test broken: cart::&lt;b&gt;checkout&lt;/b&gt;"
        );
        assert_eq!(slack["blocks"].as_array().unwrap().len(), 2);
        let chat = event_body(NotifyFormat::GoogleChat, &e).unwrap();
        assert!(
            chat["text"]
                .as_str()
                .unwrap()
                .contains("cart::‹b›checkout‹/b›\nBranch: main")
        );
        let teams = event_body(NotifyFormat::Teams, &e).unwrap();
        let card = &teams["attachments"][0]["content"];
        assert_eq!(card["type"], "AdaptiveCard");
        assert_eq!(
            card["actions"][0]["url"],
            "https://cdn.example/b/run/index.html"
        );
    }
}

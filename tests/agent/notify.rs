//! Notifications of sealed runs (`[[notify]]`): a loopback webhook receiver (a small HTTP
//! server on its own thread that records every request and answers 500 to the first N) gets
//! exactly one successful POST per seal, through 500 answers, and when the daemon is killed
//! with -9 between the seal and the send; a `command` notifier runs exactly once per seal;
//! bad entries are refused with exit 2 naming the key and line. `status`, `runs --json` and
//! the metrics count what was sent.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::core::assert_ok;
use crate::util::*;

/// A secret in the URL's path and one in a header: neither may appear in any output or log.
const PATH_SECRET: &str = "T0KEN-in-path";
const HEADER_SECRET: &str = "s3cret-header-value";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    /// What it answered.
    pub status: u16,
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: serde_json::Value,
}

/// A webhook receiver on 127.0.0.1: records each POST and answers 500 to the first
/// `fail_first` requests, 200 after.
pub struct Receiver {
    port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    pub fn start(port: u16, fail_first: usize) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = AtomicUsize::new(0);
        let thread = {
            let (hits, stop) = (hits.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let status = if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                        500
                    } else {
                        200
                    };
                    if let Some(hit) = serve(conn, status) {
                        hits.lock().unwrap().push(hit);
                    }
                }
            })
        };
        Receiver {
            port,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/{PATH_SECRET}", self.port)
    }

    /// A URL of this receiver ending in `/path`.
    pub fn url_for(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The requests answered 200.
    pub fn delivered(&self) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.status == 200)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Read one HTTP/1.1 request from `conn`, answer `status` and close.
fn serve(conn: TcpStream, status: u16) -> Option<Hit> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    let reason = if status == 200 {
        "OK"
    } else {
        "Internal Server Error"
    };
    let mut conn = conn;
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = conn.flush();
    assert_eq!(method, "POST");
    Some(Hit {
        status,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap(),
    })
}

fn notify_env(tail: &str) -> Env {
    let mut env = Env::new();
    env.watch_extra = "runs = \"dir\"\n".into();
    env.tail = tail.to_string();
    env
}

fn webhook(url: &str) -> String {
    format!(
        "[[notify]]\nname = \"hook\"\nurl = \"{url}\"\nheaders = {{ Authorization = \"Bearer {HEADER_SECRET}\" }}\ntimeout = \"5s\"\n"
    )
}

/// Three files of a run; returns their total size.
fn write_run(env: &Env, run: &str) -> u64 {
    let files: [(String, Vec<u8>); 3] = [
        (
            format!("{run}/logs/test.log"),
            format!("{run} ok\n").repeat(300).into_bytes(),
        ),
        (
            format!("{run}/junit.xml"),
            b"<testsuite name=\"unit\"><testcase classname=\"c\" name=\"t\" time=\"0.5\"/></testsuite>"
                .to_vec(),
        ),
        (format!("{run}/shots/a.png"), vec![7u8; 20_000]),
    ];
    let mut bytes = 0;
    for (rel, data) in &files {
        env.write(rel, data);
        bytes += data.len() as u64;
    }
    bytes
}

/// `seal` on a blocking thread.
async fn seal(env: &Env, run: &str) -> Output {
    let dir = env.watch.join(run);
    cli_async(env, &["seal", dir.to_str().unwrap(), "--timeout", "90s"]).await
}

fn notifications(env: &Env) -> serde_json::Value {
    env.status()["notifications"].clone()
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [PATH_SECRET, HEADER_SECRET] {
        assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
    }
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_post_per_seal_through_a_receiver_that_answers_500_twice() {
    let receiver = Receiver::start(0, 2);
    let mut env = notify_env(&webhook(&receiver.url()));
    env.cmd_env = vec![
        ("GITHUB_ACTIONS".into(), "true".into()),
        ("GITHUB_REPOSITORY".into(), "acme/widgets".into()),
        ("GITHUB_SHA".into(), "0123abcd".into()),
    ];
    let mut daemon = env.spawn_run();
    let bytes = write_run(&env, "r1");
    let out = seal(&env, "r1").await;
    assert_ok(&out, "seal r1");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("notify hook: sent"),
        "{}",
        output_text(&out)
    );
    // Two 500s, then one delivery, all of the same notification.
    let hits = receiver.hits();
    let statuses: Vec<u16> = hits.iter().map(|h| h.status).collect();
    assert_eq!(statuses, vec![500, 500, 200], "{hits:#?}");
    let key = hits[0].headers["idempotency-key"].clone();
    assert!(hits.iter().all(|h| h.headers["idempotency-key"] == key));
    let hit = &hits[2];
    assert_eq!(hit.path, format!("/hooks/{PATH_SECRET}"));
    assert_eq!(
        hit.headers["authorization"],
        format!("Bearer {HEADER_SECRET}")
    );
    assert_eq!(hit.headers["content-type"], "application/json");
    let doc = &hit.body;
    assert_eq!(doc["format"], 1);
    assert_eq!(doc["event"], "run.sealed");
    assert_eq!(doc["id"], key.as_str());
    assert_eq!(doc["notifier"], "hook");
    assert_eq!(doc["run"], "r1");
    assert_eq!(doc["node"], NODE);
    assert_eq!(doc["prefix"], format!("ci/{NODE}"));
    assert_eq!(doc["files"], 3);
    assert_eq!(doc["bytes"], bytes);
    assert_eq!(
        doc["manifest_key"],
        format!("ci/{NODE}/r1/_run/manifest.json")
    );
    assert_eq!(doc["destinations"], serde_json::json!(["primary", "nas"]));
    assert_eq!(doc["ci"]["provider"], "github-actions");
    assert_eq!(doc["ci"]["repository"], "acme/widgets");
    assert!(doc["page_url"].is_null());
    // The run's test summary, as in the manifest.
    assert_eq!(
        (
            doc["tests"]["tests"].as_u64(),
            doc["tests"]["passed"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(doc["tests"]["files"], serde_json::json!(["junit.xml"]));
    // Never before every destination holds the manifest (and so every file).
    assert!(
        env.nas
            .join(format!("ci/{NODE}/r1/_run/manifest.json"))
            .exists()
    );

    // A second seal: one more POST, with a key of its own.
    write_run(&env, "r2");
    let out = seal(&env, "r2").await;
    assert_ok(&out, "seal r2");
    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 2, "{delivered:#?}");
    assert_eq!(delivered[1].body["run"], "r2");
    assert_ne!(delivered[1].headers["idempotency-key"], key);

    // Both recorded as sent: nothing is left for the daemon to send again.
    let n = notifications(&env);
    assert_eq!(
        (n["sent"].as_u64(), n["pending"].as_u64()),
        (Some(2), Some(0)),
        "{n}"
    );
    let runs = env.cli(&["runs", "--json"]);
    assert_ok(&runs, "runs --json");
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let r1 = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "r1")
        .unwrap();
    assert_eq!(r1["notifications"][0]["name"], "hook");
    assert_eq!(r1["notifications"][0]["state"], "sent");
    assert_eq!(r1["notifications"][0]["attempts"], 2);
    assert_eq!(receiver.hits().len(), 4);

    assert!(daemon.terminate().await.success());
    let log = std::fs::read_to_string(env.tmp.path().join("daemon.log")).unwrap();
    assert_no_secret("the daemon's log", &log);
    assert_no_secret("seal", &output_text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_queued_before_a_kill_9_is_sent_once_after_restart() {
    // The receiver's port is closed while the run is sealed: `seal` records the seal and its
    // notification, fails to send it and leaves it to the daemon, which is killed with -9.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hooks/{PATH_SECRET}");
    let metrics = free_port();
    let env = notify_env(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
        webhook(&url)
    ));
    let daemon = env.spawn_run();
    write_run(&env, "r1");
    let out = seal(&env, "r1").await;
    assert_ok(&out, "seal r1 (sealed even though the receiver is down)");
    let text = output_text(&out);
    assert!(text.contains("notify hook: not delivered yet"), "{text}");
    assert_no_secret("seal", &text);
    let n = notifications(&env);
    assert_eq!(
        (n["pending"].as_u64(), n["failing"].as_u64()),
        (Some(1), Some(1)),
        "{n}"
    );
    assert!(n["last_error"].as_str().is_some(), "{n}");
    assert_no_secret("status", &n.to_string());
    // SAFETY: killing our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGKILL) };
    drop(daemon);

    // The receiver comes up, answering 500 once; the restarted daemon retries with backoff.
    let receiver = Receiver::start(port, 1);
    let mut daemon = env.spawn_run();
    wait_until(
        Duration::from_secs(120),
        "one delivery after the restart",
        || !receiver.delivered().is_empty(),
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the delivery recorded as sent",
        || notifications(&env)["sent"] == 1,
    )
    .await;
    let n = notifications(&env);
    assert_eq!(n["pending"], 0, "{n}");
    // Recorded as sent, so nothing can be sent again: exactly one delivery, and every
    // request was the same notification.
    let hits = receiver.hits();
    let statuses: Vec<u16> = hits.iter().map(|h| h.status).collect();
    assert_eq!(statuses, vec![500, 200], "{hits:#?}");
    assert_eq!(hits[1].body["run"], "r1");
    assert_eq!(
        hits[0].headers["idempotency-key"],
        hits[1].headers["idempotency-key"]
    );
    // The restarted daemon's attempts: one failed, one sent; nothing pending.
    let (code, body) = http_get(&format!("http://127.0.0.1:{metrics}/metrics"));
    assert_eq!(code, 200, "{body}");
    let m = parse_metrics(&body);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in:\n{body}"));
    assert_eq!(
        get("panoptic_sync_notifications_total{result=\"sent\"}"),
        1.0
    );
    assert_eq!(
        get("panoptic_sync_notifications_total{result=\"failed\"}"),
        1.0
    );
    assert_eq!(get("panoptic_sync_notifications_pending"), 0.0);
    // Reproduced: the counters were absent until their first increment, and nothing counted
    // deliveries made by `seal` itself. The index's count covers every sender.
    assert_eq!(
        get("panoptic_sync_notifications_total{result=\"given_up\"}"),
        0.0
    );
    assert_eq!(get("panoptic_sync_notifications_sent"), 1.0);
    assert!(daemon.terminate().await.success());
    let log = std::fs::read_to_string(env.tmp.path().join("daemon.log")).unwrap();
    // The daemon sent it: once answered 500 and retried, then delivered.
    assert!(
        log.contains("run notification failed; it will be retried")
            && log.contains("run notification sent"),
        "{log}"
    );
    assert_no_secret("the daemon's log", &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_notifier_runs_once_per_seal_with_its_placeholders() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    // The test's own program appends its arguments and its standard input as one line.
    let script = format!(
        "import json, sys; open({:?}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'stdin': sys.stdin.read()}}) + '\\n')",
        record.display().to_string()
    );
    let tail = format!(
        "[[notify]]\ncommand = [\"python3\", \"-c\", {}, \"{{run}}\", \"{{manifest}}\", \"on {{node}}\"]\n",
        toml_string(&script)
    );
    // No daemon: `seal` syncs by itself and runs the command.
    let env = notify_env(&tail);
    write_run(&env, "r1");
    write_run(&env, "r2");
    for run in ["r1", "r2"] {
        let out = seal(&env, run).await;
        assert_ok(&out, &format!("seal {run}"));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("notify notify-1: sent"),
            "{}",
            output_text(&out)
        );
    }
    let calls: Vec<serde_json::Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    for (call, run) in calls.iter().zip(["r1", "r2"]) {
        assert_eq!(
            call["argv"],
            serde_json::json!([
                run,
                format!("ci/{NODE}/{run}/_run/manifest.json"),
                format!("on {NODE}")
            ])
        );
        let doc: serde_json::Value = serde_json::from_str(call["stdin"].as_str().unwrap()).unwrap();
        assert_eq!(
            (doc["run"].as_str(), doc["files"].as_u64()),
            (Some(run), Some(3))
        );
        assert_eq!(doc["notifier"], "notify-1");
    }
    let n = notifications(&env);
    assert_eq!(
        (n["sent"].as_u64(), n["pending"].as_u64()),
        (Some(2), Some(0)),
        "{n}"
    );
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[test]
fn notify_entries_with_both_or_neither_target_exit_2_naming_the_keys() {
    let env = Env::new();
    let base = env.config_text();
    let line = base.lines().count() + 1;
    let cases = [
        (
            "[[notify]]\nurl = \"https://hooks.example/x\"\ncommand = [\"true\"]\n",
            "not both",
        ),
        (
            "[[notify]]\nname = \"lonely\"\ntimeout = \"5s\"\n",
            "one of `url`",
        ),
        // A chat message is for a webhook; a command always gets the JSON document.
        (
            "[[notify]]\nname = \"cmd\"\ncommand = [\"true\"]\nformat = \"slack\"\n",
            "applies to a `url` only",
        ),
    ];
    for (entry, want) in cases {
        let path = env.tmp.path().join("bad.toml");
        std::fs::write(&path, format!("{base}\n{entry}")).unwrap();
        let out = check_config(&path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{entry}: {err}");
        assert!(
            err.contains(want)
                && err.contains("`url`")
                && err.contains("`command`")
                && err.contains(&format!("line {}", line + 1)),
            "{entry}: {err}"
        );
    }
    // A placeholder that does not exist is named with its key's line.
    let path = env.tmp.path().join("bad.toml");
    std::fs::write(
        &path,
        format!("{base}\n[[notify]]\ncommand = [\"echo\", \"{{run_id}}\"]\n"),
    )
    .unwrap();
    let out = check_config(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("{run_id}")
            && err.contains("command")
            && err.contains(&format!("line {}", line + 2)),
        "{err}"
    );
}

fn check_config(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
        .arg("--config")
        .arg(path)
        .args(["check-config", "--offline"])
        .output()
        .unwrap()
}

/// The run's page as a chat message links it: the public base, then the key percent-encoded.
const CDN: &str = "https://cdn.example/runs";

/// A primary S3 table like the default one, with a `public_base_url`.
fn primary_with_public_base(env: &Env) -> String {
    format!(
        "[[destination]]\nname = \"primary\"\nurl = \"s3://{}/base\"\npublic_base_url = \"{CDN}/\"\noptions = {{ endpoint = \"{}\", allow_http = \"true\", access_key_id = \"{}\", secret_access_key = \"{}\", region = \"us-east-1\", metadata_endpoint = \"http://127.0.0.1:9\" }}\n",
        env.bucket, env.s3_endpoint, env.s3_key, env.s3_secret
    )
}

/// A run whose JUnit file has one passed and one failed test case.
fn write_failing_run(env: &Env, run: &str) {
    env.write(&format!("{run}/logs/test.log"), b"boom\n");
    env.write(
        &format!("{run}/junit.xml"),
        b"<testsuite name=\"unit\"><testcase classname=\"c\" name=\"ok\"/>\
          <testcase classname=\"c\" name=\"&lt;!here&gt; breaks\"><failure message=\"no\"/></testcase></testsuite>",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_format_posts_the_body_its_service_takes_and_a_hostile_run_name_stays_text() {
    let receiver = Receiver::start(0, 0);
    let tail: String = ["json", "slack", "teams", "google-chat"]
        .iter()
        .map(|f| {
            format!(
                "[[notify]]\nname = \"{f}\"\nurl = \"{}\"\nformat = \"{f}\"\ntimeout = \"5s\"\n",
                receiver.url_for(f)
            )
        })
        .collect();
    let mut env = notify_env(&tail);
    env.primary = Some(primary_with_public_base(&env));
    env.cmd_env = vec![
        ("GITHUB_ACTIONS".into(), "true".into()),
        ("GITHUB_REF_TYPE".into(), "branch".into()),
        ("GITHUB_REF_NAME".into(), "feat/<@U1>".into()),
        ("GITHUB_SHA".into(), "0123abcd".into()),
    ];
    // Chosen by the CI job: a Slack broadcast, were it not escaped.
    let run = "<!channel> x";
    write_run(&env, run);
    let out = seal(&env, run).await;
    assert_ok(&out, "seal");
    let hits = receiver.delivered();
    assert_eq!(hits.len(), 4, "{hits:#?}");
    let by_path: BTreeMap<String, Hit> = hits.into_iter().map(|h| (h.path.clone(), h)).collect();
    for h in by_path.values() {
        assert_eq!(h.headers["content-type"], "application/json");
        assert_eq!(h.headers["idempotency-key"].len(), 32);
    }
    let page = format!("{CDN}/ci/{NODE}/%3C%21channel%3E%20x/index.html");

    // json: today's document, unchanged.
    let doc = &by_path["/json"].body;
    assert_eq!(
        (doc["format"].as_u64(), doc["run"].as_str()),
        (Some(1), Some(run))
    );
    assert_eq!(doc["page_key"], format!("ci/{NODE}/{run}/index.html"));

    // slack: `text` and `blocks`, every section verbatim mrkdwn, names escaped.
    let slack = &by_path["/slack"].body;
    let keys: Vec<&String> = slack.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["blocks", "text"]);
    assert_eq!(
        slack["text"],
        format!(
            "Run &lt;!channel&gt; x on {NODE} passed: 1 tests: 1 passed, 0 failed, 0 errors, 0 skipped"
        )
    );
    let section = |text: String| serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": text, "verbatim": true}});
    assert_eq!(
        slack["blocks"],
        serde_json::json!([
            section(format!(
                ":white_check_mark: *Run &lt;!channel&gt; x on {NODE} passed*\n\
                 1 tests: 1 passed, 0 failed, 0 errors, 0 skipped\n\
                 branch feat/&lt;@U1&gt;, commit 0123abcd"
            )),
            section(format!("<{page}|Open the run page>")),
        ])
    );
    // The only `<` Slack gets opens the link it was meant to.
    assert_eq!(slack.to_string().matches('<').count(), 1, "{slack:#}");

    // teams: an Adaptive Card in a message; names only in plain TextRuns.
    let teams = &by_path["/teams"].body;
    assert_eq!(teams["type"], "message");
    let attachments = teams["attachments"].as_array().unwrap();
    assert_eq!(attachments.len(), 1);
    assert_eq!(
        attachments[0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    let card = &attachments[0]["content"];
    assert_eq!(
        (card["type"].as_str(), card["version"].as_str()),
        (Some("AdaptiveCard"), Some("1.2"))
    );
    assert_eq!(card["body"][0]["text"], "Run passed");
    assert_eq!(
        card["body"][1],
        serde_json::json!({"type": "RichTextBlock", "inlines": [
            {"type": "TextRun", "text": "Run: ", "weight": "Bolder"},
            {"type": "TextRun", "text": run},
        ]})
    );
    assert_eq!(
        card["actions"],
        serde_json::json!([{"type": "Action.OpenUrl", "title": "Open the run page", "url": page}])
    );

    // google-chat: `{"text": …}`; Chat has no escape, so no `<` of a name reaches it.
    let chat = &by_path["/google-chat"].body;
    assert_eq!(chat.as_object().unwrap().len(), 1, "{chat:#}");
    assert_eq!(
        chat["text"],
        format!(
            "*Run ‹!channel› x on {NODE} passed*\n1 tests: 1 passed, 0 failed, 0 errors, 0 skipped\n\
             branch feat/‹@U1›, commit 0123abcd\n<{page}|Open the run page>"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_failures_notifies_a_failing_run_and_not_a_passing_one() {
    let receiver = Receiver::start(0, 0);
    let env = notify_env(&format!(
        "[[notify]]\nname = \"failures\"\nurl = \"{}\"\nonly = \"failures\"\nformat = \"slack\"\ntimeout = \"5s\"\n",
        receiver.url_for("failures")
    ));
    // Passed: nothing queued, and `seal` says why.
    write_run(&env, "r1-passed");
    let out = seal(&env, "r1-passed").await;
    assert_ok(&out, "seal r1-passed");
    let text = output_text(&out);
    assert!(
        text.contains("notify failures: not sent (only = \"failures\", and the run did not fail)"),
        "{text}"
    );
    // Failed: sent. Nothing before it may arrive, so it must be the only request.
    write_failing_run(&env, "r2-failed");
    let out = seal(&env, "r2-failed").await;
    assert_ok(&out, "seal r2-failed");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("notify failures: sent"),
        "{}",
        output_text(&out)
    );
    wait_until(Duration::from_secs(30), "the failing run's message", || {
        !receiver.delivered().is_empty()
    })
    .await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1, "{hits:#?}");
    let main = hits[0].body["blocks"][0]["text"]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        main.starts_with(&format!(
            ":x: *Run r2-failed on {NODE} failed*\n2 tests: 1 passed, 1 failed"
        )),
        "{main}"
    );
    assert_eq!(
        hits[0].body["blocks"][1]["text"]["text"],
        "*Failed tests*\n• c::&lt;!here&gt; breaks"
    );
    // The index holds one notification, sent; none for the passed run.
    let n = notifications(&env);
    assert_eq!(
        (n["sent"].as_u64(), n["pending"].as_u64()),
        (Some(1), Some(0)),
        "{n}"
    );
}

#[test]
fn check_config_online_names_a_missing_command_and_a_closed_port() {
    let receiver = Receiver::start(0, 0);
    let closed = free_port();
    let mut env = notify_env("");
    env.tail = format!(
        "[[notify]]\nname = \"gone\"\ncommand = [\"/nonexistent/announce-run\", \"{{run}}\"]\n\
         [[notify]]\nname = \"here\"\ncommand = [\"true\"]\n\
         [[notify]]\nname = \"closed\"\nurl = \"http://127.0.0.1:{closed}/hooks/{PATH_SECRET}\"\n\
         [[notify]]\nname = \"open\"\nurl = \"{}\"\n",
        receiver.url()
    );
    let out = env.cli(&["check-config"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr
            .contains("[[notify]] \"gone\": command \"/nonexistent/announce-run\" does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "[[notify]] \"closed\": cannot connect to webhook host 127.0.0.1 port {closed}"
        )),
        "{stderr}"
    );
    assert!(
        stdout.contains("[[notify]] \"here\": command \"true\" is executable"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[[notify]] \"open\": webhook host 127.0.0.1 port"),
        "{stdout}"
    );
    assert!(!stdout.contains("configuration is valid"), "{stdout}");
    assert_no_secret("check-config", &output_text(&out));
    // Connected to, never sent a request.
    assert!(receiver.hits().is_empty(), "{:#?}", receiver.hits());
    // Offline, nothing is looked at: valid.
    let out = env.cli(&["check-config", "--offline"]);
    assert_ok(&out, "check-config --offline");
}

/// A run on `main` at `commit` whose JUnit file holds `cart::checkout` (failing or passing)
/// and `cart::adds` (passed on a retry when `retried`).
fn write_state_run(env: &Env, run: &str, checkout_fails: bool, retried: bool) {
    let checkout = if checkout_fails {
        r#"<testcase classname="cart" name="checkout" time="1"><failure message="total 0"/></testcase>"#
    } else {
        r#"<testcase classname="cart" name="checkout" time="1"/>"#
    };
    let adds = if retried {
        r#"<testcase classname="cart" name="adds" time="1"><flakyFailure message="timeout"/></testcase>"#
    } else {
        r#"<testcase classname="cart" name="adds" time="1"/>"#
    };
    env.write(
        &format!("{run}/junit.xml"),
        format!(r#"<testsuite name="unit">{checkout}{adds}</testsuite>"#).as_bytes(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_becoming_broken_fixed_or_flaky_and_an_expiring_quarantine_are_announced_once() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("events.jsonl");
    let script = format!(
        "import sys; open({:?}, 'a').write(sys.stdin.read().replace('\\n', ' ') + '\\n')",
        record.display().to_string()
    );
    let tail = format!(
        "[[notify]]\nname = \"states\"\ncommand = [\"python3\", \"-c\", {}]\n\
         events = [\"test.flaky\", \"test.broken\", \"test.fixed\", \"quarantine.expiring\"]\n",
        toml_string(&script)
    );
    let mut env = notify_env(&tail);
    let events = || -> Vec<(String, String, String)> {
        std::fs::read_to_string(&record)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["format"], 1, "{v}");
                let at = v["change"]["commit"].as_str().unwrap_or("").to_string();
                (
                    v["event"].as_str().unwrap().to_string(),
                    v["test"].as_str().unwrap().to_string(),
                    at,
                )
            })
            .collect()
    };
    let s = |x: &str| x.to_string();
    // (run, commit, checkout fails, adds passed on a retry, the events its seal announces)
    #[allow(clippy::type_complexity)]
    let steps: [(&str, &str, bool, bool, Vec<(String, String, String)>); 9] = [
        ("r1", "c1", false, false, vec![]),
        ("r2", "c2", true, false, vec![]),
        ("r3", "c3", true, false, vec![]),
        (
            "r4",
            "c4",
            true,
            false,
            vec![(s("test.broken"), s("cart::checkout"), s("c4"))],
        ),
        ("r5", "c5", true, false, vec![]),
        (
            "r6",
            "c6",
            false,
            false,
            vec![(s("test.fixed"), s("cart::checkout"), s("c6"))],
        ),
        // The same commit again: fixed already announced.
        ("r7", "c6", false, false, vec![]),
        (
            "r8",
            "c7",
            false,
            true,
            vec![(s("test.flaky"), s("cart::adds"), s("c7"))],
        ),
        ("r9", "c8", false, true, vec![]),
    ];
    let mut want = Vec::new();
    for (run, commit, fails, retried, announced) in steps {
        write_state_run(&env, run, fails, retried);
        env.cmd_env = crate::results::push_env("main", commit, "unit");
        assert_ok(&seal(&env, run).await, run);
        want.extend(announced);
        assert_eq!(events(), want, "after {run}");
    }
    // A quarantine entry expiring tomorrow is announced by the next seal, and only once.
    env.cmd_env.clear();
    assert_ok(
        &env.cli(&[
            "quarantine",
            "add",
            "cart::adds",
            "--reason",
            "TICKET-1",
            "--expires",
            "1d",
        ]),
        "quarantine add",
    );
    for run in ["r10", "r11"] {
        write_state_run(&env, run, false, false);
        env.cmd_env = crate::results::push_env("main", "c9", "unit");
        assert_ok(&seal(&env, run).await, run);
    }
    let all = events();
    let expiring: Vec<&(String, String, String)> = all
        .iter()
        .filter(|e| e.0 == "quarantine.expiring")
        .collect();
    assert_eq!(expiring.len(), 1, "{all:?}");
    assert_eq!(expiring[0].1, "cart::adds");
    // The run.sealed document is not sent to an entry that did not ask for it.
    assert!(
        !std::fs::read_to_string(&record)
            .unwrap()
            .contains("run.sealed")
    );
}

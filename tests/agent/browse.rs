//! Browsing runs: `serve` over an encrypted `file://` store, looked at in headless Chromium
//! (tests/browse.py drives the system's Chromium with Playwright), and the objects of a plain
//! store carrying what a browser needs to show them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::core::assert_ok;
use crate::util::*;

const TOKEN: &str = "test-token-0123456789abcdef";
/// A line no object may show in the clear.
const MARKER: &str = "PLAINTEXT-MARKER-7f3a";

fn push_env(branch: &str) -> Vec<(String, String)> {
    [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_REPOSITORY", "acme/widgets"),
        ("GITHUB_REF", &format!("refs/heads/{branch}")),
        ("GITHUB_REF_NAME", branch),
        ("GITHUB_REF_TYPE", "branch"),
        ("GITHUB_SHA", "0123456789abcdef0123456789abcdef01234567"),
        ("GITHUB_SERVER_URL", "https://github.com"),
        ("GITHUB_RUN_ID", "9001"),
        ("GITHUB_JOB", "integration"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn write_browsable_run(env: &Env, run: &str) -> Vec<u8> {
    let mut log = String::new();
    for i in 0..120_000 {
        log.push_str(&format!("{i:06} {MARKER} a line of the test's log\n"));
    }
    env.write(&format!("{run}/logs/test.log"), log.as_bytes());
    env.write(
        &format!("{run}/report/index.html"),
        b"<!DOCTYPE html><html><head><meta name=viewport content='width=device-width'></head><body><h1>report</h1></body></html>",
    );
    // A real PNG (1x1), previewed on the page.
    let png: &[u8] = &[
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d, 0x49, 0x48, 0x44, 0x52, 0,
        0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0, 0x1f, 0x15, 0xc4, 0x89, 0, 0, 0, 0x0d, 0x49, 0x44,
        0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0, 0x1f, 0, 5, 0, 1, 0xff, 0x89, 0x99,
        0x3d, 0x1d, 0, 0, 0, 0, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    env.write(&format!("{run}/shots/a.png"), png);
    env.write(
        &format!("{run}/junit.xml"),
        format!(
            r#"<testsuite name="s"><testcase classname="c" name="ok" time="0.1"/><testcase classname="c" name="a very long test name that goes on {}"><failure message="boom">trace</failure></testcase></testsuite>"#,
            "and on ".repeat(40)
        )
        .as_bytes(),
    );
    log.into_bytes()
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    tree(dir)
        .into_iter()
        .filter(|(_, d)| d.windows(needle.len()).any(|w| w == needle))
        .map(|(p, _)| p)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_run_is_browsed_through_serve_in_chromium() {
    let mut env = Env::new();
    env.watch_extra = "runs = \"dir\"\n".into();
    let key = env.keygen("key");
    env.pipeline = format!(
        "[pipeline]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nkey_file = \"{}\"\n",
        key.display()
    );
    env.cmd_env = push_env("main");
    let log = write_browsable_run(&env, "r1");
    let dir = env.watch.join("r1");
    assert_ok(
        &env.cli(&["seal", dir.to_str().unwrap(), "--timeout", "90s"]),
        "seal",
    );
    assert!(
        files_containing(&env.nas, MARKER.as_bytes()).is_empty(),
        "the store holds ciphertext only"
    );

    let token_file = env.tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let tmp = env.tmp.path().join("serve-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _serve = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(env.config_path())
            .args([
                "serve",
                "--from",
                "nas",
                "--listen",
                &listen,
                "--token-file",
            ])
            .arg(&token_file)
            .env("TMPDIR", &tmp)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.tmp.path().join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port, Duration::from_secs(30));
    let base = format!("http://{listen}");
    let run = format!("/ci/{NODE}/r1/");

    // No token, a wrong token: 401.
    assert_eq!(http_get(&format!("{base}{run}")).0, 401);
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let mut body = out.stdout;
        let at = body.iter().rposition(|&b| b == b'\n').unwrap();
        let code: u16 = String::from_utf8_lossy(&body[at + 1..]).parse().unwrap();
        body.truncate(at);
        (code, body)
    };
    let auth = format!("Authorization: Bearer {TOKEN}");
    let wrong = "Authorization: Bearer not-the-token-at-all".to_string();
    assert_eq!(curl(&["-H", &wrong, &format!("{base}{run}")]).0, 401);

    // A range of the large log: exactly those bytes, 206.
    let (code, body) = curl(&[
        "-H",
        &auth,
        "-H",
        "Range: bytes=1000000-1000099",
        &format!("{base}{run}logs/test.log"),
    ]);
    assert_eq!(code, 206);
    assert_eq!(body, &log[1_000_000..1_000_100]);
    // The whole log, byte-identical.
    let (code, body) = curl(&["-H", &auth, &format!("{base}{run}logs/test.log")]);
    assert_eq!(code, 200);
    assert!(body == log, "the served log differs");
    // /latest/main leads to the run; the node's list names it.
    let (code, _) = curl(&["-H", &auth, &format!("{base}/latest/main")]);
    assert_eq!(code, 302);
    let (code, list) = curl(&["-H", &auth, &format!("{base}/ci/{NODE}/")]);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&list).contains("href=\"r1/\""));

    // Chromium: the run page, the node's runs and the fleet page at 1280 and 390 px, every
    // link on them followed.
    let out_json = env.tmp.path().join("browse.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browse.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([&format!("{base}/"), TOKEN])
        .arg(&out_json)
        .args([run.as_str(), &format!("/ci/{NODE}/"), "/"])
        .env("TMPDIR", env.tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "browse.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    assert_eq!(b["failed"], serde_json::json!([]), "failed requests: {b:#}");
    for (page, info) in b["pages"].as_object().unwrap() {
        assert_eq!(info["status"], 200, "{page}");
        assert!(
            info["scrollWidth"].as_u64() <= info["innerWidth"].as_u64(),
            "{page} overflows: {info}"
        );
        assert_eq!(info["viewportMeta"], true, "{page}");
        assert_eq!(info["emptySections"], 0, "{page}");
        for img in info["images"].as_array().unwrap() {
            assert_eq!(img["ok"], true, "{page}: {img}");
        }
    }
    let links = b["links"].as_object().unwrap();
    let log_link = links
        .iter()
        .find(|(k, _)| k.ends_with("/logs/test.log"))
        .expect("the run page links the log");
    assert_eq!(log_link.1["shown_as"], "text/plain", "{log_link:?}");
    assert!(log_link.1["text_length"].as_u64().unwrap() >= log.len() as u64 - 1000);
    for (link, rec) in links {
        assert_eq!(rec["status"], 200, "{link}: {rec}");
    }
    assert!(links.keys().any(|k| k.ends_with("/report/index.html")));
    assert!(links.keys().any(|k| k.ends_with("/junit.xml")));

    // A damaged object never completes: the response breaks (curl sees a short body).
    let object = env.nas.join(format!("ci/{NODE}/r1/logs/test.log.zst.enc"));
    let mut bytes = std::fs::read(&object).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "-",
            "-H",
            &auth,
            &format!("{base}{run}logs/test.log"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "curl completed a damaged object");
    assert!(
        out.stdout.len() < log.len(),
        "the last bytes were held back"
    );

    // Nothing in the clear on disk: not in the store, not in the gateway's temporary directory.
    assert!(files_containing(&env.nas, MARKER.as_bytes()).is_empty());
    assert!(files_containing(&tmp, MARKER.as_bytes()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_zstd_log_on_s3_says_it_is_text_and_how_it_is_encoded() {
    let mut env = Env::new();
    env.watch_extra = "runs = \"dir\"\n".into();
    env.pipeline = "[pipeline]\ncompression = \"zstd\"\n".into();
    env.cmd_env = push_env("release/2.x");
    write_browsable_run(&env, "r1");
    let dir = env.watch.join("r1");
    assert_ok(
        &env.cli(&["seal", dir.to_str().unwrap(), "--timeout", "90s"]),
        "seal",
    );
    let s3 = shared_s3();
    let key = format!("base/ci/{NODE}/r1/logs/test.log.zst");
    let head = s3.head(&env.bucket, &key);
    assert!(
        head["ContentType"]
            .as_str()
            .unwrap()
            .starts_with("text/plain"),
        "{head}"
    );
    assert_eq!(head["ContentEncoding"], "zstd", "{head}");

    // The pages above the run, for static hosting: the node's run list and the branch's
    // latest page, both linking to the run.
    let dump = env.tmp.path().join("dump");
    s3.dump(&env.bucket, &format!("base/ci/{NODE}/"), &dump);
    let list = std::fs::read_to_string(dump.join(format!("base/ci/{NODE}/index.html"))).unwrap();
    assert!(list.contains("href=\"r1/\""), "{list}");
    assert!(list.contains("release/2.x"), "the branch is listed: {list}");
    let latest = std::fs::read_to_string(dump.join(format!(
        "base/ci/{NODE}/_panoptic-sync/latest/release/2.x/index.html"
    )))
    .unwrap();
    // Four directories down: _panoptic-sync/latest/release/2.x.
    assert!(latest.contains("href=\"../../../../r1/\""), "{latest}");
    let head = s3.head(&env.bucket, &format!("base/ci/{NODE}/index.html"));
    assert!(
        head["ContentType"]
            .as_str()
            .unwrap()
            .starts_with("text/html"),
        "{head}"
    );
    // A file the tree holds where those pages go is not uploaded over them.
    env.write("index.html", b"<h1>forged list</h1>");
    env.write("_panoptic-sync/latest/release/2.x/index.html", b"forged");
    assert_ok(&env.cli(&["sync"]), "sync");
    let again = s3.dump(&env.bucket, &format!("base/ci/{NODE}/"), &dump);
    assert!(
        !std::fs::read_to_string(dump.join(format!("base/ci/{NODE}/index.html")))
            .unwrap()
            .contains("forged")
    );
    assert!(again.contains_key(&format!("base/ci/{NODE}/index.html")));
}

fn junit(a_fails: bool, b_fails: bool) -> String {
    let case = |name: &str, fails: bool| {
        if fails {
            format!(
                r#"<testcase classname="c" name="{name}" time="0.1"><failure message="{name} broke">first line of {name}
  at frame one
  at frame two</failure></testcase>"#
            )
        } else {
            format!(r#"<testcase classname="c" name="{name}" time="0.1"/>"#)
        }
    };
    format!(
        r#"<testsuite name="s">{}{}<testcase classname="c" name="R" time="0.1"><flakyFailure message="once"/></testcase></testsuite>"#,
        case("A", a_fails),
        case("B", b_fails)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_requests_page_separates_new_failures_and_the_fleet_page_links_flaky_tests() {
    let mut env = Env::new();
    env.watch_extra = "runs = \"dir\"\n".into();
    env.pipeline = "[pipeline]\ncompression = \"zstd\"\n".into();
    let seal = |env: &Env, run: &str| {
        let dir = env.watch.join(run);
        assert_ok(
            &env.cli(&["seal", dir.to_str().unwrap(), "--timeout", "90s"]),
            &format!("seal {run}"),
        );
    };
    // main, one commit, twice: A fails, then passes (a flake); B passes.
    env.cmd_env = push_env("main");
    env.write("m1/junit.xml", junit(true, false).as_bytes());
    seal(&env, "m1");
    env.write("m2/junit.xml", junit(false, false).as_bytes());
    seal(&env, "m2");
    env.write("m3/junit.xml", junit(true, false).as_bytes());
    seal(&env, "m3");
    // A pull request into main: A fails (as on main's newest run), B fails (new).
    env.cmd_env = push_env("feature/x")
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "GITHUB_SHA" => (k, "feedfacefeedfacefeedfacefeedfacefeedface".into()),
            "GITHUB_REF" => (k, "refs/pull/7/merge".into()),
            _ => (k, v),
        })
        .chain([
            ("GITHUB_HEAD_REF".to_string(), "feature/x".to_string()),
            ("GITHUB_BASE_REF".to_string(), "main".to_string()),
        ])
        .collect();
    env.write("pr/junit.xml", junit(true, true).as_bytes());
    seal(&env, "pr");

    let page = std::fs::read_to_string(env.nas.join(format!("ci/{NODE}/pr/index.html"))).unwrap();
    let new_at = page.find("New failures (1)").expect(&page);
    let already_at = page.find("Already failing on main (1)").expect(&page);
    let b_at = page[new_at..]
        .find("c::B")
        .map(|i| i + new_at)
        .expect(&page);
    let a_at = page[already_at..]
        .find("c::A")
        .map(|i| i + already_at)
        .expect(&page);
    assert!(
        new_at < b_at && b_at < already_at && already_at < a_at,
        "{page}"
    );
    // The base branch's run is linked, from the page up to the store's root.
    assert!(
        page.contains("href=\"../../../ci/test-node/m3/\""),
        "{page}"
    );
    // A is a known flake (failed and passed on main's commit); retried tests are named;
    // the trace is folded under its first line.
    assert!(
        page.contains("known flaky: failed and passed on 1 commit<"),
        "{page}"
    );
    assert!(
        page.contains("Passed on retry") && page.contains("c::R"),
        "{page}"
    );
    assert!(
        page.contains("<details><summary>B broke</summary><pre>first line of B\n  at frame one"),
        "{page}"
    );

    // The fleet page, published to the primary, links the flaky test to a run where it failed.
    assert_ok(
        &env.cli(&["report", "--fleet", "--publish"]),
        "report --fleet --publish",
    );
    let dump = env.tmp.path().join("dump");
    shared_s3().dump(&env.bucket, "base/_panoptic-sync/fleet/", &dump);
    let fleet = std::fs::read_to_string(dump.join("base/_panoptic-sync/fleet/index.html")).unwrap();
    let flaky_at = fleet.find("Flaky tests").expect(&fleet);
    let row = &fleet[flaky_at..];
    assert!(
        row.contains("<a href=\"../../ci/test-node/pr/\">c::A</a>"),
        "the flaky test links to the newest run where it failed: {fleet}"
    );
    assert!(
        fleet.contains("<a href=\"../../ci/test-node/\">test-node</a>"),
        "the node links to its run list: {fleet}"
    );

    // The node report and the fleet page as files, in Chromium: no overflow at 1280 or
    // 390 px, a viewport meta tag, no empty section.
    let pages = env.tmp.path().join("pages");
    std::fs::create_dir_all(&pages).unwrap();
    let node_html = pages.join("node.html");
    let fleet_html = pages.join("fleet.html");
    assert_ok(
        &env.cli(&["report", "--html", node_html.to_str().unwrap()]),
        "report --html",
    );
    assert_ok(
        &env.cli(&["report", "--fleet", "--html", fleet_html.to_str().unwrap()]),
        "report --fleet --html",
    );
    let out_json = env.tmp.path().join("browse.json");
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browse.py"))
        .arg(format!("file://{}/", pages.display()))
        .arg("-")
        .arg(&out_json)
        .args(["node.html", "fleet.html"])
        .env("TMPDIR", env.tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "browse.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    for (page, info) in b["pages"].as_object().unwrap() {
        assert!(
            info["scrollWidth"].as_u64() <= info["innerWidth"].as_u64(),
            "{page} overflows: {info}"
        );
        assert_eq!(info["viewportMeta"], true, "{page}");
        assert_eq!(info["emptySections"], 0, "{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_without_a_watch_finds_any_nodes_run() {
    // Reproduced: `restore --run` and `report --run` found only this node's runs, and a
    // config without a [[watch]] (a laptop that only reads) was refused.
    let mut env = Env::new();
    env.watch_extra = "runs = \"dir\"\n".into();
    env.cmd_env = push_env("main");
    let log = write_browsable_run(&env, "r1");
    let dir = env.watch.join("r1");
    assert_ok(
        &env.cli(&["seal", dir.to_str().unwrap(), "--timeout", "90s"]),
        "seal",
    );
    // The reader: same destinations, another node id, another state directory, no watch.
    let text = env.config_text();
    let (head, rest) = text.split_once("[[watch]]").unwrap();
    let rest = &rest[rest.find("[[destination]]").unwrap()..];
    let reader = format!("{head}{rest}")
        .replace(&format!("node_id = \"{NODE}\""), "node_id = \"laptop\"")
        .replace(
            &env.state.display().to_string(),
            &env.tmp.path().join("reader-state").display().to_string(),
        );
    assert!(!reader.contains("[[watch]]"));
    let path = env.tmp.path().join("reader.toml");
    std::fs::write(&path, reader).unwrap();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap()
    };
    assert_ok(&cli(&["check-config", "--offline"]), "check-config");
    let out = cli(&["runs", "--fleet", "--json"]);
    assert_ok(&out, "runs --fleet");
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs[0]["node"], NODE, "{runs}");
    assert_eq!(runs[0]["run"], "r1", "{runs}");
    assert_eq!(runs[0]["branch"], "main", "{runs}");
    let to = env.tmp.path().join("restored");
    let out = cli(&[
        "restore",
        "--run",
        &format!("{NODE}/r1"),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_ok(&out, "restore --run NODE/RUN");
    assert_eq!(std::fs::read(to.join("logs/test.log")).unwrap(), log);
    assert_eq!(tree(&to), tree(&dir));
    let out = cli(&["report", "--run", &format!("{NODE}/r1"), "--json"]);
    assert_ok(&out, "report --run NODE/RUN");
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["run"], "r1");
    // `url NODE/RUN`: the run's page, presigned.
    let out = cli(&["url", &format!("{NODE}/r1")]);
    assert_ok(&out, "url NODE/RUN");
    let link = String::from_utf8_lossy(&out.stdout);
    assert!(
        link.contains(&format!("ci/{NODE}/r1/index.html")) && link.contains("X-Amz-Signature"),
        "{link}"
    );
    // What works on trees says why it cannot.
    let out = cli(&["sync"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a [[watch]]"));
}

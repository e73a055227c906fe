//! Operating a fleet: local cleanup only after every destination holds a file, remote
//! retention limited to this node's objects, reports, the fleet view and metrics.

use std::time::Duration;

use crate::core::assert_ok;
use crate::util::*;

fn local_files(env: &Env) -> usize {
    tree(&env.watch).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_are_deleted_only_once_every_destination_holds_them() {
    let port = free_port();
    let secret = "backup-secret";
    let mut env = Env::new();
    let s3 = shared_s3();
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"s3://{b}/base\"\noptions = {{ endpoint = \"{e}\", allow_http = \"true\", access_key_id = \"{k}\", secret_access_key = \"{s}\", region = \"us-east-1\", metadata_endpoint = \"http://127.0.0.1:9\" }}\n\n[[destination]]\nname = \"backup\"\nurl = \"s3://{b}/backup\"\noptions = {{ endpoint = \"http://127.0.0.1:{port}\", allow_http = \"true\", access_key_id = \"{KEY}\", secret_access_key = \"{secret}\", region = \"us-east-1\", metadata_endpoint = \"http://127.0.0.1:9\" }}\n",
        b = env.bucket,
        e = s3.endpoint,
        k = s3.key,
        s = s3.secret,
    ));
    env.tail = "[retention]\nlocal_delete_after_upload = true\n".into();
    let daemon = Daemon::start(env.config());
    for i in 0..10 {
        env.write(&format!("run/{i}.log"), format!("result {i}").as_bytes());
    }
    let expected = env.expected();
    wait_until(
        Duration::from_secs(60),
        "primary and nas hold everything, backup failing",
        || {
            let s = env.status();
            s["destinations"][0]["done"] == 10
                && s["destinations"][2]["done"] == 10
                && s["destinations"][1]["failing"].as_u64() > Some(0)
        },
    )
    .await;
    // Cleanup passes run every few seconds; watch over more than one of them.
    tokio::time::sleep(panoptic_sync::cleanup::INTERVAL * 2).await;
    assert_eq!(
        local_files(&env),
        10,
        "a file was deleted before the backup had it"
    );
    assert_eq!(env.status()["awaiting_all_destinations"], 10);

    let backup = S3::spawn_with_secret(port, secret);
    backup.create_bucket(&env.bucket);
    wait_until(Duration::from_secs(180), "every local file deleted", || {
        local_files(&env) == 0
    })
    .await;
    daemon.stop().await.unwrap();
    assert_eq!(env.s3_objects(s3), expected);
    let in_backup: std::collections::BTreeMap<String, String> = backup
        .objects(&env.bucket, "backup/")
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("backup/").to_string(), v))
        .collect();
    assert_eq!(in_backup, expected);
    assert_eq!(env.nas_objects(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_only_this_nodes_expired_objects() {
    let mut env = Env::new();
    for i in 0..5 {
        env.write(&format!("old/{i}.log"), format!("old {i}").as_bytes());
    }
    assert_ok(&env.cli(&["sync"]), "sync");
    let s3 = shared_s3();
    s3.put_raw(
        &env.bucket,
        "base/ci/other-node/theirs.log",
        b"another node's",
    );
    env.tail = "[retention]\nremote_max_age = \"1s\"\n".into();
    // Wait until our objects are older than the limit (the dry run lists them).
    wait_until(Duration::from_secs(30), "objects older than 1 s", || {
        let out = env.cli(&["prune", "--dry-run"]);
        String::from_utf8_lossy(&out.stdout).contains("10 objects would be deleted")
    })
    .await;
    assert_eq!(env.s3_objects(s3).len(), 6, "the dry run deleted something");
    assert_eq!(env.nas_objects().len(), 5);

    let out = env.cli(&["prune"]);
    assert_ok(&out, "prune");
    let left = env.s3_objects(s3);
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        vec!["ci/other-node/theirs.log"],
        "only another node's object may remain"
    );
    assert!(env.nas_objects().is_empty());
    // The node status object is never pruned.
    let all = s3.objects(&env.bucket, "base/_panoptic-sync/nodes/");
    assert!(all.contains_key(&format!("base/_panoptic-sync/nodes/{NODE}.json")));
    // Unchanged local files are not uploaded again.
    let out = env.cli(&["sync"]);
    assert_ok(&out, "sync after prune");
    assert!(String::from_utf8_lossy(&out.stdout).contains("primary: 0 stored, 0 missing"));
    assert_eq!(env.s3_objects(s3).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_have_the_numbers_and_the_fleet_view_shows_every_node() {
    let a = Env::new();
    for i in 0..20 {
        a.write(
            &format!("logs/{i}.log"),
            format!("INFO line {i}\n").repeat(8000).as_bytes(),
        );
    }
    // The same bytes, mode and mtime: a copy keeps the source's metadata, so only files that
    // agree on all three are copied (files written back to back share an mtime only when the
    // kernel's coarse clock did not tick between them, which made this test flaky).
    for i in 0..4 {
        let p = a.watch.join(format!("dup/{i}/same.png"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_preserved(&p, b"the same screenshot bytes", 1_700_000_000);
    }
    assert_ok(&a.cli(&["sync"]), "sync a");
    // A second node sharing the same bucket.
    let mut b = Env::new();
    b.bucket = a.bucket.clone();
    b.node = "other-node".into();
    b.write("x.txt", b"from the other node");
    assert_ok(&b.cli(&["sync"]), "sync b");

    let out = a.cli(&["report", "--json"]);
    assert_ok(&out, "report --json");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let primary = &r["destinations"][0];
    assert_eq!(primary["name"], "primary");
    assert_eq!(primary["usage"]["objects"], 24);
    assert_eq!(primary["by_type"]["log"]["objects"], 20);
    assert!(primary["dedup_saved_bytes"].as_u64() >= Some(3 * 25));
    assert_eq!(primary["backlog"][0], 0);
    let recs = r["recommendations"].as_array().unwrap();
    assert!(
        recs.iter()
            .any(|x| x.as_str().unwrap().contains("enable compression")),
        "{recs:?}"
    );

    let html = a.tmp.path().join("report.html");
    assert_ok(
        &a.cli(&["report", "--html", html.to_str().unwrap()]),
        "report --html",
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains(NODE));
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "must be self-contained"
    );
    // It renders in headless Chromium (scripts/test installs it), charts included.
    let shot = a.tmp.path().join("report.png");
    chromium(
        &a.tmp.path().join("chromium"),
        &[
            format!("--screenshot={}", shot.display()),
            format!("file://{}", html.display()),
        ],
    );
    // Text and bars take far more than a blank page.
    assert_screenshot_has_content(&shot, 20_000);

    let out = a.cli(&["report", "--fleet", "--json"]);
    assert_ok(&out, "report --fleet");
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: Vec<&str> = f["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, vec!["other-node", NODE]);
    assert_eq!(f["totals"]["files"], 25);
    let text = String::from_utf8_lossy(&a.cli(&["report", "--fleet"]).stdout).to_string();
    assert!(
        text.contains("other-node") && text.contains("fleet: 2 nodes"),
        "{text}"
    );
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A status object written straight into the bucket, as another node (of any version) would.
fn plant_status(env: &Env, name: &str, json: &str) {
    shared_s3().put_raw(
        &env.bucket,
        &format!("base/_panoptic-sync/nodes/{name}"),
        json.as_bytes(),
    );
}

fn fleet_json(env: &Env) -> serde_json::Value {
    let out = env.cli(&["report", "--fleet", "--json"]);
    assert_ok(&out, "report --fleet --json");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fleet_node<'a>(f: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    f["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == id)
        .unwrap_or_else(|| panic!("no node {id:?} in {f:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_objects_of_other_versions_read_each_other() {
    let env = Env::new();
    let now = now_secs();
    // A newer node: a field this version does not know, at the top and in a destination.
    plant_status(
        &env,
        "newer-node.json",
        &format!(
            r#"{{"format": 3, "node_id": "newer-node", "version": "9.0.0", "last_seen": {now},
                "files": 5, "bytes": 50, "success_rate": 0.5, "gpu_temperature": {{"c": 71}},
                "destinations": [{{"name": "primary", "done": 1, "pending": 2, "failing": 3,
                                   "failed_permanently": 0, "queue_age": 9}}]}}"#
        ),
    );
    // An older or smaller writer: optional fields missing.
    plant_status(
        &env,
        "sparse-node.json",
        &format!(r#"{{"format": 2, "node_id": "sparse-node", "last_seen": {now}, "files": 7}}"#),
    );
    // Format 1 (before this change): destinations as positional arrays, no `format`.
    plant_status(
        &env,
        "v1-node.json",
        &format!(
            r#"{{"node_id": "v1-node", "version": "0.1.0", "last_seen": {now}, "files": 11,
                "bytes": 110, "destinations": [["primary", 4, 1, 1, 0]],
                "oldest_pending_secs": null, "last_error": null, "success_rate": 0.8}}"#
        ),
    );
    // Totals never wrap, whatever a node publishes.
    plant_status(
        &env,
        "huge-counts.json",
        &format!(
            r#"{{"format": 2, "node_id": "huge-counts", "last_seen": {now},
                "files": {max}, "bytes": {max},
                "destinations": [{{"name": "primary", "pending": {max}, "failing": {max}}}]}}"#,
            max = u64::MAX
        ),
    );
    let f = fleet_json(&env);
    assert_eq!(f["unreadable"], serde_json::json!([]), "{f:#}");
    let newer = fleet_node(&f, "newer-node");
    assert_eq!(newer["files"], 5);
    assert_eq!(newer["destinations"][0]["pending"], 2);
    let sparse = fleet_node(&f, "sparse-node");
    assert_eq!(sparse["files"], 7);
    assert_eq!(sparse["bytes"], 0);
    assert_eq!(sparse["destinations"], serde_json::json!([]));
    let v1 = fleet_node(&f, "v1-node");
    assert_eq!(v1["destinations"][0]["name"], "primary");
    assert_eq!(v1["destinations"][0]["done"], 4);
    assert_eq!(v1["destinations"][0]["failing"], 1);
    assert_eq!(f["totals"]["nodes"], 4);
    assert_eq!(f["totals"]["files"], u64::MAX);
    assert_eq!(f["totals"]["pending"], u64::MAX);

    // What this version writes is named and versioned.
    assert_ok(&env.cli(&["sync"]), "sync");
    let f = fleet_json(&env);
    let me = fleet_node(&f, NODE);
    assert_eq!(me["format"], 2);
    assert!(me["destinations"][0]["name"].is_string(), "{me:#}");
    let text = String::from_utf8_lossy(&env.cli(&["report", "--fleet"]).stdout).to_string();
    assert!(text.contains("fleet: 5 nodes"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ids_with_terminal_escapes_are_shown_without_control_characters() {
    let env = Env::new();
    let evil = "evil\u{1b}]0;owned\u{7}\u{1b}[2J\u{1b}[31mnode\u{9b}1m";
    plant_status(
        &env,
        "evil.json",
        // Every field a format 1 reader needs, so any version shows this node.
        &serde_json::json!({
            "format": 2, "node_id": evil, "version": "0.1.0", "last_seen": now_secs(),
            "files": 1, "bytes": 1, "destinations": [], "oldest_pending_secs": null,
            "last_error": "boom\u{1b}[0m", "success_rate": 1.0,
        })
        .to_string(),
    );
    let out = env.cli(&["report", "--fleet"]);
    assert_ok(&out, "report --fleet");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "control characters reach the terminal: {text:?}"
    );
    // Reproduced: a status object's self-declared `node_id` beat its key, so any node could
    // publish as another. The node is the object's name; the body's claim is not shown.
    assert!(!text.contains("owned"), "{text}");
    let f = fleet_json(&env);
    assert_eq!(f["nodes"][0]["node_id"], "evil");
}

/// Runs `panoptic-sync` with `args` and returns (exit status, stdout, peak RSS in KiB) of that
/// child alone. A small Python parent forks and waits for it: a child spawned straight from
/// this test process would start with the test's own memory mapped (Linux records the
/// pre-exec high-water mark in `ru_maxrss`), so under the whole suite the figure was the test
/// binary's, not the agent's.
pub(crate) fn run_measured(env: &Env, args: &[&str]) -> (i32, String, u64) {
    let out_path = env.tmp.path().join("measured.out");
    let script = "import os, sys\n\
pid = os.fork()\n\
if pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n\
_, status, usage = os.wait4(pid, 0)\n\
sys.stderr.write('maxrss_kib=%d code=%d\\n' % (usage.ru_maxrss, os.waitstatus_to_exitcode(status)))\n";
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_panoptic-sync"))
        .arg("--config")
        .arg(env.config_path())
        .args(args)
        .env("PANOPTIC_SYNC_LOG", "warn")
        .stdout(std::fs::File::create(&out_path).unwrap());
    let output = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("maxrss_kib="))
        .unwrap_or_else(|| panic!("no measurement: {err}"));
    let field = |name: &str| -> i64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad measurement line {line}"))
    };
    let out = std::fs::read_to_string(&out_path).unwrap();
    (field("code=") as i32, out, field("maxrss_kib=") as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_status_object_is_reported_unreadable_without_being_read() {
    let env = Env::new();
    assert_ok(&env.cli(&["sync"]), "sync");
    // 100 MB of valid JSON-looking bytes, planted as another node (or anyone with bucket write
    // access) could.
    let dir = shared_s3()
        .root
        .join(&env.bucket)
        .join("base/_panoptic-sync/nodes");
    std::fs::create_dir_all(&dir).unwrap();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("huge.json")).unwrap());
        f.write_all(br#"{"format": 2, "node_id": "huge", "pad": ""#)
            .unwrap();
        let block = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            f.write_all(&block).unwrap();
        }
        f.write_all(b"\"}").unwrap();
    }
    let (code, out, max_rss_kib) = run_measured(&env, &["report", "--fleet"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(NODE), "{out}");
    assert!(
        out.contains("unreadable status object: base/_panoptic-sync/nodes/huge.json"),
        "{out}"
    );
    assert!(
        max_rss_kib < 64 * 1024,
        "report --fleet peaked at {} MiB",
        max_rss_kib / 1024
    );
}

/// Four genuine files under `run/`, synced to every destination.
pub(crate) fn sync_genuine_files(env: &Env) {
    for i in 0..4 {
        env.write(&format!("run/{i}.log"), format!("genuine {i}").as_bytes());
    }
    assert_ok(&env.cli(&["sync"]), "sync");
}

/// With keys object_store cannot parse planted in the primary (beside the files of
/// [`sync_genuine_files`]), each of restore, `--rebuild-index`, `report --fleet` and prune
/// names them, escaped as `shown` (the objects) and `node_shown` (a status object), and does
/// the rest: four files restored, four objects recorded, this node shown, every genuine
/// object of both destinations pruned. What is left in the store is for the caller to check.
pub(crate) async fn planted_keys_fail_alone(env: &mut Env, shown: &[&str], node_shown: &str) {
    // Restore: every genuine file, each crafted key named, exit 1.
    let to = env.tmp.path().join("restored");
    let out = env.cli(&[
        "restore",
        "--from",
        "primary",
        "--to",
        to.to_str().unwrap(),
        "--prefix",
        &format!("ci/{NODE}"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    for s in shown {
        assert!(err.contains(s), "restore does not name {s}: {err}");
    }
    assert!(!err.chars().any(|c| c.is_control() && c != '\n'), "{err:?}");
    let restored = tree(&to);
    assert_eq!(restored.len(), 4, "{:?}", restored.keys());
    assert_eq!(restored["run/2.log"], b"genuine 2");

    // Rebuild: every genuine object recorded, each crafted key named.
    let out = env.cli(&["sync", "--rebuild-index"]);
    assert_ok(&out, "sync --rebuild-index");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("primary: 4 objects recorded"), "{err}");
    for s in shown {
        assert!(err.contains(s), "the rebuild does not name {s}: {err}");
    }

    // Fleet: this node shown, the crafted status key named.
    let out = env.cli(&["report", "--fleet"]);
    assert_ok(&out, "report --fleet");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains(NODE) && text.contains("fleet: 1 nodes"),
        "{text}"
    );
    assert!(text.contains(node_shown), "{text}");

    // Prune: every expired genuine object deleted, each crafted key named, exit 1.
    env.tail = "[retention]\nremote_max_age = \"1s\"\n".into();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = env.cli(&["prune"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    for s in shown {
        assert!(err.contains(s), "prune does not name {s}: {err}");
    }
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("8 objects deleted"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_object_store_cannot_parse_fails_alone_in_restore_prune_rebuild_and_fleet() {
    let mut env = Env::new();
    sync_genuine_files(&env);
    // Keys with a control character, written straight into the bucket (s3s-fs keeps objects
    // as files; a name with \x01 is a valid file name but not an object_store `Path`).
    // s3s-fs cannot hold `//`, `.` or `..` segments: the file system folds them.
    let bucket = shared_s3().root.join(&env.bucket);
    let bad_object = bucket.join(format!("base/ci/{NODE}/run/bad\u{1}key.log"));
    std::fs::write(&bad_object, b"planted").unwrap();
    std::fs::write(
        bucket.join("base/_panoptic-sync/nodes/bad\u{1}node.json"),
        b"{}",
    )
    .unwrap();
    planted_keys_fail_alone(&mut env, &["bad\\u{1}key.log"], "bad\\u{1}node.json").await;
    // (boto3 cannot parse a listing with a control character either: look at the files.)
    let left: Vec<String> = tree(&bucket.join(format!("base/ci/{NODE}")))
        .into_keys()
        .collect();
    assert_eq!(
        left,
        vec!["run/bad\u{1}key.log".to_string()],
        "only the crafted object is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_name_object_store_cannot_parse_fails_alone_on_a_file_destination() {
    use std::os::unix::ffi::OsStrExt;
    // Encrypted: a file:// store keeps no metadata, the rebuild reads hashes from the records.
    let (mut env, _key) = crate::restore::encrypted_env();
    let store = env.tmp.path().join("store");
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"file://{}\"\n",
        store.display()
    ));
    sync_genuine_files(&env);
    // Names a file system holds but object_store cannot address: a control character, bytes
    // that are not UTF-8. Beside them, a staging file of object_store's own (`name#digits`),
    // which listings skip, as object_store's own listing does.
    let run = store.join(format!("ci/{NODE}/run"));
    std::fs::write(run.join("bad\u{1}key.log"), b"planted").unwrap();
    std::fs::write(
        run.join(std::ffi::OsStr::from_bytes(b"bad\xffname.log")),
        b"planted",
    )
    .unwrap();
    std::fs::write(run.join("3.log#42"), b"staging").unwrap();
    std::fs::write(store.join("_panoptic-sync/nodes/bad\u{1}node.json"), b"{}").unwrap();
    planted_keys_fail_alone(
        &mut env,
        &["bad\\u{1}key.log", "bad\u{fffd}name.log"],
        "bad\\u{1}node.json",
    )
    .await;
    let mut left: Vec<Vec<u8>> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            b"3.log#42".to_vec(),
            b"bad\x01key.log".to_vec(),
            b"bad\xffname.log".to_vec()
        ],
        "only the crafted files are left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_answer_while_the_daemon_runs() {
    let mut env = Env::new();
    let port = free_port();
    env.tail = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let daemon = Daemon::start(env.config());
    for i in 1..6 {
        env.write(&format!("m/{i}.log"), format!("metric {i}").as_bytes());
    }
    // A duplicate with the same mtime and mode is placed by server-side copy (with another
    // mtime it is uploaded: each object carries its own file's metadata).
    write_preserved(&env.watch.join("m/0.log"), b"metric 0", 1_700_000_000);
    write_preserved(&env.watch.join("m/dup.log"), b"metric 0", 1_700_000_000);
    assert_ok(&flush_all(&env, "60s").await, "flush");
    let base = format!("http://127.0.0.1:{port}");
    wait_until(Duration::from_secs(30), "/healthz 200", || {
        http_get(&format!("{base}/healthz")).0 == 200
    })
    .await;
    let (code, body) = http_get(&format!("{base}/metrics"));
    assert_eq!(code, 200);
    let m = parse_metrics(&body);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in:\n{body}"));
    assert_eq!(
        get("panoptic_sync_files_uploaded_total{dest=\"primary\"}"),
        6.0
    );
    assert_eq!(
        get("panoptic_sync_files_deduplicated_total{dest=\"primary\"}"),
        1.0
    );
    assert_eq!(get("panoptic_sync_files_uploaded_total{dest=\"nas\"}"), 6.0);
    assert_eq!(get("panoptic_sync_queue_depth{dest=\"primary\"}"), 0.0);
    assert_eq!(
        get("panoptic_sync_upload_latency_seconds_count{dest=\"primary\"}"),
        7.0
    );
    assert!(get("panoptic_sync_files_seen_total") >= 7.0);
    assert!(get("panoptic_sync_last_success_timestamp_seconds{dest=\"primary\"}") > 1.7e9);
    daemon.stop().await.unwrap();
    assert_eq!(
        http_get(&format!("{base}/healthz")).0,
        0,
        "the server stops with the daemon"
    );
}

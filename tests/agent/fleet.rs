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
    for i in 0..4 {
        a.write(&format!("dup/{i}/same.png"), b"the same screenshot bytes");
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
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=900,1400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            a.tmp.path().join("chromium").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("chromium (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // A blank page compresses to a few KiB; text and bars take far more.
    assert!(
        png.len() > 20_000,
        "screenshot looks empty ({} bytes)",
        png.len()
    );

    let out = a.cli(&["report", "--fleet", "--json"]);
    assert_ok(&out, "report --fleet");
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: Vec<&str> = f["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n[0]["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, vec!["other-node", NODE]);
    assert_eq!(f["totals"][0], 25);
    let text = String::from_utf8_lossy(&a.cli(&["report", "--fleet"]).stdout).to_string();
    assert!(
        text.contains("other-node") && text.contains("fleet: 2 nodes"),
        "{text}"
    );
}

/// Parse the Prometheus text format into (name{labels}, value) pairs.
fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("a sample line");
            (name.to_string(), value.parse::<f64>().expect("a number"))
        })
        .collect()
}

fn http_get(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_answer_while_the_daemon_runs() {
    let mut env = Env::new();
    let port = free_port();
    env.tail = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let daemon = Daemon::start(env.config());
    for i in 0..6 {
        env.write(&format!("m/{i}.log"), format!("metric {i}").as_bytes());
    }
    env.write("m/dup.log", b"metric 0");
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

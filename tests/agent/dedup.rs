//! Content-addressed destinations (`layout = "content"`): the same bytes stored once per
//! destination across runs, mtimes and nodes; every file restorable by its path (`restore`,
//! `restore --run`, `serve`); blobs collected only when nothing references them, never under
//! a writer (a sweep racing uploads in another process); a planted blob refused, named.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::core::assert_ok;
use crate::util::*;

/// Stands for the 50 MB toolchain every run of a commit builds (scaled down for CI time; the
/// full-size figure is in docs/PERFORMANCE.md).
const TOOLCHAIN: usize = 2 << 20;
/// Stands for the 20 MB of fixtures.
const FIXTURES: usize = 1 << 20;
/// Each run's own log.
const LOG: usize = 24 << 10;
/// Runs per node.
const RUNS: usize = 10;

/// Bytes that do not compress, the same for a given seed on every node.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// A node of a content setup: its own tree, state and id; the S3 bucket and the file://
/// store of `shared` (or new ones), both `layout = "content"`.
fn content_node(node: &str, shared: Option<&Env>, grace: &str) -> Env {
    let mut env = Env::new();
    if let Some(s) = shared {
        env.bucket = s.bucket.clone();
        env.nas = s.nas.clone();
    }
    env.node = node.to_string();
    env.watch_extra = "runs = \"dir\"\n".into();
    env.primary = Some(format!(
        r#"[[destination]]
name = "primary"
url = "s3://{bucket}/base"
options = {{ endpoint = "{endpoint}", allow_http = "true", access_key_id = "{key}", secret_access_key = "{secret}", region = "us-east-1", metadata_endpoint = "http://127.0.0.1:9" }}
layout = "content"
blob_grace = "{grace}"
"#,
        bucket = env.bucket,
        endpoint = env.s3_endpoint,
        key = env.s3_key,
        secret = env.s3_secret,
    ));
    env.nas_extra = format!("layout = \"content\"\nblob_grace = \"{grace}\"\n");
    env
}

/// Write run `run` of `env`: the shared toolchain (mode 0755) and fixtures, a log of its own,
/// and a small file that stays at its key. Every file gets a fresh mtime, as a build does.
fn write_run(env: &Env, run: &str, seed: u64) {
    let tool = env.write(&format!("{run}/bin/toolchain"), &noise(1, TOOLCHAIN));
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.write(&format!("{run}/fixtures/data.bin"), &noise(2, FIXTURES));
    env.write(&format!("{run}/logs/test.log"), &noise(seed, LOG));
    env.write(
        &format!("{run}/small.txt"),
        format!("{run} ok\n").as_bytes(),
    );
}

fn seal(env: &Env, run: &str) {
    let dir = env.watch.join(run);
    assert_ok(
        &env.cli(&["seal", dir.to_str().unwrap(), "--timeout", "120s"]),
        &format!("seal {run} on {}", env.node),
    );
}

/// Bytes a store keeps for files: blobs, pointers and objects at files' keys (manifests, run
/// pages and the agent's status and records left out). `dir` is the store's root.
fn file_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if !e.file_type().is_file() {
            continue;
        }
        let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
        let internal =
            rel.starts_with("_panoptic-sync/") && !rel.starts_with("_panoptic-sync/blobs/");
        if internal || rel.contains("/_run/") || rel.ends_with("/index.html") {
            continue;
        }
        total += e.metadata().unwrap().len();
    }
    total
}

/// Keys of the blobs in the store at `dir`.
fn blobs(dir: &Path) -> BTreeSet<String> {
    let root = dir.join("_panoptic-sync/blobs");
    walkdir::WalkDir::new(&root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().strip_prefix(dir).unwrap().display().to_string())
        .collect()
}

/// Every file under `dir`: relative path → (SHA-256, mode, mtime ns).
fn tree_meta(dir: &Path) -> BTreeMap<String, (String, u32, i64)> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_file() {
            let m = e.metadata().unwrap();
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
            let sha = sha_hex(&std::fs::read(e.path()).unwrap());
            out.insert(rel, (sha, m.mode() & 0o777, mtime));
        }
    }
    out
}

/// The node report's figures for one destination: (original, stored, saved by dedup).
fn report_figures(env: &Env, dest: &str) -> (u64, u64, u64) {
    let out = env.cli(&["report", "--json"]);
    assert_ok(&out, "report --json");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = r["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == dest)
        .unwrap_or_else(|| panic!("no destination {dest} in {r}"));
    (
        d["usage"]["bytes_original"].as_u64().unwrap(),
        d["usage"]["bytes_stored"].as_u64().unwrap(),
        d["dedup_saved_bytes"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_store_shared_content_once_per_destination_and_every_run_restores() {
    let _heavy = heavy().await;
    let a = content_node("node-a", None, "24h");
    // One bucket and one file:// store for the three.
    let b = content_node("node-b", Some(&a), "24h");
    let c = content_node("node-c", Some(&a), "24h");
    let nodes = [&a, &b, &c];
    let mut unique = (TOOLCHAIN + FIXTURES) as u64;
    let mut seed = 100;
    for n in nodes {
        for r in 0..RUNS {
            let run = format!("run-{r}");
            seed += 1;
            write_run(n, &run, seed);
            unique += (LOG + format!("{run} ok\n").len()) as u64;
            seal(n, &run);
        }
    }

    // Per destination, stored bytes are at most 1.05 × the unique bytes.
    let s3_dir = a.tmp.path().join("s3-dump");
    shared_s3().dump(&a.bucket, "base/", &s3_dir);
    for (name, dir) in [("primary", s3_dir.join("base")), ("nas", a.nas.clone())] {
        let stored = file_bytes(&dir);
        assert!(
            stored as f64 <= unique as f64 * 1.05,
            "{name}: {stored} bytes stored for {unique} unique bytes"
        );
        // One blob per content: toolchain, fixtures and every log.
        assert_eq!(blobs(&dir).len(), 2 + 3 * RUNS, "{name}: {:?}", blobs(&dir));
    }
    // The toolchain crossed the network once overall: only the first node sent it.
    let mut sent = 0;
    for n in nodes {
        let (original, stored, saved) = report_figures(n, "primary");
        assert!(
            original >= (RUNS * (TOOLCHAIN + FIXTURES + LOG)) as u64,
            "{}",
            n.node
        );
        sent += stored;
        if n.node != "node-a" {
            assert!(
                stored < (TOOLCHAIN as u64),
                "{} stored {stored} bytes: the toolchain was sent again",
                n.node
            );
        }
        assert!(
            saved >= ((RUNS - 1) * (TOOLCHAIN + FIXTURES)) as u64,
            "{}: saved {saved}",
            n.node
        );
    }
    assert!(
        sent as f64 <= unique as f64 * 1.05,
        "{sent} sent for {unique}"
    );
    // The fleet view has the same figures, per node and destination, from the status objects
    // each node publishes (at the end of a sync).
    for n in nodes {
        assert_ok(&n.cli(&["sync"]), "sync");
    }
    let out = a.cli(&["report", "--fleet", "--json"]);
    assert_ok(&out, "report --fleet --json");
    let fleet: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut fleet_stored = 0;
    for node in fleet["nodes"].as_array().unwrap() {
        let d = node["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "primary")
            .unwrap();
        assert!(d["logical_bytes"].as_u64().unwrap() >= (RUNS * (TOOLCHAIN + FIXTURES)) as u64);
        let saved = d["dedup_saved_bytes"].as_u64().unwrap();
        assert!(
            saved >= ((RUNS - 1) * (TOOLCHAIN + FIXTURES)) as u64,
            "{node}"
        );
        fleet_stored += d["stored_bytes"].as_u64().unwrap();
    }
    assert_eq!(
        fleet_stored, sent,
        "the fleet view and the node reports agree"
    );
    let out = a.cli(&["report", "--fleet"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("destination primary:"));
    let page = a.tmp.path().join("fleet.html");
    assert_ok(
        &a.cli(&["report", "--fleet", "--html", page.to_str().unwrap()]),
        "fleet page",
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("saved by dedup") && html.contains("all nodes"));

    // Every run restores byte-identical, with modes and mtimes, from each destination.
    for n in nodes {
        for r in [0, RUNS - 1] {
            let run = format!("run-{r}");
            let want = tree_meta(&n.watch.join(&run));
            for dest in ["primary", "nas"] {
                let to = n.tmp.path().join(format!("restored-{dest}-{run}"));
                let out = n.cli(&[
                    "restore",
                    "--run",
                    &run,
                    "--from",
                    dest,
                    "--to",
                    to.to_str().unwrap(),
                ]);
                assert_ok(&out, &format!("restore --run {run} on {}", n.node));
                assert_eq!(tree_meta(&to), want, "{} {run} from {dest}", n.node);
            }
        }
    }
    // A prefix restore resolves pointers too.
    let to = a.tmp.path().join("restored-prefix");
    let out = a.cli(&[
        "restore",
        "--from",
        "nas",
        "--prefix",
        "ci/node-a/run-3",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_ok(&out, "restore --prefix");
    let mut got = tree_meta(&to);
    got.retain(|k, _| !k.starts_with("_run/") && k != "index.html");
    assert_eq!(got, tree_meta(&a.watch.join("run-3")));
    // The run's page links to the blobs, which a static host serves as they are.
    let page_dir = a.nas.join("ci/node-a/run-0");
    let page = std::fs::read_to_string(page_dir.join("index.html")).unwrap();
    let links: Vec<&str> = page
        .split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|l| l.contains("_panoptic-sync/blobs/"))
        .collect();
    assert_eq!(links.len(), 3, "toolchain, fixtures, log: {page}");
    for l in links {
        let mut at = page_dir.clone();
        for seg in l.split('/') {
            if seg == ".." {
                at.pop();
            } else {
                at.push(seg);
            }
        }
        assert!(
            at.is_file(),
            "the page links to {l}, which is not {}",
            at.display()
        );
    }
    // An independent decoder follows pointers to their blobs.
    assert_eq!(
        decoder_reads_pointers(&b, &a.nas, "ci/node-b/run-4", "-"),
        3
    );
    // verify --deep finds nothing wrong, and no orphaned blob.
    let out = a.cli(&["verify", "--deep"]);
    assert_ok(&out, "verify --deep");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("orphaned"));

    // serve: the toolchain of another node's run, through the gateway, byte-identical.
    let token_file = a.tmp.path().join("token");
    std::fs::write(
        &token_file,
        "a-token-long-enough-for-the-gateway-0123456789\n",
    )
    .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _serve = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(a.config_path())
            .args([
                "serve",
                "--from",
                "nas",
                "--listen",
                &listen,
                "--token-file",
            ])
            .arg(&token_file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(a.tmp.path().join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port, Duration::from_secs(30));
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-H",
            "Authorization: Bearer a-token-long-enough-for-the-gateway-0123456789",
        ])
        .arg(format!("http://{listen}/ci/node-a/run-2/bin/toolchain"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == noise(1, TOOLCHAIN),
        "the served toolchain differs"
    );
}

/// A GitHub Actions push to `branch`, as the seal reads it.
fn push_env(branch: &str) -> Vec<(String, String)> {
    [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_REPOSITORY", "acme/widgets"),
        ("GITHUB_REF", &format!("refs/heads/{branch}")),
        ("GITHUB_REF_NAME", branch),
        ("GITHUB_REF_TYPE", "branch"),
        ("GITHUB_SHA", "0123456789abcdef0123456789abcdef01234567"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Keys of the copies a sweep set aside in the store at `dir`.
fn set_aside(dir: &Path) -> BTreeSet<String> {
    let root = dir.join("_panoptic-sync/trash");
    walkdir::WalkDir::new(&root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().strip_prefix(dir).unwrap().display().to_string())
        .collect()
}

/// The blob key (relative to the store) a plain pointer file names.
fn pointed(pointer_file: &Path) -> String {
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pointer_file).unwrap()).unwrap();
    p["blob"].as_str().unwrap().to_string()
}

/// Run the independent decoder (tests/format_decrypt.py, written from docs/FORMAT.md) on every
/// pointer under `prefix` of the file:// store at `store`, with `key` (`-`: none): each must
/// decode, through its blob, to the file of `env` it names.
fn decoder_reads_pointers(env: &Env, store: &Path, prefix: &str, key: &str) -> usize {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/format_decrypt.py");
    let mut seen = 0;
    for e in walkdir::WalkDir::new(store.join(prefix))
        .into_iter()
        .flatten()
    {
        let rel = e.path().strip_prefix(store).unwrap().display().to_string();
        if !(rel.ends_with(".ptr") || rel.ends_with(".ptr.enc")) {
            continue;
        }
        let name_out = env.tmp.path().join("decoded-name");
        let out = Command::new("python3")
            .arg(&script)
            .args([key, &rel])
            .arg(&name_out)
            .arg(store)
            .stdin(std::fs::File::open(e.path()).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let logical = std::fs::read_to_string(&name_out).unwrap();
        let local = logical.split_once(&format!("ci/{}/", env.node)).unwrap().1;
        assert!(
            out.stdout == std::fs::read(env.watch.join(local)).unwrap(),
            "{rel}"
        );
        seen += 1;
    }
    seen
}

fn prune(env: &Env) -> String {
    let out = env.cli(&["prune"]);
    assert_ok(&out, "prune");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_shared_blobs_until_their_last_reference_goes() {
    let mut env = content_node(NODE, None, "1s");
    env.cmd_env = push_env("main");
    env.tail = "[retention.runs]\nkeep_latest_per_branch = 1\n".into();
    for (i, run) in ["r0", "r1", "r2"].iter().enumerate() {
        write_run(&env, run, 500 + i as u64);
        seal(&env, run);
    }
    let tool = pointed(&env.nas.join(format!("ci/{NODE}/r2/bin/toolchain.ptr")));
    let log = |run: &str| pointed(&env.nas.join(format!("ci/{NODE}/{run}/logs/test.log.ptr")));
    let (log0, log1, log2) = (log("r0"), log("r1"), log("r2"));
    assert_eq!(blobs(&env.nas).len(), 5, "toolchain, fixtures, three logs");

    // Every run but the newest goes; their logs' blobs are collected once unreferenced for
    // the grace period, twice (set aside, then deleted); the shared blobs stay.
    let out = prune(&env);
    assert!(out.contains("run r0") && out.contains("run r1"), "{out}");
    wait_until(
        Duration::from_secs(60),
        "the pruned runs' blobs to be deleted",
        || {
            prune(&env);
            let (b, t) = (blobs(&env.nas), set_aside(&env.nas));
            !b.contains(&log0) && !b.contains(&log1) && t.is_empty()
        },
    )
    .await;
    let left = blobs(&env.nas);
    assert!(left.contains(&tool) && left.contains(&log2), "{left:?}");
    let to = env.tmp.path().join("restored-r2");
    assert_ok(
        &env.cli(&[
            "restore",
            "--run",
            "r2",
            "--from",
            "nas",
            "--to",
            to.to_str().unwrap(),
        ]),
        "restore --run r2",
    );
    assert_eq!(tree_meta(&to), tree_meta(&env.watch.join("r2")));
    // The same in S3.
    let s3_blobs: BTreeSet<String> = shared_s3()
        .objects(&env.bucket, "base/_panoptic-sync/blobs/")
        .into_keys()
        .map(|k| k.trim_start_matches("base/").to_string())
        .collect();
    assert_eq!(s3_blobs, left);

    // The last run goes too: after the grace period nothing is left.
    env.tail = "[retention.runs]\nmax_age = \"1ms\"\n".into();
    let out = prune(&env);
    assert!(out.contains("run r2"), "{out}");
    wait_until(Duration::from_secs(60), "every blob to be deleted", || {
        prune(&env);
        blobs(&env.nas).is_empty() && set_aside(&env.nas).is_empty()
    })
    .await;
    let s3_left = shared_s3().objects(&env.bucket, "base/_panoptic-sync/blobs/");
    assert!(s3_left.is_empty(), "{s3_left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_blob_whose_bytes_do_not_match_its_key_fails_restore_and_verify_deep_named() {
    let env = content_node(NODE, None, "24h");
    env.write("r1/bin/tool", &noise(7, 64 << 10));
    assert_ok(&env.cli(&["sync"]), "sync");
    let blob = pointed(&env.nas.join(format!("ci/{NODE}/r1/bin/tool.ptr")));
    // Same length, other bytes, in both stores.
    std::fs::write(env.nas.join(&blob), noise(8, 64 << 10)).unwrap();
    shared_s3().put_raw(&env.bucket, &format!("base/{blob}"), &noise(8, 64 << 10));
    for dest in ["nas", "primary"] {
        let to = env.tmp.path().join(format!("restored-{dest}"));
        let out = env.cli(&["restore", "--from", dest, "--to", to.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{dest}: {err}");
        assert!(
            err.contains(&blob) && err.contains("SHA-256"),
            "{dest}: {err}"
        );
        assert!(!to.join(format!("ci/{NODE}/r1/bin/tool")).exists());
        let out = env.cli(&["verify", "--deep", "--dest", dest]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{dest}: {err}");
        assert!(
            err.contains(&blob) && err.contains("damaged"),
            "{dest}: {err}"
        );
    }
    // Gone altogether: a dangling reference, named with its blob.
    std::fs::remove_file(env.nas.join(&blob)).unwrap();
    let out = env.cli(&["verify", "--dest", "nas"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("dangling") && err.contains(&blob), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_racing_100_uploads_of_the_same_content_never_leaves_a_reference_to_a_missing_blob()
{
    let _heavy = heavy().await;
    let writer = content_node("writer", None, "0s");
    let sweeper = content_node("sweeper", Some(&writer), "0s");
    let _daemon = writer.spawn_run();
    // The second process: sweeps the shared stores again and again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sweeps = {
        let (stop, config) = (stop.clone(), sweeper.config_path());
        std::thread::spawn(move || {
            let mut log = String::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
                    .arg("--config")
                    .arg(&config)
                    .arg("prune")
                    .output()
                    .unwrap();
                log.push_str(&String::from_utf8_lossy(&out.stdout));
                log.push_str(&String::from_utf8_lossy(&out.stderr));
            }
            log
        })
    };
    let content = noise(9, 64 << 10);
    let mut last = String::new();
    for round in 0..3 {
        // 100 files of one content at once; all of them in both stores.
        std::fs::create_dir_all(writer.watch.join(format!("round{round}"))).unwrap();
        for i in 0..100 {
            let path = writer.watch.join(format!("round{round}/f{i:03}.bin"));
            write_preserved(&path, &content, 1_700_000_000 + i);
        }
        let out = flush_all(&writer, "120s").await;
        assert_ok(&out, "flush");
        last = format!("ci/writer/round{round}");
        // Retention stands in: the pointers of this round go from the file:// store, so the
        // blob is unreferenced there and the sweeper sets it aside before the next round.
        if round < 2 {
            for e in walkdir::WalkDir::new(writer.nas.join(&last))
                .into_iter()
                .flatten()
            {
                if e.file_type().is_file() {
                    std::fs::remove_file(e.path()).unwrap();
                }
            }
            wait_until(
                Duration::from_secs(60),
                "the sweeper to set the blob aside",
                || blobs(&writer.nas).is_empty(),
            )
            .await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = sweeps.join().unwrap();
    assert!(
        log.contains("set aside"),
        "the sweeper never collected: {log}"
    );
    // Every pointer in either store names a blob that is there.
    let s3_dir = writer.tmp.path().join("s3-dump");
    shared_s3().dump(&writer.bucket, "base/", &s3_dir);
    for store in [writer.nas.clone(), s3_dir.join("base")] {
        let mut pointers = 0;
        for e in walkdir::WalkDir::new(store.join(&last))
            .into_iter()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "ptr") {
                pointers += 1;
                let blob = pointed(e.path());
                assert!(
                    store.join(&blob).is_file(),
                    "{} names {blob}, which is missing",
                    e.path().display()
                );
            }
        }
        assert_eq!(pointers, 100, "{}", store.display());
    }
    // And the last round restores whole from the file:// store.
    let to = writer.tmp.path().join("restored");
    let out = writer.cli(&[
        "restore",
        "--from",
        "nas",
        "--prefix",
        &last,
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_ok(&out, "restore");
    let restored = tree(&to);
    assert_eq!(restored.len(), 100);
    assert!(restored.values().all(|d| *d == content));
}

/// An encrypting pipeline with `key`, and the fleet's `dedup` key if given.
fn encrypting(key: &Path, dedup: Option<&Path>) -> String {
    let mut p = format!(
        "[pipeline]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nkey_file = \"{}\"\n",
        key.display()
    );
    if let Some(d) = dedup {
        p.push_str(&format!("dedup_key_file = \"{}\"\n", d.display()));
    }
    p
}

/// The blob namespaces in the store at `dir`.
fn namespaces(dir: &Path) -> BTreeSet<String> {
    blobs(dir)
        .iter()
        .map(|b| b.split('/').nth(2).unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_blobs_dedup_per_node_key_and_across_nodes_with_a_fleet_key() {
    let _heavy = heavy().await;
    let tool_sha = sha_hex(&noise(1, TOOLCHAIN));
    // Per-node keys: each node stores each content once, in its own namespace.
    let mut a = content_node("node-a", None, "24h");
    let mut b = content_node("node-b", Some(&a), "24h");
    a.pipeline = encrypting(&a.keygen("key"), None);
    b.pipeline = encrypting(&b.keygen("key"), None);
    for (n, seed) in [(&a, 600), (&b, 700)] {
        for r in 0..2 {
            write_run(n, &format!("r{r}"), seed + r);
            seal(n, &format!("r{r}"));
        }
    }
    assert_eq!(namespaces(&a.nas).len(), 2, "{:?}", blobs(&a.nas));
    assert_eq!(blobs(&a.nas).len(), 2 * 2 + 4, "{:?}", blobs(&a.nas));
    // Keyed names: no blob is named by its content's SHA-256, no pointer is plaintext.
    assert!(blobs(&a.nas).iter().all(|b| !b.contains(&tool_sha)));
    let head = &noise(1, TOOLCHAIN)[..64];
    for (path, data) in tree(&a.nas) {
        assert!(
            !data.windows(64).any(|w| w == head),
            "{path} holds plaintext"
        );
        assert!(
            !path.ends_with(".ptr"),
            "{path}: a plain pointer under a key"
        );
    }
    let key_a = a.tmp.path().join("key").display().to_string();
    assert_eq!(decoder_reads_pointers(&a, &a.nas, "ci/node-a", &key_a), 6);
    for n in [&a, &b] {
        let to = n.tmp.path().join("restored");
        let out = n.cli(&[
            "restore",
            "--run",
            "r1",
            "--from",
            "nas",
            "--to",
            to.to_str().unwrap(),
        ]);
        assert_ok(&out, &format!("restore --run r1 on {}", n.node));
        assert_eq!(tree_meta(&to), tree_meta(&n.watch.join("r1")));
    }

    // A fleet key: one namespace, the toolchain once for both nodes.
    let mut c = content_node("node-c", None, "24h");
    let mut d = content_node("node-d", Some(&c), "24h");
    let fleet = c.keygen("fleet");
    c.pipeline = encrypting(&c.keygen("key"), Some(&fleet));
    d.pipeline = encrypting(&d.keygen("key"), Some(&fleet));
    for (n, seed) in [(&c, 800), (&d, 900)] {
        for r in 0..2 {
            write_run(n, &format!("r{r}"), seed + r);
            seal(n, &format!("r{r}"));
        }
    }
    assert_eq!(namespaces(&c.nas).len(), 1, "{:?}", blobs(&c.nas));
    assert_eq!(blobs(&c.nas).len(), 2 + 4, "{:?}", blobs(&c.nas));
    let (_, stored_d, saved_d) = report_figures(&d, "nas");
    assert!(
        stored_d < TOOLCHAIN as u64,
        "node-d sent the toolchain again: {stored_d}"
    );
    assert!(saved_d >= 2 * (TOOLCHAIN + FIXTURES) as u64, "{saved_d}");
    // Any holder of the fleet key reads another node's files by their pointers.
    let to = d.tmp.path().join("from-c");
    let out = d.cli(&[
        "restore",
        "--from",
        "nas",
        "--prefix",
        "ci/node-c/r0/bin",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_ok(&out, "restore of node-c's files by node-d");
    assert!(tree(&to)["toolchain"] == noise(1, TOOLCHAIN));
    let fleet_key = fleet.display().to_string();
    assert_eq!(
        decoder_reads_pointers(&d, &c.nas, "ci/node-d", &fleet_key),
        6
    );
    let out = c.cli(&["verify", "--deep"]);
    assert_ok(&out, "verify --deep");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_restores_from_destinations_of_either_layout() {
    // The primary keeps today's layout, the backup is content-addressed: the manifest names
    // the primary's keys, and each destination is read in its own layout.
    let mut env = Env::new();
    env.watch_extra = "runs = \"dir\"\n".into();
    env.nas_extra = "layout = \"content\"\n".into();
    let key = env.keygen("key");
    env.pipeline = encrypting(&key, None);
    write_run(&env, "r1", 41);
    seal(&env, "r1");
    assert!(
        env.nas
            .join(format!("ci/{NODE}/r1/bin/toolchain.ptr.enc"))
            .is_file()
    );
    // `url` leads to the bytes: the blob, not the pointer.
    let tool = env.watch.join("r1/bin/toolchain");
    let out = env.cli(&["url", tool.to_str().unwrap(), "--dest", "nas"]);
    assert_ok(&out, "url");
    assert!(String::from_utf8_lossy(&out.stdout).contains("_panoptic-sync/blobs/key-"));
    for dest in ["primary", "nas"] {
        let to = env.tmp.path().join(format!("restored-{dest}"));
        let out = env.cli(&[
            "restore",
            "--run",
            "r1",
            "--from",
            dest,
            "--to",
            to.to_str().unwrap(),
        ]);
        assert_ok(&out, &format!("restore --run from {dest}"));
        assert_eq!(tree_meta(&to), tree_meta(&env.watch.join("r1")), "{dest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_interrupted_after_setting_a_referenced_blob_aside_leaves_nothing_dangling() {
    let env = content_node(NODE, None, "1s");
    write_run(&env, "r1", 77);
    seal(&env, "r1");
    // What a sweep leaves when it dies between setting blobs aside and looking at the pointers
    // again: a referenced blob in the trash, and its mark object.
    let blob = pointed(&env.nas.join(format!("ci/{NODE}/r1/bin/toolchain.ptr")));
    let aside = env
        .nas
        .join(blob.replacen("_panoptic-sync/blobs", "_panoptic-sync/trash", 1))
        .join("1000");
    std::fs::create_dir_all(aside.parent().unwrap()).unwrap();
    std::fs::rename(env.nas.join(&blob), &aside).unwrap();
    let mark = env.nas.join("_panoptic-sync/gc/sweep-1000-0badc0de.json");
    std::fs::create_dir_all(mark.parent().unwrap()).unwrap();
    std::fs::write(
        &mark,
        format!("{{\"started_ms\": 1000, \"candidates\": [\"{blob}\"]}}"),
    )
    .unwrap();

    // Readers read it from the trash meanwhile; verify names it.
    let to = env.tmp.path().join("restored");
    let out = env.cli(&[
        "restore",
        "--run",
        "r1",
        "--from",
        "nas",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_ok(&out, "restore --run while the blob is set aside");
    assert_eq!(tree_meta(&to), tree_meta(&env.watch.join("r1")));
    let out = env.cli(&["verify", "--dest", "nas"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&blob) && err.contains("set aside"), "{err}");

    // The next sweep puts it back and clears the mark; nothing is dangling.
    let out = prune(&env);
    assert!(out.contains("put back"), "{out}");
    assert!(env.nas.join(&blob).is_file());
    assert!(set_aside(&env.nas).is_empty() && !mark.exists());
    assert_ok(
        &env.cli(&["verify", "--deep", "--dest", "nas"]),
        "verify --deep",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_index_knows_pointers_and_uploads_nothing_again() {
    let env = content_node(NODE, None, "24h");
    write_run(&env, "r1", 88);
    assert_ok(&env.cli(&["sync"]), "sync");
    // One sweep per destination is enough for a while: a second one right after is skipped.
    prune(&env);
    let out = env.cli(&["prune"]);
    assert_ok(&out, "prune");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nas: blobs not collected: a sweep finished"),
        "{err}"
    );
    let before = tree_meta(&env.nas);
    // The index is lost with the machine's disk.
    std::fs::remove_dir_all(&env.state).unwrap();
    let out = env.cli(&["sync", "--rebuild-index"]);
    assert_ok(&out, "sync --rebuild-index");
    let (_, stored, saved) = report_figures(&env, "nas");
    // Every file was found stored (its pointer read back): no blob was sent again, what the
    // node holds there is its pointers and the small file.
    assert!(stored < 4096, "{stored} bytes counted after the rebuild");
    assert!(saved >= (TOOLCHAIN + FIXTURES) as u64, "{saved}");
    let after = tree_meta(&env.nas);
    let changed: Vec<&String> = after
        .iter()
        .filter(|(k, v)| !k.starts_with("_panoptic-sync/") && before.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .collect();
    assert!(changed.is_empty(), "rewritten: {changed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_destination_on_azure_stores_once_restores_and_collects() {
    let azurite = test_var("PANOPTIC_TEST_AZURITE_ENDPOINT");
    let mut env = Env::new();
    cloud_check(&["azure", &azurite, "create", &env.bucket]);
    env.cmd_env = vec![("AZURITE_BLOB_STORAGE_URL".into(), azurite.clone())];
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"az://{}/base\"\n\
         options = {{ use_emulator = \"true\" }}\nlayout = \"content\"\nblob_grace = \"1s\"\n",
        env.bucket
    ));
    let data = noise(12, 96 << 10);
    for i in 0..6 {
        // Six copies, each with its own mtime.
        env.write(&format!("copies/{i}/tool.bin"), &data);
    }
    assert_ok(&env.cli(&["sync"]), "sync");
    let listing = |prefix: &str| cloud_check(&["azure", &azurite, "list", &env.bucket, prefix]);
    let blobs = listing("base/_panoptic-sync/blobs/");
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert_eq!(blobs.values().next().unwrap(), &sha_hex(&data));
    let to = env.tmp.path().join("restored");
    let out = env.cli(&[
        "restore",
        "--from",
        "primary",
        "--prefix",
        &format!("ci/{NODE}"),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_ok(&out, "restore");
    assert_eq!(tree_meta(&to), tree_meta(&env.watch));
    assert_ok(
        &env.cli(&["verify", "--deep", "--dest", "primary"]),
        "verify --deep",
    );

    // Every pointer expires; the blob is set aside (a copy and a delete on Azure), then deleted.
    env.tail = "[retention]\nremote_max_age = \"1ms\"\n".into();
    wait_until(
        Duration::from_secs(60),
        "the blob to be collected from Azure",
        || {
            prune(&env);
            listing("base/_panoptic-sync/blobs/").is_empty()
                && listing("base/_panoptic-sync/trash/").is_empty()
        },
    )
    .await;
    assert!(listing(&format!("base/ci/{NODE}/")).is_empty());
}

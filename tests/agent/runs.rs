//! Runs (`runs = "dir"`): `seal` with GitHub Actions' and GitLab CI's environment, the
//! manifest read back from the `file://` store, `restore --run`, tampering and missing
//! objects, `runs --json` and the open-run count of `status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::core::assert_ok;
use crate::util::*;

fn github_env() -> Vec<(String, String)> {
    [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_REPOSITORY", "acme/widgets"),
        ("GITHUB_REF", "refs/pull/42/merge"),
        ("GITHUB_REF_NAME", "42/merge"),
        ("GITHUB_REF_TYPE", "branch"),
        ("GITHUB_HEAD_REF", "feature/x"),
        ("GITHUB_SHA", "0123456789abcdef0123456789abcdef01234567"),
        ("GITHUB_SERVER_URL", "https://github.com"),
        ("GITHUB_RUN_ID", "9001"),
        ("GITHUB_JOB", "integration"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn gitlab_env() -> Vec<(String, String)> {
    [
        ("GITLAB_CI", "true"),
        ("CI_PROJECT_PATH", "acme/gadgets"),
        ("CI_COMMIT_TAG", "v2.1.0"),
        ("CI_COMMIT_SHA", "fedcba9876543210fedcba9876543210fedcba98"),
        ("CI_PIPELINE_ID", "555"),
        ("CI_JOB_NAME", "e2e"),
        (
            "CI_JOB_URL",
            "https://gitlab.example/acme/gadgets/-/jobs/77",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn run_env() -> Env {
    let mut env = Env::new();
    env.watch_extra = "runs = \"dir\"\n".into();
    env
}

/// A runs setup whose pipeline compresses with zstd and encrypts with a new key.
fn encrypted_run_env() -> Env {
    let mut env = run_env();
    let key = env.keygen("key");
    env.pipeline = format!(
        "[pipeline]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nkey_file = \"{}\"\n",
        key.display()
    );
    env
}

fn write_run(env: &Env, run: &str) {
    env.write(
        &format!("{run}/logs/test.log"),
        format!("{run} ok\n").repeat(500).as_bytes(),
    );
    env.write(
        &format!("{run}/report/index.html"),
        format!("<h1>{run}</h1>").as_bytes(),
    );
    let mut shot = vec![0u8; 50_000];
    fastrand::fill(&mut shot);
    env.write(&format!("{run}/shots/a.png"), &shot);
    env.write(&format!("{run}/deep/er/still/x.json"), b"{}");
    // A mode other than the default, which the manifest must record.
    std::fs::set_permissions(
        env.watch.join(run).join("deep/er/still/x.json"),
        std::os::unix::fs::PermissionsExt::from_mode(0o751),
    )
    .unwrap();
}

fn seal(env: &Env, run: &str, extra: &[&str]) -> Output {
    let dir = env.watch.join(run);
    let mut args = vec!["seal", dir.to_str().unwrap(), "--timeout", "90s"];
    args.extend_from_slice(extra);
    env.cli(&args)
}

fn restore_run(env: &Env, run: &str, from: Option<&str>, to: &Path) -> Output {
    let mut args = vec!["restore", "--run", run, "--to", to.to_str().unwrap()];
    if let Some(f) = from {
        args.extend_from_slice(&["--from", f]);
    }
    env.cli(&args)
}

fn manifest_path(env: &Env, run: &str) -> std::path::PathBuf {
    env.nas.join(format!("ci/{NODE}/{run}/_run/manifest.json"))
}

fn runs_json(env: &Env) -> BTreeMap<String, serde_json::Value> {
    let out = env.cli(&["runs", "--json"]);
    assert_ok(&out, "runs --json");
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r))
        .collect()
}

/// The manifest in the file:// store lists exactly the run's files with the right hashes,
/// and each stored key holds that content in both stores.
fn check_manifest(env: &Env, run: &str) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest_path(env, run)).unwrap()).unwrap();
    assert_eq!(m["format"], 1);
    assert_eq!(m["run"], run);
    assert_eq!(m["node"], NODE);
    let want: BTreeMap<String, String> = tree(&env.watch.join(run))
        .into_iter()
        .map(|(p, d)| (p, sha_hex(&d)))
        .collect();
    let s3 = env.s3_objects(shared_s3());
    let nas = env.nas_objects();
    let mut got = BTreeMap::new();
    for f in m["files"].as_array().unwrap() {
        let (path, sha) = (f["path"].as_str().unwrap(), f["sha256"].as_str().unwrap());
        let key = f["stored_key"].as_str().unwrap();
        assert_eq!(key, format!("ci/{NODE}/{run}/{path}"), "plain stored key");
        assert_eq!(s3.get(key).map(String::as_str), Some(sha), "S3 holds {key}");
        assert_eq!(
            nas.get(key).map(String::as_str),
            Some(sha),
            "nas holds {key}"
        );
        assert!(f["size"].as_u64().is_some());
        // The mode is the one listed with the file (the flush's look), not read again.
        let on_disk = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(env.watch.join(run).join(path))
                .unwrap()
                .permissions(),
        ) & 0o7777;
        assert_eq!(
            f["mode"].as_u64(),
            Some(u64::from(on_disk)),
            "mode of {path}"
        );
        got.insert(path.to_string(), sha.to_string());
    }
    assert_eq!(got, want, "the manifest lists exactly the run");
    assert_eq!(m["totals"]["files"], want.len());
    // The S3 copy is the same document.
    let s3_manifest = format!("ci/{NODE}/{run}/_run/manifest.json");
    assert_eq!(
        s3.get(&s3_manifest),
        nas.get(&s3_manifest),
        "both stores hold the same manifest"
    );
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_runs_list_every_file_restore_exactly_and_fail_named_when_tampered() {
    let mut env = run_env();
    write_run(&env, "gh-1");
    write_run(&env, "gl-2");
    env.write("gl-2/only-here.txt", b"gitlab");

    env.cmd_env = github_env();
    assert_ok(
        &seal(
            &env,
            "gh-1",
            &["--label", "suite=unit", "--label", "os=linux"],
        ),
        "seal gh-1",
    );
    let m = check_manifest(&env, "gh-1");
    assert_eq!(m["ci"]["provider"], "github-actions");
    assert_eq!(m["ci"]["repository"], "acme/widgets");
    assert_eq!(m["ci"]["pull_request"], "42");
    assert_eq!(m["ci"]["branch"], "feature/x");
    assert_eq!(
        m["ci"]["url"],
        "https://github.com/acme/widgets/actions/runs/9001"
    );
    assert_eq!(m["labels"]["suite"], "unit");
    assert_eq!(m["labels"]["os"], "linux");
    assert!(m["sealed_ms"].as_i64().unwrap() >= m["last_file_ms"].as_i64().unwrap());

    env.cmd_env = gitlab_env();
    assert_ok(&seal(&env, "gl-2", &[]), "seal gl-2");
    let m = check_manifest(&env, "gl-2");
    assert_eq!(m["ci"]["provider"], "gitlab-ci");
    assert_eq!(m["ci"]["tag"], "v2.1.0");
    assert_eq!(m["ci"]["job"], "e2e");
    assert!(m["ci"]["branch"].is_null());
    env.cmd_env.clear();

    // Exactly the run, from the primary and from the backup.
    let out1 = env.tmp.path().join("out1");
    assert_ok(&restore_run(&env, "gh-1", None, &out1), "restore gh-1");
    assert_eq!(tree(&out1), tree(&env.watch.join("gh-1")));
    let out2 = env.tmp.path().join("out2");
    assert_ok(
        &restore_run(&env, "gl-2", Some("nas"), &out2),
        "restore gl-2",
    );
    assert_eq!(tree(&out2), tree(&env.watch.join("gl-2")));

    // A tampered manifest (a file's hash edited in the file:// copy) fails, naming the file.
    let path = manifest_path(&env, "gl-2");
    let text = std::fs::read_to_string(&path).unwrap();
    let sha = sha_hex(b"gitlab");
    assert!(text.contains(&sha));
    std::fs::write(&path, text.replace(&sha, &sha_hex(b"forged"))).unwrap();
    let out = restore_run(&env, "gl-2", Some("nas"), &env.tmp.path().join("out3"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("only-here.txt") && err.contains("SHA-256"),
        "{err}"
    );

    // A deleted object fails the restore, named.
    std::fs::remove_file(env.nas.join(format!("ci/{NODE}/gh-1/shots/a.png"))).unwrap();
    let out = restore_run(&env, "gh-1", Some("nas"), &env.tmp.path().join("out4"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("shots/a.png") && err.contains("missing"),
        "{err}"
    );
    // The S3 copy is untouched and still restores.
    let out5 = env.tmp.path().join("out5");
    assert_ok(
        &restore_run(&env, "gh-1", None, &out5),
        "restore gh-1 from S3",
    );

    // Sealed, changed after seal, open.
    let runs = runs_json(&env);
    assert_eq!(runs["gh-1"]["state"], "sealed", "{runs:?}");
    assert_eq!(runs["gh-1"]["complete"], true);
    env.write("gh-1/logs/late.log", b"written after the seal");
    env.write("open-3/x.log", b"not sealed");
    assert_ok(&env.cli(&["sync"]), "sync");
    let runs = runs_json(&env);
    assert_eq!(runs["gh-1"]["state"], "changed_after_seal", "{runs:?}");
    assert_eq!(
        runs["gh-1"]["changed"],
        serde_json::json!(["logs/late.log"])
    );
    assert_eq!(runs["gl-2"]["state"], "sealed");
    assert_eq!(runs["gl-2"]["files"], 5);
    assert_eq!(runs["open-3"]["state"], "open");
    assert_eq!(runs["open-3"]["complete"], true);
    assert_eq!(env.status()["open_runs"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_manifest_restores_and_a_flipped_byte_fails_naming_it() {
    let mut env = encrypted_run_env();
    write_run(&env, "r1");
    env.cmd_env = github_env();
    assert_ok(&seal(&env, "r1", &[]), "seal r1");
    let dir = env.nas.join(format!("ci/{NODE}/r1/_run"));
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["manifest.json.zst.enc".to_string()]);
    let stored = dir.join(&names[0]);
    let data = std::fs::read(&stored).unwrap();
    assert!(!data.windows(10).any(|w| w == b"github-act"), "ciphertext");

    let out = env.tmp.path().join("out");
    assert_ok(&restore_run(&env, "r1", Some("nas"), &out), "restore r1");
    assert_eq!(tree(&out), tree(&env.watch.join("r1")));

    // Reproduced: a planted plain manifest, newer than the genuine one, was picked first and
    // refused, so the restore was denied. Only authenticated candidates count.
    std::fs::write(
        dir.join("manifest.json"),
        br#"{"format":1,"run":"r1","files":[]}"#,
    )
    .unwrap();
    let out = env.tmp.path().join("out-planted");
    assert_ok(
        &restore_run(&env, "r1", Some("nas"), &out),
        "restore r1 beside a planted plain manifest",
    );
    assert_eq!(tree(&out), tree(&env.watch.join("r1")));
    std::fs::remove_file(dir.join("manifest.json")).unwrap();

    let mut bad = data.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&stored, bad).unwrap();
    let out = restore_run(&env, "r1", Some("nas"), &env.tmp.path().join("out2"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("manifest.json.zst.enc"), "{err}");
    // The primary's copy is intact.
    assert_ok(
        &restore_run(&env, "r1", None, &env.tmp.path().join("out3")),
        "restore r1 from S3",
    );
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ci_value_of_an_encrypted_run_is_stored_in_the_clear() {
    // Reproduced: the node status object carried `latest_runs[].branch` in plain JSON while
    // encryption was on. Every CI value of an encrypted run is searched for in every byte of
    // both stores (names and contents), after the node's status object is published.
    let mut env = encrypted_run_env();
    write_run(&env, "r1");
    env.cmd_env = github_env();
    assert_ok(&seal(&env, "r1", &[]), "seal r1");
    assert_ok(&env.cli(&["sync"]), "sync (publishes the node status)");
    let primary_root = shared_s3().root.join(&env.bucket);
    let published: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            primary_root
                .join("base/_panoptic-sync/nodes")
                .join(format!("{}.json", env.node)),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(published["latest_runs"][0]["run"], "r1", "{published}");
    let secrets = [
        "acme/widgets",
        "feature/x",
        "0123456789abcdef0123456789abcdef01234567",
        "integration",
        "github.com/acme",
    ];
    let mut files = files_under(&primary_root);
    if env.nas.exists() {
        files.extend(files_under(&env.nas));
    }
    assert!(files.len() > 4, "{files:?}");
    for f in files {
        let data = std::fs::read(&f).unwrap();
        for s in secrets {
            assert!(
                !f.to_string_lossy().contains(s)
                    && !data.windows(s.len()).any(|w| w == s.as_bytes()),
                "{s:?} stored in the clear in {}",
                f.display()
            );
        }
    }
}

/// Appends a line to `path` every `every` for `times` times, on a thread of its own.
fn slow_writer(path: PathBuf, every: Duration, times: usize) -> std::thread::JoinHandle<u64> {
    use std::io::Write as _;
    std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        for i in 0..times {
            std::thread::sleep(every);
            writeln!(f, "line {i} of a slow job's log").unwrap();
        }
        std::fs::metadata(&path).unwrap().len()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_waits_for_a_file_still_being_written_or_fails_naming_it() {
    // Reproduced: sealing while a job still wrote `slow.log` sealed a 56-byte partial file
    // with no warning, and the run read "changed after seal" seconds later. The watch settles
    // files for 300 ms; the writer appends every 50 ms.
    let env = run_env();
    write_run(&env, "r1");
    env.write("r1/slow.log", b"started\n");
    let writer = slow_writer(env.watch.join("r1/slow.log"), Duration::from_millis(50), 20);
    assert_ok(&seal(&env, "r1", &[]), "seal r1 while slow.log is written");
    let final_size = writer.join().unwrap();
    let m = check_manifest(&env, "r1");
    let slow = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "slow.log")
        .unwrap();
    assert_eq!(
        slow["size"], final_size,
        "the whole file, not a part: {slow}"
    );
    assert_eq!(runs_json(&env)["r1"]["state"], "sealed");

    // A file still written when the timeout ends fails the seal, named.
    write_run(&env, "r2");
    env.write("r2/slow.log", b"started\n");
    let writer = slow_writer(
        env.watch.join("r2/slow.log"),
        Duration::from_millis(50),
        120,
    );
    let dir = env.watch.join("r2");
    let out = env.cli(&["seal", dir.to_str().unwrap(), "--timeout", "2s"]);
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("slow.log"), "{err}");
    assert_ne!(runs_json(&env)["r2"]["state"], "sealed", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_ends_quietly() {
    // Reproduced: `report --run X --json | head -1` panicked ("failed printing to stdout:
    // Broken pipe", exit 101). The manifest of 800 files is far larger than a pipe's buffer,
    // so the writer is still writing when the reader goes away.
    let env = run_env();
    for i in 0..800 {
        env.write(
            &format!("big/logs/{i:04}-a-rather-long-file-name-of-a-test.log"),
            b"x",
        );
    }
    assert_ok(&seal(&env, "big", &[]), "seal big");
    for args in [
        &["report", "--run", "big", "--json"][..],
        &["report", "--run", "big"][..],
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(env.config_path())
            .args(args)
            .env("PANOPTIC_SYNC_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 100];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: quietly: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_written_into_the_tree_after_the_seal_is_never_uploaded() {
    // Reproduced: `<run>/_run/manifest.json` written after the seal went through the pipeline
    // to the manifest's own key, overwrote the genuine one in both stores, and `restore --run`
    // then wrote another job's payload as `build.sh`.
    let env = encrypted_run_env();
    write_run(&env, "r1");
    assert_ok(&seal(&env, "r1", &[]), "seal r1");
    let stored = env
        .nas
        .join(format!("ci/{NODE}/r1/_run/manifest.json.zst.enc"));
    let genuine = std::fs::read(&stored).unwrap();
    env.write(
        "r1/_run/manifest.json",
        br#"{"format":1,"run":"r1","files":[]}"#,
    );
    env.write("r1/_run/index.html", b"<h1>forged page</h1>");
    assert_ok(
        &env.cli(&["sync"]),
        "sync with a forged manifest in the tree",
    );
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        genuine,
        "the manifest is untouched"
    );
    let names: Vec<String> = std::fs::read_dir(stored.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["manifest.json.zst.enc".to_string()],
        "nothing else in _run/"
    );
    let out = env.tmp.path().join("out");
    assert_ok(&restore_run(&env, "r1", Some("nas"), &out), "restore r1");
    let mut want = tree(&env.watch.join("r1"));
    want.retain(|k, _| !k.starts_with("_run/"));
    assert_eq!(tree(&out), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_object_at_a_manifests_key_never_passes_for_the_manifest() {
    // Reproduced: a file stored at `<run>/_run/manifest.json` with the node's own key was
    // accepted by `restore --run` as the run's manifest. Manifests have their own binding, so
    // even a file object written there by the node itself (here through a second
    // configuration whose watch maps onto the run's `_run/`) does not authenticate as one.
    let env = encrypted_run_env();
    write_run(&env, "r1");
    assert_ok(&seal(&env, "r1", &[]), "seal r1");
    let stored = env
        .nas
        .join(format!("ci/{NODE}/r1/_run/manifest.json.zst.enc"));

    // The independent decoder of docs/FORMAT.md reads the genuine manifest under the
    // manifest binding.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/format_decrypt.py");
    let key = env.tmp.path().join("key");
    let decode = |bound: &str| {
        std::process::Command::new("python3")
            .arg(&script)
            .arg(&key)
            .arg(bound)
            .stdin(std::fs::File::open(&stored).unwrap())
            .output()
            .unwrap()
    };
    let out = decode(&format!("ci/{NODE}/r1/_run/manifest.json.zst.enc"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["run"], "r1");

    let forged_tree = env.tmp.path().join("forged");
    std::fs::create_dir_all(&forged_tree).unwrap();
    // Padded so that it compresses, and lands at the genuine manifest's `.zst.enc` key.
    let mut forged = br#"{"format":1,"run":"r1","files":[]}"#.to_vec();
    forged.extend_from_slice(&[b' '; 8192]);
    std::fs::write(forged_tree.join("manifest.json"), forged).unwrap();
    let forged_config = env
        .config_text()
        .replace(
            &format!("path = \"{}\"", env.watch.display()),
            &format!("path = \"{}\"", forged_tree.display()),
        )
        .replace("prefix = \"ci/{node}\"", "prefix = \"ci/{node}/r1/_run\"")
        .replace("runs = \"dir\"", "")
        .replace(
            &format!("state_dir = \"{}\"", env.state.display()),
            &format!(
                "state_dir = \"{}\"",
                env.tmp.path().join("forged-state").display()
            ),
        );
    let forged_path = env.tmp.path().join("forged.toml");
    std::fs::write(&forged_path, forged_config).unwrap();
    let genuine = std::fs::read(&stored).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
        .arg("--config")
        .arg(&forged_path)
        .arg("sync")
        .output()
        .unwrap();
    assert_ok(&out, "sync of the forging configuration");
    assert_ne!(
        std::fs::read(&stored).unwrap(),
        genuine,
        "the object was replaced"
    );

    let to = env.tmp.path().join("out");
    let out = restore_run(&env, "r1", Some("nas"), &to);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused: {err}");
    assert!(
        err.contains("_run/manifest.json.zst.enc") && err.contains("another key"),
        "names the manifest and why: {err}"
    );
    assert!(!to.exists() || tree(&to).is_empty(), "nothing restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_seal_keeps_the_first_ci_context_and_a_link_to_a_run_is_refused() {
    // Reproduced: another job re-sealed a project's release run as a pull request, and
    // retention then deleted it; a seal through a symlinked path sealed the target run.
    let mut env = run_env();
    write_run(&env, "release");
    env.cmd_env = github_push_env("main");
    assert_ok(&seal(&env, "release", &[]), "first seal");
    env.write("release/logs/late.log", b"added later");
    env.cmd_env = github_env();
    assert_ok(
        &seal(&env, "release", &[]),
        "re-seal from a pull request's job",
    );
    let out = env.cli(&["report", "--run", "release", "--json"]);
    assert_ok(&out, "report --run");
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["ci"]["branch"], "main", "{}", m["ci"]);
    assert!(m["ci"]["pull_request"].is_null(), "{}", m["ci"]);
    assert!(
        m["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "logs/late.log"),
        "the re-seal lists the new file"
    );

    let link = env.tmp.path().join("link-to-release");
    std::os::unix::fs::symlink(env.watch.join("release"), &link).unwrap();
    let out = env.cli(&["seal", link.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_directory_exchanged_with_a_link_during_the_seal_is_not_sealed() {
    // Reproduced: a run directory exchanged with a symlink during `seal` gave exit 0 with a
    // manifest of 0 files. The writer keeps the seal waiting while the directory is swapped.
    let env = run_env();
    write_run(&env, "r1");
    env.write("r1/slow.log", b"started\n");
    let writer = slow_writer(env.watch.join("r1/slow.log"), Duration::from_millis(50), 40);
    let dir = env.watch.join("r1");
    let args = ["seal", dir.to_str().unwrap(), "--timeout", "60s"].map(str::to_string);
    let config = env.config_path();
    let sealing = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("PANOPTIC_SYNC_LOG", "warn")
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    let elsewhere = env.tmp.path().join("r1-elsewhere");
    std::fs::rename(&dir, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
    writer.join().unwrap();
    let out = sealing.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(!manifest_path(&env, "r1").exists(), "no manifest: {err}");
}

#[test]
fn seal_refuses_what_is_not_a_run_directory_with_exit_2() {
    let env = run_env();
    write_run(&env, "r");
    // Reproduced: a run named `-h` reached a notify command as an option.
    write_run(&env, "-h");
    let not_runs = [
        env.watch.clone(),
        env.watch.join("r/logs"),
        env.tmp.path().to_path_buf(),
        env.watch.join("-h"),
    ];
    for dir in not_runs {
        let out = env.cli(&["seal", dir.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Reproduced: a run named with a newline forged a line of `runs`; control characters
    // reached the terminal.
    env.write("nl\nrelease-1: sealed, 999 files\u{1b}[2J/x.log", b"x");
    // Such a name cannot be an object key: sync names it, escaped.
    let out = env.cli(&["sync"]);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !said.contains('\u{1b}') && said.contains("cannot be an object key"),
        "{said}"
    );
    let table = env.cli(&["runs"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(!table.contains("\nrelease-1"), "{table}");
    assert!(!table.contains('\u{1b}'), "{table}");
    assert!(table.contains("nl\\u{a}release-1"), "{table}");
    let plain = Env::new();
    std::fs::create_dir_all(plain.watch.join("r")).unwrap();
    let out = plain.cli(&["seal", plain.watch.join("r").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("runs = \"dir\""));
    let out = plain.cli(&["restore", "--run", "r", "--to", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Every `href="…"` and `src="…"` of a page, entity- and percent-decoded.
fn links_of(page: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["href=\"", "src=\""] {
        for (i, _) in page.match_indices(attr) {
            let rest = &page[i + attr.len()..];
            let raw = &rest[..rest.find('"').unwrap()];
            let unescaped = raw
                .replace("&quot;", "\"")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&");
            out.push(
                percent_encoding::percent_decode_str(&unescaped)
                    .decode_utf8()
                    .unwrap()
                    .into_owned(),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_page_in_the_file_store_shows_every_file_and_every_link_resolves() {
    let mut env = run_env();
    // Compression on, but the report's pages and styles keep their own names.
    env.pipeline =
        "[pipeline]\ncompression = \"zstd\"\nuncompressed = [\"*.html\", \"*.css\"]\n".into();
    env.cmd_env = github_env();
    let run = "run-7";
    write_run(&env, run);
    env.write(
        &format!("{run}/report/index.html"),
        b"<link rel=stylesheet href=\"style.css\"><a href=\"sub/case%201.html\">case</a>",
    );
    env.write(&format!("{run}/report/style.css"), b"h1{color:red}");
    env.write(&format!("{run}/report/sub/case 1.html"), b"<p>case 1</p>");
    env.write(
        &format!("{run}/logs/odd name #1 <b>.log"),
        "odd\n".repeat(2000).as_bytes(),
    );
    // A real PNG (1x1), previewed inline.
    env.write(
        &format!("{run}/shots/pixel.png"),
        &hex::decode(
            "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cfc0f01f0005000201e2b9e7430000000049454e44ae426082",
        )
        .unwrap(),
    );
    let out = seal(&env, run, &["--label", "suite=<e2e>"]);
    assert_ok(&out, "seal");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let page_key = format!("ci/{NODE}/{run}/index.html");
    assert!(stdout.contains(&format!("page: {page_key}")), "{stdout}");

    let page_path = env.nas.join(&page_key);
    let page = std::fs::read_to_string(&page_path).unwrap();
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http://"),
        "self-contained, relative links only"
    );
    assert!(
        !page.contains("<b>") && page.contains("&lt;e2e&gt;"),
        "escaped"
    );
    // Every link resolves to an object in the store (followed relative to the page).
    let links = links_of(&page);
    let files = tree(&env.watch.join(run));
    assert!(links.len() > files.len(), "{links:?}");
    let base = page_path.parent().unwrap();
    for link in links.iter().filter(|l| !l.starts_with("https://")) {
        assert!(base.join(link).is_file(), "{link} does not resolve");
    }
    // The report's own relative links work too: its files kept their names.
    assert!(base.join("report/style.css").is_file());
    assert!(base.join("report/sub/case 1.html").is_file());
    // Compressed files are linked under their stored names.
    assert!(links.iter().any(|l| l == "logs/test.log.zst"), "{links:?}");

    // Chromium shows every file (the rendered DOM) and the screenshot has content.
    let profile = env.tmp.path().join("chromium");
    let dom = chromium(
        &profile,
        &[
            "--dump-dom".into(),
            format!("file://{}", page_path.display()),
        ],
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    for path in files.keys() {
        let name = path
            .rsplit('/')
            .next()
            .unwrap()
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        assert!(dom.contains(&name), "{name} not on the page");
    }
    assert!(
        dom.contains("acme/widgets") && dom.contains("<img"),
        "{dom}"
    );
    let shot = env.tmp.path().join("page.png");
    chromium(
        &profile,
        &[
            format!("--screenshot={}", shot.display()),
            format!("file://{}", page_path.display()),
        ],
    );
    assert_screenshot_has_content(&shot, 20_000);

    // `url DIR` gives the page; `report --run` renders it and summarises the run.
    let dir = env.watch.join(run);
    let out = env.cli(&["url", dir.to_str().unwrap(), "--dest", "nas"]);
    assert_ok(&out, "url DIR");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("file://{}", page_path.display())
    );
    let local = env.tmp.path().join("local.html");
    let out = env.cli(&["report", "--run", run, "--html", local.to_str().unwrap()]);
    assert_ok(&out, "report --run --html");
    assert!(
        std::fs::read_to_string(&local)
            .unwrap()
            .contains("case 1.html")
    );
    let out = env.cli(&["report", "--run", run]);
    assert_ok(&out, "report --run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("github-actions") && text.contains("files"),
        "{text}"
    );
    let out = env.cli(&["report", "--run", "never-sealed"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// GitHub Actions' environment for a push to `branch`.
fn github_push_env(branch: &str) -> Vec<(String, String)> {
    github_env()
        .into_iter()
        .filter(|(k, _)| k != "GITHUB_HEAD_REF")
        .map(|(k, v)| match k.as_str() {
            "GITHUB_REF" => (k, format!("refs/heads/{branch}")),
            "GITHUB_REF_NAME" => (k, branch.to_string()),
            _ => (k, v),
        })
        .collect()
}

/// Every object key under `ci/<node>/<run>/` in the S3 bucket and in the file:// store.
fn run_objects(env: &Env, run: &str) -> (usize, usize) {
    let prefix = format!("ci/{NODE}/{run}/");
    let count = |m: BTreeMap<String, String>| m.keys().filter(|k| k.starts_with(&prefix)).count();
    (count(env.s3_objects(shared_s3())), count(env.nas_objects()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_run_keeps_exactly_what_each_rule_says_and_never_an_unsealed_run() {
    let mut env = run_env();
    env.tail = "[retention.runs]\nkeep_latest_per_branch = 1\npull_requests = \"1s\"\n".into();
    // Oldest first: two pushes to main, a tag, a pull request; one run never sealed.
    for (run, ci) in [
        ("main-1", github_push_env("main")),
        ("main-2", github_push_env("main")),
        ("tagged", gitlab_env()),
        ("pr", github_env()),
    ] {
        write_run(&env, run);
        env.cmd_env = ci;
        assert_ok(&seal(&env, run, &[]), run);
    }
    write_run(&env, "open");
    env.cmd_env.clear();
    assert_ok(&env.cli(&["sync"]), "sync");
    for run in ["main-1", "main-2", "tagged", "pr", "open"] {
        let (s3, nas) = run_objects(&env, run);
        assert!(s3 >= 4 && nas >= 4, "{run}: {s3} {nas}");
    }

    // The pull request expires one second after its seal: wait for the rule, not a clock.
    let mut listed = String::new();
    wait_until(
        Duration::from_secs(20),
        "the pull request to expire",
        || {
            let out = env.cli(&["prune", "--dry-run"]);
            listed = String::from_utf8_lossy(&out.stdout).to_string();
            listed.contains("run pr ")
        },
    )
    .await;
    let would: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.strip_prefix("would delete run "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(would, ["main-1", "pr"], "{listed}");
    assert!(
        listed.contains("not among the 1 newest runs of branch main"),
        "{listed}"
    );
    // A dry run deletes nothing.
    assert!(run_objects(&env, "main-1").0 > 0);

    let out = env.cli(&["prune"]);
    assert_ok(&out, "prune");
    for run in ["main-1", "pr"] {
        assert_eq!(run_objects(&env, run), (0, 0), "{run} deleted everywhere");
    }
    for run in ["main-2", "tagged", "open"] {
        let (s3, nas) = run_objects(&env, run);
        assert!(s3 >= 4 && nas >= 4, "{run} kept: {s3} {nas}");
    }
    // Pruned everywhere: listed as pruned (not open, not in every destination), not counted
    // open, refused by `seal` and by `url` with a message that says so, and a second prune
    // has nothing to do. Reproduced: the pruned runs read as "open, … in every destination",
    // counted in "runs open", and `seal` failed with a false "changed while being sealed".
    let runs = runs_json(&env);
    assert_eq!(runs["main-2"]["state"], "sealed");
    for run in ["main-1", "pr"] {
        assert_eq!(runs[run]["state"], "pruned", "{}", runs[run]);
        assert_eq!(runs[run]["complete"], false, "{}", runs[run]);
        assert!(
            runs[run]["pruned_ms"].as_i64().unwrap() > 0,
            "{}",
            runs[run]
        );
    }
    assert_eq!(env.status()["open_runs"], 1, "only the run never sealed");
    let out = seal(&env, "main-1", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("was pruned by retention"), "{err}");
    let dir = env.watch.join("pr");
    let out = env.cli(&["url", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("was pruned by retention"), "{err}");
    let table = env.cli(&["runs"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("main-1: pruned, ") && table.contains("deleted from every destination"),
        "{table}"
    );
    let out = env.cli(&["prune", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 runs, 0 objects"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cleanup_can_wait_for_a_runs_seal() {
    let mut env = run_env();
    env.tail =
        "[retention]\nlocal_delete_after_upload = true\nlocal_runs_sealed_only = true\n".into();
    write_run(&env, "waiting");
    write_run(&env, "sealed");
    let _daemon = env.spawn_run();
    // Both runs are everywhere; only the sealed one may go.
    assert_ok(
        &env.cli(&["flush", "--all-destinations", "--timeout", "60s"]),
        "flush",
    );
    assert!(env.watch.join("waiting/logs/test.log").exists());
    assert_ok(&seal(&env, "sealed", &[]), "seal");
    // Names only: a file may go between the listing and a read.
    let files_in = |dir: &Path| -> Vec<PathBuf> {
        walkdir::WalkDir::new(dir)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect()
    };
    let sealed = env.watch.join("sealed");
    // Cleanup passes run every 5 s and delete file by file: wait for the whole run to go. A
    // failure shows what the daemon said.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !files_in(&sealed).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the sealed run's files were not all deleted ({:?} left); daemon log:\n{}",
            files_in(&sealed),
            std::fs::read_to_string(env.tmp.path().join("daemon.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reproduced: an empty directory skeleton was left for every run. Once the sealed run's
    // files are gone, a later pass removes its empty directories too.
    wait_until(
        Duration::from_secs(30),
        "the sealed run's empty directories to go",
        || !sealed.exists(),
    )
    .await;
    // And it still reads as what it is: sealed, with the files its manifest holds (reproduced:
    // "0 files, 0 bytes" once cleanup had deleted them).
    let table = env.cli(&["runs"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("sealed: sealed, 4 files, ") && table.contains("(0 on disk)"),
        "{table}"
    );
    // Reproduced: `status` then read as if nothing was ever uploaded. It says what each
    // destination holds, deleted local copies included: both runs' 4 files.
    let held = env.status()["held"].clone();
    assert_eq!(held.as_array().unwrap().len(), 2, "{held}");
    for h in held.as_array().unwrap() {
        assert_eq!(h["objects"], 8, "{held}");
    }
    // The passes that deleted them saw the other run's files (stored earlier) and kept them.
    assert!(env.watch.join("waiting/logs/test.log").exists());
    assert!(env.watch.join("waiting/shots/a.png").exists());
    assert_eq!(tree(&env.watch.join("waiting")).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_after_seals_a_quiet_complete_run_by_itself() {
    let mut env = run_env();
    env.watch_extra = "runs = \"dir\"\nseal_after = \"2s\"\n".into();
    let port = free_port();
    env.tail = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    write_run(&env, "quiet");
    let _daemon = env.spawn_run();
    wait_until(Duration::from_secs(60), "the quiet run sealed", || {
        runs_json(&env)
            .get("quiet")
            .is_some_and(|r| r["state"] == "sealed")
    })
    .await;
    let m = check_manifest(&env, "quiet");
    assert!(m["ci"].is_null());
    assert!(
        env.nas
            .join(format!("ci/{NODE}/quiet/index.html"))
            .is_file()
    );

    // seal_after belongs to runs.
    let mut bad = Env::new();
    bad.watch_extra = "seal_after = \"2s\"\n".into();
    let out = bad.cli(&["check-config", "--offline"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("seal_after needs runs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_three_runs_each_share_one_bucket_and_one_backup() {
    let mut a = run_env();
    let mut b = run_env();
    b.bucket = a.bucket.clone();
    b.nas = a.nas.clone();
    b.node = "node-b".into();
    // Both nodes announce their seals to one loopback webhook receiver.
    let receiver = crate::notify::Receiver::start(0, 0);
    let hook = format!(
        "[[notify]]\nname = \"hook\"\nurl = \"{}\"\n",
        receiver.url()
    );
    a.tail = hook.clone();
    b.tail = hook;
    // Node a: GitHub Actions (pushes to main, then a pull request); node b: GitLab CI (a tag).
    for (on_a, run, ci) in [
        (true, "a-1", github_push_env("main")),
        (false, "b-1", gitlab_env()),
        (true, "a-2", github_push_env("main")),
        (false, "b-2", gitlab_env()),
        (true, "a-pr", github_env()),
        (false, "b-3", gitlab_env()),
    ] {
        let env = if on_a { &mut a } else { &mut b };
        write_run(env, run);
        env.cmd_env = ci;
        let out = seal(env, run, &[]);
        assert_ok(&out, run);
        // Sealed means every destination holds every file, and the manifest says so.
        let node = env.node.clone();
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.nas.join(format!("ci/{node}/{run}/_run/manifest.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(m["node"], node.as_str());
        let s3 = env.s3_objects(shared_s3());
        for f in m["files"].as_array().unwrap() {
            let key = f["stored_key"].as_str().unwrap();
            assert_eq!(
                s3.get(key).map(String::as_str),
                f["sha256"].as_str(),
                "{key}"
            );
            assert!(env.nas.join(key).is_file(), "{key}");
        }
        assert!(
            env.nas
                .join(format!("ci/{node}/{run}/index.html"))
                .is_file()
        );
    }
    assert_eq!(
        check_manifest(&a, "a-pr")["ci"]["pull_request"],
        "42",
        "the pull request run"
    );
    let tag = &check_manifest_of(&b, "b-3")["ci"];
    assert_eq!(tag["tag"], "v2.1.0");

    // Exactly one POST per seal, each naming its node and run, sent by `seal` itself.
    let mut posted: Vec<(String, String)> = receiver
        .delivered()
        .iter()
        .map(|h| {
            assert_eq!(
                h.body["page_key"],
                format!(
                    "ci/{}/{}/index.html",
                    h.body["node"].as_str().unwrap(),
                    h.body["run"].as_str().unwrap()
                )
            );
            (
                h.body["node"].as_str().unwrap().to_string(),
                h.body["run"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    posted.sort();
    let mut want: Vec<(String, String)> = ["a-1", "a-2", "a-pr"]
        .iter()
        .map(|r| (NODE.to_string(), r.to_string()))
        .chain(
            ["b-1", "b-2", "b-3"]
                .iter()
                .map(|r| ("node-b".to_string(), r.to_string())),
        )
        .collect();
    want.sort();
    assert_eq!(posted, want);
    assert_eq!(receiver.hits().len(), 6);

    // Each node restores its own runs exactly, from either store.
    for (env, run, from) in [(&a, "a-2", None), (&b, "b-1", Some("nas"))] {
        let to = env.tmp.path().join(format!("restored-{run}"));
        assert_ok(&restore_run(env, run, from, &to), run);
        assert_eq!(tree(&to), tree(&env.watch.join(run)), "{run}");
    }

    // Both publish their status; the fleet view lists each node's latest runs.
    a.cmd_env.clear();
    b.cmd_env.clear();
    assert_ok(&a.cli(&["sync"]), "sync a");
    assert_ok(&b.cli(&["sync"]), "sync b");
    let out = a.cli(&["report", "--fleet"]);
    assert_ok(&out, "report --fleet");
    let text = String::from_utf8_lossy(&out.stdout);
    for (node, run) in [
        (NODE, "a-pr"),
        (NODE, "a-1"),
        ("node-b", "b-3"),
        ("node-b", "b-1"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(node) && l.contains(run)),
            "{node} {run} missing from:\n{text}"
        );
    }
    // This node's report: sizes and durations of its runs, newest first.
    let out = a.cli(&["report", "--json"]);
    assert_ok(&out, "report --json");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs: Vec<&str> = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["run"].as_str().unwrap())
        .collect();
    assert_eq!(runs, ["a-pr", "a-2", "a-1"]);
    assert_eq!(r["runs"][1]["branch"], "main");
    assert_eq!(r["runs"][0]["files"], 4);
    assert!(r["runs"][0]["duration_secs"].as_u64().is_some());
}

/// The manifest of `run` as this env's node wrote it to the file:// store.
fn check_manifest_of(env: &Env, run: &str) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(
            env.nas
                .join(format!("ci/{}/{run}/_run/manifest.json", env.node)),
        )
        .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_being_sealed_shows_as_sealing_and_a_second_seal_is_refused() {
    // A primary that never answers: the seal waits (for its timeout) with the run's lock held.
    let mut env = Env::with_s3(&format!("http://127.0.0.1:{}", free_port()), "k", "s", None);
    env.watch_extra = "runs = \"dir\"\n".into();
    write_run(&env, "slow");
    let dir = env.watch.join("slow");
    let first = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(env.config_path())
            .args(["seal", dir.to_str().unwrap(), "--timeout", "120s"])
            .env("PANOPTIC_SYNC_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(30), "the run shown as sealing", || {
        runs_json(&env)
            .get("slow")
            .is_some_and(|r| r["state"] == "sealing")
    })
    .await;
    let out = env.cli(&["seal", dir.to_str().unwrap(), "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("being sealed by another process"),
        "{out:?}"
    );
    // The lock dies with its process, however it ends.
    drop(first);
    wait_until(Duration::from_secs(30), "the run open again", || {
        runs_json(&env)
            .get("slow")
            .is_some_and(|r| r["state"] == "open")
    })
    .await;
}

/// A run whose JUnit file has `checkout` failing (with a screenshot it names as an attachment
/// and a directory named after the test) or passing.
fn write_junit_run(env: &Env, run: &str, fail: bool) {
    write_run(env, run);
    let case = if fail {
        r#"<testcase classname="shop.Cart" name="checkout" time="1.5"><failure message="total was 0, see logs/checkout.log">at Cart.checkout</failure><system-out>[[ATTACHMENT|shots/checkout-fail.png]]</system-out></testcase>"#
    } else {
        r#"<testcase classname="shop.Cart" name="checkout" time="1.5"/>"#
    };
    env.write(
        &format!("{run}/junit.xml"),
        format!(r#"<testsuite name="shop">{case}<testcase classname="shop.Cart" name="adds" time="0.1"/></testsuite>"#).as_bytes(),
    );
    if fail {
        env.write(
            &format!("{run}/logs/checkout.log"),
            format!("{run}: total 0\n").as_bytes(),
        );
        env.write(
            &format!("{run}/shots/checkout-fail.png"),
            &[run.len() as u8; 3000],
        );
        env.write(
            &format!("{run}/artifacts/checkout/trace.zip"),
            run.as_bytes(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_failures_keeps_the_newest_failures_evidence_and_manifest_and_nothing_else() {
    let mut env = run_env();
    env.tail = "[retention.runs]\nkeep_latest_per_branch = 1\nkeep_failures = 3\n".into();
    env.cmd_env = github_push_env("main");
    // Five runs where `checkout` fails, then twenty where it passes, oldest first.
    let runs: Vec<String> = (0..25).map(|i| format!("r{i:02}")).collect();
    for (i, run) in runs.iter().enumerate() {
        write_junit_run(&env, run, i < 5);
        assert_ok(&seal(&env, run, &[]), run);
    }
    // The seal recorded each failure's evidence in the manifest.
    let m = check_manifest(&env, "r04");
    let f = &m["tests"]["failures"][0];
    assert_eq!(f["name"], "checkout");
    assert_eq!(
        f["evidence"],
        serde_json::json!([
            "artifacts/checkout/trace.zip",
            "logs/checkout.log",
            "shots/checkout-fail.png"
        ]),
        "{f}"
    );
    let before = (env.s3_objects(shared_s3()), env.nas_objects());

    let out = env.cli(&["prune"]);
    assert_ok(&out, "prune");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kept its manifest and the evidence"),
        "{text}"
    );
    let after = (env.s3_objects(shared_s3()), env.nas_objects());
    let kept_files = [
        "_run/manifest.json",
        "junit.xml",
        "artifacts/checkout/trace.zip",
        "logs/checkout.log",
        "shots/checkout-fail.png",
    ];
    for (name, before, after) in [("s3", &before.0, &after.0), ("nas", &before.1, &after.1)] {
        for run in &runs {
            let prefix = format!("ci/{NODE}/{run}/");
            let left: BTreeMap<&str, &String> = after
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?, v)))
                .collect();
            let had: BTreeMap<&str, &String> = before
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?, v)))
                .collect();
            match run.as_str() {
                // The three newest failures: their manifest and evidence, byte-identical.
                "r02" | "r03" | "r04" => {
                    let names: Vec<&str> = left.keys().copied().collect();
                    let mut want = kept_files.to_vec();
                    want.sort();
                    assert_eq!(names, want, "{name} {run}");
                    for (k, v) in &left {
                        assert_eq!(Some(v), had.get(k), "{name} {run}/{k} is unchanged");
                    }
                }
                // The newest run of the branch stays whole.
                "r24" => assert_eq!(left, had, "{name} {run}"),
                _ => assert!(left.is_empty(), "{name} {run}: {left:?}"),
            }
        }
    }
    // A second prune deletes nothing more; after newer failures push them out, the rest goes.
    assert_ok(&env.cli(&["prune"]), "prune again");
    assert_eq!(env.s3_objects(shared_s3()), after.0);
    for i in 25..28 {
        let run = format!("r{i:02}");
        write_junit_run(&env, &run, true);
        assert_ok(&seal(&env, &run, &[]), &run);
    }
    assert_ok(&env.cli(&["prune"]), "prune after newer failures");
    let s3 = env.s3_objects(shared_s3());
    for run in ["r02", "r03", "r04", "r24"] {
        let prefix = format!("ci/{NODE}/{run}/");
        assert!(
            !s3.keys().any(|k| k.starts_with(&prefix)),
            "{run} is gone once three newer failures exist"
        );
    }
    // The newest failure's page links its evidence; `report --test` names it.
    let page = std::fs::read_to_string(env.nas.join(format!("ci/{NODE}/r27/index.html"))).unwrap();
    assert!(page.contains("Evidence: "), "{page}");
    assert!(page.contains("href=\"shots/checkout-fail.png\""), "{page}");
    let out = env.cli(&["report", "--test", "shop.Cart::checkout"]);
    assert_ok(&out, "report --test");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("evidence: ci/{NODE}/r27/shots/checkout-fail.png")),
        "{text}"
    );
}

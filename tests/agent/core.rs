//! The core agent end to end: watch, index, dedup, upload to an S3 primary and a file://
//! backup, restart, outages, SIGTERM, hostile entries, configuration errors.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::util::*;

/// A CI-like job: logs written over seconds, reports renamed into place, a 30 MiB file,
/// duplicates, deep new directories, and temp files that must never be uploaded.
pub async fn write_ci_job(env: &Env, tag: &str) {
    let watch = env.watch.clone();
    let tag = tag.to_string();
    // Logs written slowly, the file kept open between writes.
    let slow = {
        let (watch, tag) = (watch.clone(), tag.clone());
        tokio::task::spawn_blocking(move || {
            let dir = watch.join(format!("{tag}/logs"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut files: Vec<_> = (0..4)
                .map(|i| std::fs::File::create(dir.join(format!("test-{i}.log"))).unwrap())
                .collect();
            for round in 0..6 {
                for (i, f) in files.iter_mut().enumerate() {
                    writeln!(
                        f,
                        "{tag} log {i} round {round}: {}",
                        "x".repeat(100 * round)
                    )
                    .unwrap();
                    f.flush().unwrap();
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let fast = tokio::task::spawn_blocking(move || {
        // Reports written to a temp name, then renamed into place.
        let reports = watch.join(format!("{tag}/reports"));
        std::fs::create_dir_all(&reports).unwrap();
        for i in 0..20 {
            let tmp = reports.join(format!("junit-{i}.xml.tmp"));
            std::fs::write(&tmp, format!("<testsuite name=\"{tag}-{i}\"/>")).unwrap();
            std::fs::rename(&tmp, reports.join(format!("junit-{i}.xml"))).unwrap();
        }
        // A temp file that stays: excluded.
        std::fs::write(reports.join("scratch.tmp"), b"never uploaded").unwrap();
        // A 30 MiB file (multipart upload).
        let mut big = vec![0u8; 30 * 1024 * 1024];
        fastrand::fill(&mut big);
        std::fs::write(watch.join(format!("{tag}/core.dump")), &big).unwrap();
        // Duplicates in several directories, with equal mtimes (a copy can carry them).
        for i in 0..15 {
            let d = watch.join(format!("{tag}/shards/{i}"));
            std::fs::create_dir_all(&d).unwrap();
            write_preserved(
                &d.join("screenshot.png"),
                b"same bytes in every shard",
                1_700_000_000,
            );
        }
        // Deep new directories, files written the moment they exist.
        let mut deep = watch.join(&tag);
        for level in 0..12 {
            deep = deep.join(format!("d{level}"));
            std::fs::create_dir_all(&deep).unwrap();
            std::fs::write(
                deep.join(format!("f{level}.txt")),
                format!("{tag} level {level}"),
            )
            .unwrap();
        }
        // Plenty of small files.
        for i in 0..40 {
            std::fs::write(
                watch.join(format!("{tag}/small-{i}.json")),
                format!("{{\"tag\":\"{tag}\",\"i\":{i}}}"),
            )
            .unwrap();
        }
    });
    slow.await.unwrap();
    fast.await.unwrap();
}

pub fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} exited {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_destinations_match(env: &Env, s3: &S3) {
    let expected = env.expected();
    assert!(
        expected.len() > 90,
        "the job wrote {} files",
        expected.len()
    );
    assert!(expected.keys().all(|k| !k.ends_with(".tmp")));
    assert_eq!(
        env.s3_objects(s3),
        expected,
        "S3 primary differs from the tree"
    );
    assert_eq!(
        env.nas_objects(),
        expected,
        "file:// backup differs from the tree"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_job_lands_identically_in_s3_and_file_backup_also_after_restart() {
    let env = Env::new();
    let daemon = Daemon::start(env.config());
    write_ci_job(&env, "job1").await;
    assert_ok(&flush_all(&env, "180s").await, "flush");
    assert_destinations_match(&env, shared_s3());
    daemon.stop().await.unwrap();

    // Written while the daemon was down: a second job, an overwritten file, a deleted file.
    write_ci_job(&env, "job2").await;
    env.write("job1/small-3.json", b"overwritten while down");
    std::fs::remove_file(env.watch.join("job1/small-4.json")).unwrap();
    let daemon = Daemon::start(env.config());
    assert_ok(&flush_all(&env, "180s").await, "flush after restart");
    daemon.stop().await.unwrap();

    let mut expected = env.expected();
    // Remote objects are never deleted because the local file was.
    expected.insert(
        format!("ci/{NODE}/job1/small-4.json"),
        sha_hex(b"{\"tag\":\"job1\",\"i\":4}"),
    );
    assert_eq!(env.s3_objects(shared_s3()), expected);
    assert_eq!(env.nas_objects(), expected);

    // Duplicates were placed by server-side copy, not uploaded again.
    let status = env.status();
    assert_eq!(status["destinations"][0]["pending"], 0);
    let copies = count_methods(&env, "copy");
    assert!(
        copies >= 28,
        "expected duplicates copied server-side, got {copies}"
    );
}

pub fn count_methods(env: &Env, method: &str) -> i64 {
    let conn = rusqlite::Connection::open(env.state.join("index.sqlite3")).unwrap();
    conn.query_row(
        "SELECT count(*) FROM uploads WHERE method = ?1",
        [method],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_alone_gives_the_same_result_and_rereads_nothing() {
    let env = Env::new();
    sync_twice_and_check(&env, "primary").await;
}

/// Write a CI job, sync it, check both destinations hold it exactly, then sync again and check
/// that `dest` had nothing more to store.
async fn sync_twice_and_check(env: &Env, dest: &str) {
    write_ci_job(env, "job").await;
    let out = env.cli(&["sync"]);
    assert_ok(&out, "sync");
    assert_destinations_match(env, shared_s3());

    let out = env.cli(&["sync"]);
    assert_ok(&out, "second sync");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{dest}: 0 stored, 0 missing")),
        "{text}"
    );
}

/// `sync = "batch"` on the `file://` backup: objects written without a sync each, made durable
/// by one `syncfs` per group, land exactly as with the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_backup_synced_in_batches_gets_every_file() {
    let mut env = Env::new();
    // Right after the backup's `url`: a key of its table.
    env.tail = "sync = \"batch\"\n".into();
    assert_eq!(
        env.config().destination[1].get_ref().sync,
        panoptic_sync::config::SyncMode::Batch
    );
    sync_twice_and_check(&env, "nas").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_is_down_at_first_catches_up_and_never_stalls_the_backup() {
    let port = free_port();
    let secret = "late-server-secret";
    let env = Env::with_s3(&format!("http://127.0.0.1:{port}"), KEY, secret, None);
    let daemon = Daemon::start(env.config());
    for i in 0..20 {
        env.write(&format!("r/{i}.log"), format!("line {i}").as_bytes());
    }
    // The backup gets everything while the primary refuses connections.
    wait_until(
        Duration::from_secs(60),
        "backup done and primary failing",
        || {
            let s = env.status();
            s["destinations"][1]["done"] == 20 && s["destinations"][0]["failing"].as_u64() > Some(0)
        },
    )
    .await;
    let s = env.status();
    let err = s["destinations"][0]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("ci/{NODE}/r/")),
        "error names the key: {err}"
    );

    let server = S3::spawn_with_secret(port, secret);
    server.create_bucket(&env.bucket);
    assert_ok(
        &flush_all(&env, "180s").await,
        "flush after the primary came back",
    );
    daemon.stop().await.unwrap();
    assert_eq!(env.s3_objects(&server), env.expected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_by_the_primary_is_reported_and_the_backup_still_gets_everything() {
    let s3 = shared_s3();
    let env = Env::with_s3(&s3.endpoint, &s3.key, "wrong-secret", Some(s3));
    let daemon = Daemon::start(env.config());
    env.write("a.log", b"a");
    env.write("b/c.log", b"c");
    wait_until(Duration::from_secs(60), "403 recorded as permanent", || {
        let s = env.status();
        s["destinations"][1]["done"] == 2 && s["destinations"][0]["failing"] == 2
    })
    .await;
    let s = env.status();
    let err = s["destinations"][0]["last_error"].as_str().unwrap();
    assert!(err.contains("403"), "{err}");
    daemon.stop().await.unwrap();
    // `flush` (primary only) cannot succeed: it exits non-zero at its timeout.
    let out = env.cli(&["flush", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_upload_exits_zero_commits_nothing_half_written_and_resumes() {
    let env = Env::new();
    let mut child = env.spawn_run();
    for i in 0..3 {
        let mut big = vec![0u8; 40 * 1024 * 1024];
        fastrand::fill(&mut big);
        env.write(&format!("big-{i}.bin"), &big);
    }
    for i in 0..30 {
        env.write(&format!("small/{i}.txt"), format!("{i}").as_bytes());
    }
    // Wait until work is queued but not finished, then SIGTERM.
    wait_until(Duration::from_secs(60), "uploads queued", || {
        let s = env.status();
        s["files"].as_u64() >= Some(1)
    })
    .await;
    let status = child.terminate().await;
    assert_eq!(status.code(), Some(0), "SIGTERM must exit 0");

    // Whatever is in the destinations is complete and correct.
    let expected = env.expected();
    for (k, v) in env.s3_objects(shared_s3()) {
        assert_eq!(
            expected.get(&k),
            Some(&v),
            "half-written or wrong object {k}"
        );
    }
    for (k, v) in env.nas_objects() {
        assert_eq!(expected.get(&k), Some(&v), "half-written or wrong file {k}");
    }
    // After a restart everything arrives.
    let daemon = Daemon::start(env.config());
    assert_ok(&flush_all(&env, "180s").await, "flush after restart");
    daemon.stop().await.unwrap();
    assert_eq!(env.s3_objects(shared_s3()), expected);
    assert_eq!(env.nas_objects(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwritten_file_ends_as_its_last_version_and_deleted_before_upload_never_appears() {
    let env = Env::new();
    let daemon = Daemon::start(env.config());
    env.write("report.html", b"version 1");
    assert_ok(&flush_all(&env, "60s").await, "flush v1");
    env.write("report.html", b"version 2, longer");
    // Written and deleted before it was ever closed: never complete, never uploaded.
    let doomed = env.watch.join("doomed.log");
    let mut f = std::fs::File::create(&doomed).unwrap();
    f.write_all(b"partial").unwrap();
    std::fs::remove_file(&doomed).unwrap();
    drop(f);
    assert_ok(&flush_all(&env, "60s").await, "flush v2");
    daemon.stop().await.unwrap();
    let expected = env.expected();
    assert_eq!(
        expected[&format!("ci/{NODE}/report.html")],
        sha_hex(b"version 2, longer")
    );
    assert_eq!(env.s3_objects(shared_s3()), expected);
    assert_eq!(env.nas_objects(), expected);
    let s = env.status();
    assert_eq!(s["destinations"][0]["pending"], 0);
    assert_eq!(s["destinations"][1]["pending"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_watch_root_is_waited_for() {
    let env = Env::new();
    std::fs::remove_dir(&env.watch).unwrap();
    let daemon = Daemon::start(env.config());
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.write("late/a/b/c.txt", b"root appeared later");
    env.write("top.txt", b"top");
    wait_until(
        Duration::from_secs(60),
        "files from the late root stored",
        || env.nas_objects().len() == 2,
    )
    .await;
    assert_ok(&flush_all(&env, "60s").await, "flush");
    daemon.stop().await.unwrap();
    assert_eq!(env.s3_objects(shared_s3()), env.expected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_fifos_sockets_and_bad_names_never_block_and_fail_alone() {
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    let outside = env.tmp.path().join("secret.txt");
    std::fs::write(&outside, b"outside the tree").unwrap();
    std::os::unix::fs::symlink(&outside, env.watch.join("link-out")).unwrap();
    std::os::unix::fs::symlink("/", env.watch.join("link-root")).unwrap();
    let fifo = std::ffi::CString::new(env.watch.join("pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let _sock = std::os::unix::net::UnixListener::bind(env.watch.join("sock")).unwrap();
    let bad = env
        .watch
        .join(std::ffi::OsStr::from_bytes(b"bad-\xff-name.log"));
    std::fs::write(&bad, b"not utf-8").unwrap();

    let daemon = Daemon::start(env.config());
    env.write("ok/one.txt", b"one");
    env.write("ok/two.txt", b"two");
    let out = flush_all(&env, "60s").await;
    // The bad name fails alone: flush says so and exits 1, everything else is stored.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
    daemon.stop().await.unwrap();

    let want: std::collections::BTreeMap<_, _> = [
        (format!("ci/{NODE}/ok/one.txt"), sha_hex(b"one")),
        (format!("ci/{NODE}/ok/two.txt"), sha_hex(b"two")),
    ]
    .into();
    assert_eq!(env.s3_objects(shared_s3()), want);
    assert_eq!(env.nas_objects(), want);
    let s = env.status();
    assert_eq!(s["destinations"][0]["failed_permanently"], 1);
}

#[test]
fn config_example_parses_and_passes_offline_check() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    panoptic_sync::Config::parse(&text, "config.example.toml").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
        .arg("--config")
        .arg(&path)
        .args(["check-config", "--offline"])
        .output()
        .unwrap();
    assert_ok(&out, "check-config --offline on config.example.toml");
}

#[test]
fn config_errors_exit_2_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[watch]]\npath = \"/a\"\nsettle = 5\n", "settle", "line 3"),
        (
            "[[watch]]\npath = \"/a\"\nsettle_ms = \"soon\"\n",
            "settle_ms",
            "line 3",
        ),
        ("[pipeline]\ncompression = \"lz5\"\n", "lz5", "line 2"),
        // Reproduced: the error quoted the line, and serde the value: a secret reached the
        // terminal and, on reload, the journal. The key and line are named, the value never.
        (
            "[[watch]]\npath = \"/a\"\n[[notify]]\nurl = \"https://h/x\"\nheaders = \"Bearer s3cr3t-t0ken\"\n",
            "headers",
            "line 5",
        ),
        (
            "[[watch]]\npath = \"/a\"\n[[destination]]\nname = \"x\"\nurl = \"ftp://h/p\"\n",
            "ftp",
            "line 5",
        ),
    ];
    for (text, word, line) in cases {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(&p)
            .args(["check-config", "--offline"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(word) && err.contains(line), "{text}: {err}");
        assert!(!err.contains("s3cr3t"), "{text}: {err}");
    }
    // A config file named explicitly must exist.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
        .args(["--config", "/nonexistent/panoptic.toml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/panoptic.toml"));
}

#[test]
fn check_config_probes_each_destination_and_names_the_one_that_fails() {
    let env = Env::new();
    let out = env.cli(&["check-config"]);
    assert_ok(&out, "check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("primary") && text.contains("reachable and writable"),
        "{text}"
    );
    // No probe object is left behind.
    assert!(env.s3_objects(shared_s3()).is_empty());

    let dead = Env::with_s3(&format!("http://127.0.0.1:{}", free_port()), KEY, "x", None);
    let out = dead.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"primary\""), "{err}");
}

#[test]
fn the_embedded_default_runs_with_no_setup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("artifacts")).unwrap();
    std::fs::write(dir.path().join("artifacts/hello.txt"), b"hello").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
        .current_dir(dir.path())
        .env_remove("PANOPTIC_SYNC_CONFIG")
        .arg("sync")
        .output()
        .unwrap();
    assert_ok(&out, "sync on the embedded default");
    let node = panoptic_sync::config::hostname().unwrap();
    let stored = dir
        .path()
        .join(format!(".panoptic-sync/store/{node}/hello.txt"));
    assert_eq!(std::fs::read(stored).unwrap(), b"hello");
}

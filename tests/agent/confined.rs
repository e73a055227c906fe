//! The watched tree is hostile (issue: nothing outside a watch root is ever read, uploaded or
//! deleted). Each escape that was reproduced against the agent is replayed here with local
//! cleanup on: not one byte from outside the roots reaches a destination, not one outside
//! file is deleted or changed, and every ordinary file still arrives (and is deleted locally).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::core::assert_ok;
use crate::util::*;

/// An outside tree whose every file has content no inside file has; returns its files'
/// contents by path.
fn outside_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for rel in ["secret", "a/secret", "a/b/secret", "ok", "sub/ok"] {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let data = format!("OUTSIDE {} {}", p.display(), fastrand::u64(..)).into_bytes();
        std::fs::write(&p, &data).unwrap();
        out.insert(p, data);
    }
    out
}

/// Every outside file is still there, unchanged.
fn assert_outside_intact(outside: &BTreeMap<PathBuf, Vec<u8>>) {
    for (p, data) in outside {
        assert_eq!(
            std::fs::read(p).ok().as_deref(),
            Some(&data[..]),
            "outside file {} was deleted or changed",
            p.display()
        );
    }
}

/// The content hashes in both destinations: the S3 bucket read from the server's own
/// directory (s3s-fs keeps each object as a file; reading every object through boto3 would
/// take minutes for thousands of objects), and the file:// store.
fn stored_hashes(env: &Env) -> BTreeSet<String> {
    let bucket = PathBuf::from(test_var("PANOPTIC_TEST_S3_ROOT")).join(&env.bucket);
    dir_objects(&bucket)
        .into_values()
        .chain(env.nas_objects().into_values())
        .collect()
}

/// Every outside file is still there, unchanged, and no destination holds its content.
fn assert_outside_untouched(env: &Env, outside: &BTreeMap<PathBuf, Vec<u8>>) {
    assert_outside_intact(outside);
    let stored = stored_hashes(env);
    for (p, data) in outside {
        assert!(
            !stored.contains(&sha_hex(data)),
            "outside file {} reached a destination",
            p.display()
        );
    }
    for key in dir_objects(&PathBuf::from(test_var("PANOPTIC_TEST_S3_ROOT")).join(&env.bucket))
        .keys()
        .chain(env.nas_objects().keys())
    {
        assert!(key.len() < 300, "runaway key {key}");
    }
}

fn cleanup_on(env: &mut Env) {
    env.tail
        .push_str("[retention]\nlocal_delete_after_upload = true\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_swaps_in_the_tree_never_read_upload_or_delete_outside_files() {
    let mut env = Env::new();
    cleanup_on(&mut env);
    let outside_dir = env.tmp.path().join("outside");
    let outside = outside_tree(&outside_dir);
    let mut daemon = env.spawn_run();
    let mut want: BTreeSet<String> = BTreeSet::new();
    let mut put = |env: &Env, rel: &str| {
        let data = format!("inside {rel} {}", fastrand::u64(..));
        env.write(rel, data.as_bytes());
        want.insert(sha_hex(data.as_bytes()));
    };
    put(&env, "plain/first.log");
    // 1. A new directory replaced by a symlink to an outside tree while the agent walks it
    //    again (it does at once, after 0.3 s and after 2 s).
    for i in 0..5 {
        let d = env.watch.join(format!("job{i}"));
        std::fs::create_dir_all(d.join("a")).unwrap();
        std::fs::write(d.join("a/tmp.out"), "short-lived").unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        symlink(&outside_dir, &d).unwrap();
    }
    // 2. An intermediate directory swapped for a symlink while a file in it settles: the
    //    outside tree has a file of the same name.
    {
        let d = env.watch.join("settle/a");
        std::fs::create_dir_all(&d).unwrap();
        let mut f = std::fs::File::create(d.join("secret")).unwrap();
        std::io::Write::write_all(&mut f, b"still being written").unwrap();
        std::fs::rename(&d, env.watch.join("settle/moved-away")).unwrap();
        symlink(outside_dir.join("a"), &d).unwrap();
        drop(f);
    }
    // 3. A symlink to the file:// store inside the tree, and one to the state directory.
    symlink(&env.nas, env.watch.join("store-link")).unwrap();
    symlink(&env.state, env.watch.join("state-link")).unwrap();
    put(&env, "plain/second.log");
    tokio::time::sleep(Duration::from_millis(100)).await;
    put(&env, "plain/third.log");
    // Everything ordinary arrives in both destinations and is then deleted locally.
    wait_until(
        Duration::from_secs(60),
        "ordinary files stored and cleaned up",
        || {
            let s3: BTreeSet<String> = env.s3_objects(shared_s3()).into_values().collect();
            let nas: BTreeSet<String> = env.nas_objects().into_values().collect();
            want.iter().all(|h| s3.contains(h) && nas.contains(h))
                && !env.watch.join("plain/first.log").exists()
                && !env.watch.join("plain/third.log").exists()
        },
    )
    .await;
    // Past every re-walk of the swapped directories (2 s) and a cleanup round (5 s).
    let settle_deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < settle_deadline {
        assert_outside_untouched(&env, &outside);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(daemon.terminate().await.success());
    assert_outside_untouched(&env, &outside);
    // The moved-away file (a real file in the tree) arrived too.
    let moved = env.watch.join("settle/moved-away/secret");
    assert!(
        !moved.exists()
            || env
                .nas_objects()
                .values()
                .any(|h| *h == sha_hex(b"still being written")),
        "an ordinary file in a renamed directory was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_root_replaced_by_a_symlink_is_not_followed_by_sync() {
    let mut env = Env::new();
    cleanup_on(&mut env);
    env.write("before.log", b"before the swap");
    assert_ok(&env.cli(&["sync"]), "first sync");
    let outside_dir = env.tmp.path().join("outside");
    let outside = outside_tree(&outside_dir);
    // `rm -rf artifacts && ln -s OUTSIDE artifacts`
    std::fs::remove_dir_all(&env.watch).unwrap();
    symlink(&outside_dir, &env.watch).unwrap();
    let out = env.cli(&["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "sync must fail: {err}");
    assert!(
        err.contains(env.watch.to_str().unwrap()) && err.contains("symbolic link"),
        "{err}"
    );
    assert_outside_untouched(&env, &outside);
    // Back to a real directory: synced again.
    std::fs::remove_file(&env.watch).unwrap();
    std::fs::create_dir(&env.watch).unwrap();
    env.write("after.log", b"after the swap");
    assert_ok(&env.cli(&["sync"]), "sync after the root is real again");
    assert!(
        env.s3_objects(shared_s3())
            .values()
            .any(|h| *h == sha_hex(b"after the swap"))
    );
}

/// The 20-second race: a directory that keeps receiving files is swapped with a symlink to an
/// outside tree (`renameat2(RENAME_EXCHANGE)`) in a loop while the daemon runs with local
/// cleanup on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_second_exchange_race_never_escapes_the_root() {
    let _heavy = heavy().await;
    use rustix::fs::{CWD, Mode, OFlags, RenameFlags, openat, renameat_with};
    let mut env = Env::new();
    cleanup_on(&mut env);
    let outside_dir = env.tmp.path().join("outside");
    let outside = outside_tree(&outside_dir);
    let race = env.watch.join("race");
    let link = env.watch.join("race-link");
    std::fs::create_dir_all(&race).unwrap();
    symlink(&outside_dir, &link).unwrap();
    // Each object stored is logged, for the diagnosis of a failure.
    env.cmd_env.push((
        "PANOPTIC_SYNC_LOG".into(),
        "info,panoptic_sync::upload=debug".into(),
    ));
    let mut daemon = env.spawn_run();
    let seconds: u64 = std::env::var("PANOPTIC_RACE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The writer writes through a handle on the real directory, wherever its name is now,
    // so every file it writes is an inside file. The handle is opened before the swapper
    // starts: opened by name once the swaps run, it may be the outside directory (the name
    // then being the symlink).
    let dir = openat(
        CWD,
        &race,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("f{i}.log");
                let data = format!("race file {i} {}", fastrand::u64(..));
                let fd = openat(
                    &dir,
                    name.as_str(),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o644),
                )
                .unwrap();
                rustix::io::write(&fd, data.as_bytes()).unwrap();
                written.push(sha_hex(data.as_bytes()));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            written
        })
    };
    let swapper = {
        let (stop, race, link) = (stop.clone(), race.clone(), link.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                renameat_with(CWD, &race, CWD, &link, RenameFlags::EXCHANGE).unwrap();
                swaps += 1;
                std::thread::yield_now();
            }
            swaps
        })
    };
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        assert_outside_intact(&outside);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    let swaps = swapper.join().unwrap();
    // Put the real directory back under its name, then everything it holds must arrive.
    if std::fs::symlink_metadata(&race).unwrap().is_symlink() {
        renameat_with(CWD, &race, CWD, &link, RenameFlags::EXCHANGE).unwrap();
    }
    // (index of the file written, missing from s3, missing from nas)
    let missing = || -> Vec<(usize, bool, bool)> {
        let bucket = PathBuf::from(test_var("PANOPTIC_TEST_S3_ROOT")).join(&env.bucket);
        let s3: BTreeSet<String> = dir_objects(&bucket).into_values().collect();
        let nas: BTreeSet<String> = env.nas_objects().into_values().collect();
        written
            .iter()
            .enumerate()
            .filter(|(_, h)| !s3.contains(*h) || !nas.contains(*h))
            .map(|(i, h)| (i, !s3.contains(h), !nas.contains(h)))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = missing();
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            panic!("{}", race_diagnosis(&env, &left, &written));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(daemon.terminate().await.success());
    assert_outside_untouched(&env, &outside);
    eprintln!(
        "exchange race: {swaps} swaps in {seconds} s, {} files written, all stored, nothing outside touched",
        written.len()
    );
}

fn check_config(env: &Env, text: &str) -> std::process::Output {
    let path = env.tmp.path().join("check.toml");
    std::fs::write(&path, text).unwrap();
    Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
        .args([
            "--config",
            path.to_str().unwrap(),
            "check-config",
            "--offline",
        ])
        .output()
        .unwrap()
}

#[test]
fn overlapping_watches_and_own_directories_inside_a_root_are_refused_by_name_and_line() {
    let env = Env::new();
    let w = env.watch.display().to_string();
    let other = env.tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let o = other.display().to_string();
    let state = env.state.display().to_string();
    let store = env.nas.display().to_string();
    let cases = [
        (
            format!(
                "state_dir = \"{state}\"\n[[watch]]\npath = \"{w}\"\nprefix = \"ci\"\n[[watch]]\npath = \"{o}\"\nprefix = \"ci\"\n[[destination]]\nname = \"d\"\nurl = \"file://{store}\"\n"
            ),
            vec!["watch[0] (line 2)", "watch[1] (line 5)", "\"ci\""],
        ),
        (
            format!(
                "state_dir = \"{state}\"\n[[watch]]\npath = \"{w}\"\nprefix = \"ci/n\"\n[[watch]]\npath = \"{w}/sub\"\nprefix = \"ci/n/sub\"\n[[destination]]\nname = \"d\"\nurl = \"file://{store}\"\n"
            ),
            vec!["watch[0] (line 2)", "watch[1] (line 5)", "\"ci/n/sub\""],
        ),
        (
            format!(
                "state_dir = \"{w}/.state\"\n[[watch]]\npath = \"{w}\"\n[[destination]]\nname = \"d\"\nurl = \"file://{store}\"\n"
            ),
            vec!["watch[0].path", "(line 2)", "state_dir", "(line 1)"],
        ),
        (
            format!(
                "state_dir = \"{state}\"\n[[watch]]\npath = \"{w}\"\n[[destination]]\nname = \"d\"\nurl = \"file://{o}\"\n[[destination]]\nname = \"inside\"\nurl = \"file://{w}/store\"\n"
            ),
            vec![
                "watch[0].path",
                "(line 2)",
                "destination \"inside\" (line 7)",
            ],
        ),
    ];
    for (text, needles) in cases {
        let out = check_config(&env, &text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}\n{err}");
        for n in needles {
            assert!(err.contains(n), "{n:?} missing from: {err}");
        }
    }
    // A symlinked path to the same tree is caught too (roots are resolved first).
    let alias = env.tmp.path().join("alias");
    symlink(&env.watch, &alias).unwrap();
    let text = format!(
        "state_dir = \"{}/st\"\n[[watch]]\npath = \"{w}\"\n[[destination]]\nname = \"d\"\nurl = \"file://{store}\"\n",
        alias.display()
    );
    assert_eq!(check_config(&env, &text).status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_watch_keeps_its_own_files_and_its_own_retention() {
    let mut env = Env::new();
    let keep = env.watch.join("keep");
    std::fs::create_dir_all(&keep).unwrap();
    // The parent expires everything after a second; the nested watch keeps 1000 days.
    env.watch_extra = format!(
        "remote_max_age = \"1s\"\n\n[[watch]]\npath = \"{}\"\nprefix = \"kept/{{node}}\"\nremote_max_age = \"1000d\"\n",
        keep.display()
    );
    env.write("gone.log", b"expires");
    env.write("keep/kept.log", b"kept for 1000 days");
    assert_ok(&env.cli(&["sync"]), "sync");
    let keys: BTreeSet<String> = env.s3_objects(shared_s3()).into_keys().collect();
    let node = NODE;
    assert!(keys.contains(&format!("ci/{node}/gone.log")), "{keys:?}");
    assert!(keys.contains(&format!("kept/{node}/kept.log")), "{keys:?}");
    // The parent does not upload the nested root's files under its own prefix.
    assert!(
        !keys.contains(&format!("ci/{node}/keep/kept.log")),
        "{keys:?}"
    );
    // Once the parent's objects are older than a second (in both destinations: each has its
    // own upload time), prune removes them and only them.
    wait_until(
        Duration::from_secs(20),
        "the parent's objects expired",
        || {
            let out = env.cli(&["prune", "--dry-run"]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("gone.log"))
                .count()
                == 2
        },
    )
    .await;
    assert_ok(&env.cli(&["prune"]), "prune");
    let keys: BTreeSet<String> = env.s3_objects(shared_s3()).into_keys().collect();
    assert!(!keys.contains(&format!("ci/{node}/gone.log")), "{keys:?}");
    assert!(keys.contains(&format!("kept/{node}/kept.log")), "{keys:?}");
    let nas = env.nas_objects();
    assert!(
        nas.contains_key(&format!("kept/{node}/kept.log")),
        "{nas:?}"
    );
}

#[test]
fn a_fresh_state_directory_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = Env::new();
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"file://{}\"\n",
        env.tmp.path().join("primary").display()
    ));
    env.write("a.log", b"a");
    let out = Command::new("sh")
        .args([
            "-c",
            "umask 000; exec \"$0\" --config \"$1\" sync",
            env!("CARGO_BIN_EXE_panoptic-sync"),
            env.config_path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&out, "sync under umask 000");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&env.state), 0o700, "state directory");
    for name in [
        "index.sqlite3",
        "lock",
        "index.sqlite3-wal",
        "index.sqlite3-shm",
    ] {
        let p = env.state.join(name);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{name}");
        }
    }
    assert_eq!(mode(&env.state.join("index.sqlite3")), 0o600);
}

/// What the index and the daemon's log say of the race's files still missing (a failure of
/// the exchange race is otherwise a bare timeout).
fn race_diagnosis(env: &Env, left: &[(usize, bool, bool)], hashes: &[String]) -> String {
    let written = hashes.len();
    use std::fmt::Write;
    let mut out = format!(
        "timed out waiting for: every file written during the race stored in both destinations\n\
         {} of {written} missing ({} from s3, {} from nas)\n",
        left.len(),
        left.iter().filter(|m| m.1).count(),
        left.iter().filter(|m| m.2).count()
    );
    let conn = rusqlite::Connection::open_with_flags(
        env.state.join("index.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    );
    for (i, s3, nas) in left.iter().take(5) {
        let name = format!("f{i}.log");
        let on_disk = env.watch.join("race").join(&name).exists();
        let _ = writeln!(
            out,
            "{name}: content {}, missing from s3 {s3}, from nas {nas}; on disk under race/ {on_disk}",
            hashes[*i]
        );
        let Ok(conn) = &conn else { continue };
        let pattern = format!("%/{name}");
        let mut rows = conn
            .prepare(
                "SELECT f.path, f.gen, u.dest, u.state, u.gen, u.attempts, u.last_error
                 FROM files f LEFT JOIN uploads u ON u.file_id = f.id
                 WHERE CAST(f.path AS TEXT) LIKE ?1",
            )
            .unwrap();
        let found = rows
            .query_map([&pattern], |r| {
                Ok(format!(
                    "  row {} gen {}: {:?} state {:?} gen {:?} attempts {:?} error {:?}",
                    String::from_utf8_lossy(&r.get::<_, Vec<u8>>(0)?),
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<String>>(6)?
                ))
            })
            .unwrap()
            .filter_map(Result::ok)
            .collect::<Vec<_>>();
        if found.is_empty() {
            out.push_str("  not in the index\n");
        }
        for f in found {
            let _ = writeln!(out, "{f}");
        }
        let mut objects = conn
            .prepare(
                "SELECT dest, key, stored_key, hex(sha256), stored_ms FROM objects
                 WHERE key LIKE ?1",
            )
            .unwrap();
        for o in objects
            .query_map([&pattern], |r| {
                Ok(format!(
                    "  object {}: {} stored as {} content {} at {}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?.to_lowercase(),
                    r.get::<_, i64>(4)?
                ))
            })
            .unwrap()
            .filter_map(Result::ok)
        {
            let _ = writeln!(out, "{o}");
        }
        let bucket = PathBuf::from(test_var("PANOPTIC_TEST_S3_ROOT")).join(&env.bucket);
        for (key, sha) in dir_objects(&bucket) {
            if key.ends_with(&format!("/{name}")) {
                let _ = writeln!(out, "  in the bucket: {key} content {sha}");
            }
        }
        let log = std::fs::read_to_string(env.tmp.path().join("daemon.log")).unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| l.contains(&format!("/{name}")))
            .take(20)
        {
            let _ = writeln!(out, "  log: {l}");
        }
    }
    for entry in std::fs::read_dir(&env.watch)
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        let kind = std::fs::symlink_metadata(&path).map(|m| m.file_type());
        let files = std::fs::read_dir(&path).map(|d| d.count()).unwrap_or(0);
        let _ = writeln!(
            out,
            "watch/{}: {kind:?}, {files} entries through it",
            entry.file_name().to_string_lossy()
        );
    }
    let log = std::fs::read_to_string(env.tmp.path().join("daemon.log")).unwrap_or_default();
    let _ = writeln!(out, "daemon log, first 30 lines:");
    for l in log.lines().take(30) {
        let _ = writeln!(out, "  {l}");
    }
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("scan"))
        .collect();
    let _ = writeln!(out, "daemon log, warnings, errors and scans (last 40):");
    for l in &notable[notable.len().saturating_sub(40)..] {
        let _ = writeln!(out, "  {l}");
    }
    out
}

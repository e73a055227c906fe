//! Trying hard to lose a file: `kill -9` at random moments during an encrypted, compressed
//! upload; a primary that hangs (process stopped); a corrupted index. Afterwards every
//! destination must restore byte-identical to the tree, `verify --deep` must be clean and
//! the index must pass `PRAGMA integrity_check`.
//!
//! `PANOPTIC_CRASH_SEED` replays a run; `PANOPTIC_CRASH_FILES` and `PANOPTIC_CRASH_KILLS`
//! size it (scripts/reliability runs a longer version).

use std::time::Duration;

use crate::core::assert_ok;
use crate::util::*;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn encrypted(env: &mut Env) {
    let key = env.keygen("key");
    env.pipeline = format!(
        "[pipeline]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nkey_file = \"{}\"\n",
        key.display()
    );
}

fn restore_matches(env: &Env, dest: &str) {
    let to = env.tmp.path().join(format!("restored-{dest}"));
    let out = env.cli(&[
        "restore",
        "--from",
        dest,
        "--to",
        to.to_str().unwrap(),
        "--prefix",
        &format!("ci/{}", env.node),
    ]);
    assert_ok(&out, "restore");
    assert_eq!(tree(&to), tree(&env.watch), "restore from {dest} differs");
}

fn integrity_ok(env: &Env) {
    let conn = rusqlite::Connection::open(env.state.join("index.sqlite3")).unwrap();
    let r: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(r, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_random_kill_9s() {
    let seed = env_num("PANOPTIC_CRASH_SEED", fastrand::u64(..));
    let files = env_num("PANOPTIC_CRASH_FILES", 1500);
    let kills = env_num("PANOPTIC_CRASH_KILLS", 20);
    eprintln!("crash suite: PANOPTIC_CRASH_SEED={seed} files={files} kills={kills}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut env = Env::new();
    encrypted(&mut env);
    let mut written = 0u64;
    let mut write_some = |env: &Env, rng: &mut fastrand::Rng, n: u64| {
        for _ in 0..n {
            let dir = rng.u32(0..40);
            let text: String = (0..rng.usize(1..60))
                .map(|l| format!("seed {seed} file {written} line {l}\n"))
                .collect();
            env.write(&format!("d{dir}/f{written}.log"), text.as_bytes());
            written += 1;
        }
    };
    write_some(&env, &mut rng, files * 2 / 3);
    // A few large incompressible files: kills land mid-multipart.
    for i in 0..3 {
        let mut big = vec![0u8; (17 + i) << 20];
        rng.fill(&mut big);
        env.write(&format!("big/{i}.bin"), &big);
    }
    for k in 0..kills {
        let child = env.spawn_run();
        tokio::time::sleep(Duration::from_millis(rng.u64(50..1500))).await;
        // SAFETY: killing our own child.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGKILL) };
        drop(child);
        // The tree keeps changing between crashes: new files, and overwrites.
        if k % 3 == 0 {
            write_some(&env, &mut rng, files / (3 * kills.max(1) / 3).max(1));
            env.write("big/0.bin", format!("overwritten at kill {k}").as_bytes());
        }
    }
    let mut child = env.spawn_run();
    let out = flush_all(&env, "600s").await;
    assert!(
        out.status.success(),
        "seed {seed}: flush failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let _ = child.0.wait();
    integrity_ok(&env);
    assert_ok(&env.cli(&["verify", "--deep"]), "verify --deep");
    restore_matches(&env, "primary");
    restore_matches(&env, "nas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_never_stalls_the_backup_and_drains_after() {
    let port = free_port();
    let server = S3::spawn_with_secret(port, "hung-secret");
    let mut env = Env::with_s3(
        &format!("http://127.0.0.1:{port}"),
        KEY,
        "hung-secret",
        Some(&server),
    );
    encrypted(&mut env);
    // Short request timeouts, so a hung server costs seconds per attempt, not minutes.
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"s3://{}/base\"\noptions = {{ endpoint = \"http://127.0.0.1:{port}\", allow_http = \"true\", access_key_id = \"{KEY}\", secret_access_key = \"hung-secret\", region = \"us-east-1\", metadata_endpoint = \"http://127.0.0.1:9\", timeout = \"3s\", connect_timeout = \"2s\" }}\n",
        env.bucket
    ));
    let server_pid = server.pid();
    // SAFETY: stopping our own child: it accepts connections and never answers.
    unsafe { libc::kill(server_pid as i32, libc::SIGSTOP) };
    let mut child = env.spawn_run();
    for i in 0..200 {
        env.write(
            &format!("h/{i}.log"),
            format!("hung {i}\n").repeat(20).as_bytes(),
        );
    }
    let started = std::time::Instant::now();
    wait_until(
        Duration::from_secs(120),
        "the backup receives everything while the primary hangs",
        || {
            let s = env.status();
            s["destinations"][1]["done"] == 200
        },
    )
    .await;
    let backup_secs = started.elapsed().as_secs_f64();
    assert_eq!(env.status()["destinations"][0]["done"], 0);
    eprintln!("backup complete {backup_secs:.1} s into the primary's outage");
    // SAFETY: resuming our own child.
    unsafe { libc::kill(server_pid as i32, libc::SIGCONT) };
    assert_ok(
        &flush_all(&env, "300s").await,
        "flush after the primary recovered",
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let _ = child.0.wait();
    restore_matches(&env, "primary");
    restore_matches(&env, "nas");
}

#[test]
fn a_corrupted_index_is_a_clear_error_naming_the_file() {
    let env = Env::new();
    env.write("a.txt", b"a");
    assert_ok(&env.cli(&["sync"]), "sync");
    let db = env.state.join("index.sqlite3");
    let _ = std::fs::remove_file(env.state.join("index.sqlite3-wal"));
    let _ = std::fs::remove_file(env.state.join("index.sqlite3-shm"));
    std::fs::write(&db, vec![0x5a; 64 * 1024]).unwrap();
    for cmd in [&["status"][..], &["sync"][..]] {
        let out = env.cli(cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(db.to_str().unwrap()), "{cmd:?}: {err}");
        assert!(err.contains("not a database"), "{cmd:?}: {err}");
    }
}

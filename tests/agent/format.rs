//! Issue 13: the layout is injective and every name round-trips with its own mode and mtime;
//! a crafted bucket is refused by name; a restore stays inside `--to` while a directory is
//! swapped for a symlink under it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use crate::core::assert_ok;
use crate::restore::encrypted_env;
use crate::util::*;

/// A file of the round-trip tree: content, mode, mtime (seconds since the epoch).
struct Spec {
    name: String,
    data: Vec<u8>,
    mode: u32,
    mtime: u64,
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn tricky_tree() -> Vec<Spec> {
    let text = |tag: &str| -> Vec<u8> {
        (0..400)
            .map(|i| format!("{tag} line {i} of a log\n"))
            .collect::<String>()
            .into_bytes()
    };
    let long = format!("{}.txt", "L".repeat(251));
    assert_eq!(long.len(), 255);
    let mut specs = vec![
        ("report.tar.gz", gzip(&text("report")), 0o644),
        ("plain.txt", text("plain"), 0o644),
        ("plain.txt.gz", text("not gzip at all"), 0o640),
        (
            "core.zst",
            zstd::bulk::compress(&text("core"), 3).unwrap(),
            0o600,
        ),
        ("notes.enc", text("notes"), 0o644),
        ("empty", Vec::new(), 0o644),
        ("one", b"1".to_vec(), 0o644),
        (long.as_str(), text("long"), 0o644),
        ("bin/run.sh", b"#!/bin/sh\necho hi\n".to_vec(), 0o755),
        ("dup/a.bin", text("same"), 0o644),
        ("dup/b.bin", text("same"), 0o644),
        ("naïve résumé.txt", text("accents"), 0o644),
        ("日本語/ログ.log", text("cjk"), 0o644),
        // A file store's staging form (object_store refused to write it as-is) and its escape.
        ("x/weird#1", text("hash"), 0o644),
        ("x/weird#1.asis", b"escaped".to_vec(), 0o644),
    ]
    .into_iter()
    .map(|(n, d, m)| (n.to_string(), d, m))
    .collect::<Vec<_>>();
    // A name that stays long inside a directory.
    specs.push((format!("deep/{}", "é".repeat(127)), text("deep"), 0o644));
    specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, data, mode))| Spec {
            name,
            data,
            mode,
            mtime: 1_600_000_000 + 1000 * i as u64,
        })
        .collect()
}

fn write_tree(env: &Env, specs: &[Spec]) {
    for s in specs {
        let p = env.write(&s.name, &s.data);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(s.mode)).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(s.mtime))
            .unwrap();
    }
}

/// Every file under `dir`, by relative path: (content, mode, mtime seconds).
fn full_tree(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32, i64)> {
    tree(dir)
        .into_iter()
        .map(|(k, v)| {
            let m = std::fs::metadata(dir.join(&k)).unwrap();
            (k, (v, m.mode() & 0o777, m.mtime()))
        })
        .collect()
}

fn restore_to(env: &Env, from: &str, to: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "restore",
        "--from",
        from,
        "--to",
        to.to_str().unwrap(),
        "--prefix",
        "ci/test-node",
    ];
    args.extend_from_slice(extra);
    env.cli(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_name_round_trips_with_its_mode_and_mtime_in_every_configuration() {
    let specs = tricky_tree();
    let pipelines = [
        ("none", String::new()),
        ("gzip", "[pipeline]\ncompression = \"gzip\"\n".to_string()),
        ("zstd", "[pipeline]\ncompression = \"zstd\"\n".to_string()),
        ("zstd+aes", "encrypted".to_string()),
    ];
    for (what, pipeline) in pipelines {
        let mut env = Env::new();
        env.pipeline = if pipeline == "encrypted" {
            let key = env.keygen("key");
            format!(
                "[pipeline]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nkey_file = \"{}\"\n",
                key.display()
            )
        } else {
            pipeline
        };
        write_tree(&env, &specs);
        let want = full_tree(&env.watch);
        assert_eq!(want.len(), specs.len());
        assert_ok(&env.cli(&["sync"]), &format!("sync ({what})"));

        // Exactly one object per file in each destination.
        let s3 = env.s3_objects(shared_s3());
        assert_eq!(s3.len(), specs.len(), "{what}: S3 holds {s3:#?}");
        let nas: Vec<String> = env.nas_objects().into_keys().collect();
        assert_eq!(nas.len(), specs.len(), "{what}: file:// holds {nas:#?}");

        // Restore needs only the destination and the key file.
        std::fs::remove_dir_all(&env.state).unwrap();
        for dest in ["primary", "nas"] {
            let to = env.tmp.path().join(format!("restored-{dest}"));
            assert_ok(
                &restore_to(&env, dest, &to, &[]),
                &format!("restore {what} from {dest}"),
            );
            let got = full_tree(&to);
            for (name, (data, mode, mtime)) in &want {
                let Some((gdata, gmode, gmtime)) = got.get(name) else {
                    panic!("{what}/{dest}: {name} not restored; got {:?}", got.keys());
                };
                assert!(gdata == data, "{what}/{dest}: {name} differs");
                assert_eq!(gmode, mode, "{what}/{dest}: mode of {name}");
                assert_eq!(gmtime, mtime, "{what}/{dest}: mtime of {name}");
            }
            assert_eq!(got.len(), want.len(), "{what}/{dest}: {:?}", got.keys());
        }
    }
}

fn failed_lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("failed: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_bucket_is_refused_by_name_while_every_genuine_file_restores() {
    let (env, key_file) = encrypted_env();
    let s3 = shared_s3();
    let log = |tag: &str| -> Vec<u8> {
        (0..300)
            .map(|i| format!("{tag} {i}\n"))
            .collect::<String>()
            .into_bytes()
    };
    env.write("a.log", &log("genuine a"));
    env.write("b.log", &log("genuine b"));
    env.write("c.log", &log("genuine c"));
    env.write("old.log", &log("version one"));
    assert_ok(&env.cli(&["sync"]), "sync");
    let bucket_key = |k: &str| format!("base/ci/{NODE}/{k}");
    let dump = env.tmp.path().join("dump");
    s3.dump(&env.bucket, "base/", &dump);
    let v1 = std::fs::read(dump.join(bucket_key("old.log.zst.enc"))).unwrap();
    // A newer version of old.log replaces the first one.
    env.write("old.log", &log("version two, newer"));
    assert_ok(&env.cli(&["sync"]), "sync of the newer version");

    // 1. Plaintext planted next to the genuine objects (one replacing a.log by name).
    s3.put_raw(&env.bucket, &bucket_key("a.log"), b"planted plaintext");
    s3.put_raw(&env.bucket, &bucket_key("planted.sh"), b"rm -rf ~\n");
    // 2. A ciphertext copied over another object: b's object under c's key.
    let b = std::fs::read(dump.join(bucket_key("b.log.zst.enc"))).unwrap();
    s3.put_raw(&env.bucket, &bucket_key("c.log.zst.enc"), &b);
    // 3. A zstd bomb: 256 MiB of zeros in a few KB, planted as plaintext...
    let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 19).unwrap();
    assert!(bomb.len() < 64 * 1024);
    s3.put_raw(&env.bucket, &bucket_key("bomb.log.zst"), &bomb);
    // ... and sealed by someone holding the key, with a record that says 100 bytes.
    let key = panoptic_sync::crypto::MasterKey::load(&key_file).unwrap();
    let pipeline = panoptic_sync::pipeline::Pipeline {
        compression: panoptic_sync::format::layout::Compression::Zstd,
        level: 3,
        key: Some(key.clone()),
        keys: vec![key],
        uncompressed: Default::default(),
        legacy_manifests: false,
        dedup_key: None,
    };
    let meta = panoptic_sync::pipeline::Meta {
        size: 100,
        mtime_ns: 0,
        sha256: "00".repeat(32),
        mode: Some(0o644),
        path: Some(format!("ci/{NODE}/sealed-bomb.log")),
    };
    let sealed_key = format!("ci/{NODE}/sealed-bomb.log.zst.enc");
    let buf = SharedBuf::default();
    // Encrypt the bomb's frame as the payload (the encoder would compress again).
    let stored = panoptic_sync::format::layout::Plan {
        compression: panoptic_sync::format::layout::Compression::None,
        encrypt: true,
    };
    let mut w = panoptic_sync::pipeline::encoder(
        &pipeline,
        stored,
        &meta,
        &sealed_key,
        Box::new(buf.clone()),
    )
    .unwrap();
    w.write_all(&bomb).unwrap();
    w.finish().unwrap();
    s3.put_raw(
        &env.bucket,
        &format!("base/{sealed_key}"),
        &buf.0.lock().unwrap(),
    );
    // 4. An older version replayed under its own key.
    s3.put_raw(&env.bucket, &bucket_key("old.log.zst.enc"), &v1);
    // 5. A key with a ".." segment: s3s-fs keeps objects as files under a directory and
    //    refuses such keys, so it cannot be planted here (restore's unit test covers it).

    let to = env.tmp.path().join("restored");
    let out = restore_to(&env, "primary", &to, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = failed_lines(&out);
    for planted in [
        "a.log",
        "planted.sh",
        "c.log.zst.enc",
        "bomb.log.zst",
        "sealed-bomb.log.zst.enc",
    ] {
        assert!(
            failed.iter().any(|l| l.contains(&bucket_key(planted))),
            "{planted} not refused by name: {failed:#?}"
        );
    }
    assert_eq!(failed.len(), 5, "{failed:#?}");
    let got = tree(&to);
    assert_eq!(got["a.log"], log("genuine a"), "the genuine a.log wins");
    assert_eq!(got["b.log"], log("genuine b"));
    assert!(!got.contains_key("c.log") && !got.contains_key("planted.sh"));
    assert!(!got.contains_key("bomb.log") && !got.contains_key("sealed-bomb.log"));
    // The replayed older version cannot be told from the object alone (docs/FORMAT.md): it
    // restores as what it is, with its own older content; verify against the index sees it.
    assert_eq!(got["old.log"], log("version one"));
    let verify = env.cli(&["verify", "--dest", "primary"]);
    assert_eq!(verify.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&verify.stderr).contains("old.log.zst.enc"));
    // Nothing but the restored files (no temporary files left behind).
    let names: Vec<String> = walkdir::WalkDir::new(&to)
        .into_iter()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with(".psr-")), "{names:?}");

    // --allow-plaintext restores planted plaintext, but a bomb still stops at --max-size.
    let to2 = env.tmp.path().join("restored-plain");
    let out = restore_to(
        &env,
        "primary",
        &to2,
        &["--allow-plaintext", "--max-size", "1MiB"],
    );
    let failed = failed_lines(&out);
    assert!(
        failed
            .iter()
            .any(|l| l.contains(&bucket_key("bomb.log.zst")) && l.contains("more than 1048576")),
        "{failed:#?}"
    );
    assert!(!tree(&to2).contains_key("bomb.log"));
}

/// An in-memory sink for the encoder.
#[derive(Clone, Default)]
struct SharedBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl panoptic_sync::pipeline::Finish for SharedBuf {
    fn finish(self: Box<Self>) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_swapped_for_a_symlink_during_restore_never_leads_outside() {
    let env = Env::new();
    for i in 0..600 {
        env.write(&format!("d/f{i:03}.txt"), format!("file {i}\n").as_bytes());
    }
    assert_ok(&env.cli(&["sync"]), "sync");
    let to = env.tmp.path().join("restored");
    let outside = env.tmp.path().join("outside");
    std::fs::create_dir_all(to.join("d")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, to.join("evil")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, a, b) = (stop.clone(), to.join("d"), to.join("evil"));
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &a,
                    rustix::fs::CWD,
                    &b,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let out = tokio::task::spawn_blocking({
        let (cfg, to) = (env.config_path(), to.clone());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
                .arg("--config")
                .arg(cfg)
                .args(["restore", "--from", "nas", "--to"])
                .arg(to)
                .args(["--prefix", "ci/test-node"])
                .env("PANOPTIC_SYNC_LOG", "error")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 100, "only {swaps} swaps");
    let escaped = dir_objects(&outside);
    assert!(
        escaped.is_empty(),
        "{} files written outside --to: {:?}\n{}",
        escaped.len(),
        escaped.keys().take(5).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout)
    );
}

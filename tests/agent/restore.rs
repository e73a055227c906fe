//! Compression, encryption, restore and verify end to end, with objects checked by independent
//! tools: boto3 for S3, `gunzip`, and a decoder written from docs/FORMAT.md in Python.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::core::assert_ok;
use crate::util::*;

const MARKER: &str = "MARKER-token-7f3a9c";

fn write_artifacts(env: &Env) {
    for i in 0..30 {
        let text: String = (0..200)
            .map(|j| format!("{MARKER} run {i} line {j}\n"))
            .collect();
        env.write(&format!("logs/{i}.log"), text.as_bytes());
    }
    let mut random = vec![0u8; 1 << 20];
    fastrand::fill(&mut random);
    env.write("bin/random.bin", &random);
    env.write("shots/s.png", &random[..10_000]);
    env.write("empty.txt", b"");
    env.write("naïve résumé.txt", format!("{MARKER} accents").as_bytes());
    // Incompressible and larger than a part: an encrypted multipart upload.
    let mut big = vec![0u8; 20 << 20];
    fastrand::fill(&mut big);
    env.write("big/core.dump", &big);
}

/// A setup with zstd + AES-256-GCM and a fresh key file (returned too).
pub(crate) fn encrypted_env() -> (Env, PathBuf) {
    let mut env = Env::new();
    let key = env.keygen("key");
    env.pipeline = format!(
        "[pipeline]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nkey_file = \"{}\"\n",
        key.display()
    );
    (env, key)
}

fn contains(data: &[u8], needle: &str) -> bool {
    data.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn restore(env: &Env, from: &str, to: &Path) -> std::process::Output {
    env.cli(&[
        "restore",
        "--from",
        from,
        "--to",
        to.to_str().unwrap(),
        "--prefix",
        &format!("ci/{NODE}"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_objects_are_ciphertext_and_restore_byte_identical_from_every_destination() {
    let (env, key) = encrypted_env();
    write_artifacts(&env);
    assert_ok(&env.cli(&["sync"]), "sync");

    // Every object is ciphertext: .enc, and no marker from any log is visible.
    let dump = env.tmp.path().join("dump");
    let objects = shared_s3().dump(&env.bucket, "base/ci/", &dump);
    assert_eq!(objects.len(), env.expected().len());
    for (name, data) in tree(&dump).into_iter().chain(tree(&env.nas)) {
        assert!(name.ends_with(".enc"), "{name} is not encrypted");
        assert!(!contains(&data, MARKER), "{name} shows plaintext");
    }
    assert!(objects.keys().any(|k| k.ends_with(".log.zst.enc")));
    assert!(
        objects.keys().any(|k| k.ends_with("random.bin.enc")),
        "incompressible stays raw"
    );

    // An independent decoder written from docs/FORMAT.md reads every S3 object.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/format_decrypt.py");
    for (name, data) in tree(&dump) {
        let bound = name.strip_prefix("base/").unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(&key)
            .arg(bound)
            .stdin(std::fs::File::open(dump.join(&name)).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rel = name.strip_prefix(&format!("base/ci/{NODE}/")).unwrap();
        let (_, logical) = panoptic_sync::format::layout::Plan::from_key(rel);
        assert_eq!(
            out.stdout,
            std::fs::read(env.watch.join(logical)).unwrap(),
            "{name}"
        );
        drop(data);
    }

    assert_ok(
        &env.cli(&["verify", "--deep"]),
        "verify --deep on intact data",
    );

    // Restore needs only the destination and the key: the index is gone.
    std::fs::remove_dir_all(&env.state).unwrap();
    let original = tree(&env.watch);
    for dest in ["primary", "nas"] {
        let to = env.tmp.path().join(format!("restored-{dest}"));
        assert_ok(&restore(&env, dest, &to), "restore");
        assert_eq!(tree(&to), original, "restore from {dest} differs");
        let m = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(m(&to.join("logs/3.log")), m(&env.watch.join("logs/3.log")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_key_restores_nothing_and_damaged_objects_fail_alone_by_name() {
    let (mut env, _) = encrypted_env();
    write_artifacts(&env);
    assert_ok(&env.cli(&["sync"]), "sync");

    // Damage two backup objects: flip one byte in one, truncate another.
    let flipped = env.nas.join(format!("ci/{NODE}/logs/4.log.zst.enc"));
    let mut data = std::fs::read(&flipped).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    std::fs::write(&flipped, data).unwrap();
    let truncated = env.nas.join(format!("ci/{NODE}/big/core.dump.enc"));
    let data = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &data[..data.len() - 20]).unwrap();

    let to = env.tmp.path().join("restored");
    let out = restore(&env, "nas", &to);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("failed: "))
        .collect();
    assert_eq!(failed.len(), 2, "{stderr}");
    assert!(stderr.contains("logs/4.log.zst.enc") && stderr.contains("big/core.dump.enc"));
    let mut want = tree(&env.watch);
    want.remove("logs/4.log");
    want.remove("big/core.dump");
    assert_eq!(tree(&to), want, "everything else is restored");

    let out = env.cli(&["verify", "--deep"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nas: ci/test-node/logs/4.log.zst.enc: damaged"),
        "{stderr}"
    );
    assert!(stderr.contains("core.dump.enc"), "{stderr}");
    assert!(!stderr.contains("primary:"), "{stderr}");
    assert_ok(
        &env.cli(&["verify", "--deep", "--dest", "primary"]),
        "verify primary",
    );
    // The cheap check sees the truncation by size.
    let out = env.cli(&["verify", "--dest", "nas"]);
    assert_eq!(out.status.code(), Some(1));

    // With another key nothing can be decrypted and nothing is written.
    let other = env.keygen("other-key");
    env.pipeline = env.pipeline.replace(
        env.tmp.path().join("key").to_str().unwrap(),
        other.to_str().unwrap(),
    );
    let to = env.tmp.path().join("wrong-key");
    let out = restore(&env, "primary", &to);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not among the configured keys"));
    assert!(tree(&to).is_empty(), "a wrong key wrote files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_keys_and_symlinks_cannot_make_restore_write_outside_its_target() {
    let env = Env::new();
    env.write("ok.txt", b"fine");
    assert_ok(&env.cli(&["sync"]), "sync");
    let s3 = shared_s3();
    s3.put_raw(
        &env.bucket,
        &format!("base/ci/{NODE}/a/%2e%2e/%2e%2e/x.txt"),
        b"odd",
    );
    s3.put_raw(
        &env.bucket,
        &format!("base/ci/{NODE}/link/owned.txt"),
        b"evil",
    );

    let outside = env.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let to = env.tmp.path().join("restored");
    std::fs::create_dir(&to).unwrap();
    std::os::unix::fs::symlink(&outside, to.join("link")).unwrap();

    let out = restore(&env, "primary", &to);
    assert_eq!(out.status.code(), Some(1), "the symlinked path must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("link/owned.txt"), "{stderr}");
    assert!(tree(&outside).is_empty(), "restore wrote through a symlink");
    assert_eq!(std::fs::read(to.join("ok.txt")).unwrap(), b"fine");
    // Odd encodings stay literal names inside the target.
    assert_eq!(
        std::fs::read(to.join("a/%2e%2e/%2e%2e/x.txt")).unwrap(),
        b"odd"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_objects_open_with_gunzip() {
    let mut env = Env::new();
    env.pipeline = "[pipeline]\ncompression = \"gzip\"\n".into();
    write_artifacts(&env);
    assert_ok(&env.cli(&["sync"]), "sync");
    let mut gz = 0;
    for (name, _) in tree(&env.nas) {
        let rel = name.strip_prefix(&format!("ci/{NODE}/")).unwrap();
        let original = std::fs::read(env.watch.join(rel.trim_end_matches(".gz"))).unwrap();
        if name.ends_with(".gz") {
            gz += 1;
            let out = Command::new("gunzip")
                .arg("-c")
                .arg(env.nas.join(&name))
                .output()
                .unwrap();
            assert!(out.status.success());
            assert_eq!(out.stdout, original, "{name}");
        } else {
            assert_eq!(std::fs::read(env.nas.join(&name)).unwrap(), original);
        }
    }
    // The 30 logs; short files whose gzip form is not smaller (the 27-byte accented one,
    // the empty one) are stored as-is.
    assert!(gz >= 30, "logs are compressed ({gz})");
    assert!(tree(&env.nas).contains_key(&format!("ci/{NODE}/naïve résumé.txt")));
    assert!(tree(&env.nas).contains_key(&format!("ci/{NODE}/shots/s.png")));
    let to = env.tmp.path().join("restored");
    assert_ok(&restore(&env, "primary", &to), "restore");
    assert_eq!(tree(&to), tree(&env.watch));
}

#[test]
fn a_key_file_open_to_others_is_refused_and_keygen_never_overwrites() {
    let (env, key) = encrypted_env();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.cli(&["sync"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("chmod 600"),
        "{err}"
    );
    let out = env.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_rotation_old_and_new_objects_restore_with_old_key_files() {
    let (mut env, old) = encrypted_env();
    env.write("before/a.log", b"written under the old key");
    assert_ok(&env.cli(&["sync"]), "sync with the old key");
    let new = env.keygen("new-key");
    env.pipeline = format!(
        "[pipeline]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nkey_file = \"{}\"\nold_key_files = [\"{}\"]\n",
        new.display(),
        old.display()
    );
    env.write("after/b.log", b"written under the new key");
    assert_ok(&env.cli(&["sync"]), "sync with the new key");
    let to = env.tmp.path().join("restored");
    assert_ok(&restore(&env, "nas", &to), "restore across keys");
    assert_eq!(tree(&to), tree(&env.watch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_plain_object_that_decodes_to_gigabytes_is_stopped_unless_allowed() {
    // Reproduced: without a key, a 33 KB `.zst` object in a `file://` store (which records no
    // size) restored to 1 GiB. 100 MiB of zeros compress to a few KB.
    let env = Env::new();
    let bomb = zstd::bulk::compress(&vec![0u8; 100 << 20], 19).unwrap();
    assert!(bomb.len() < 100_000, "{}", bomb.len());
    let dir = env.nas.join(format!("ci/{NODE}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("zeros.log.zst"), &bomb).unwrap();
    let to = env.tmp.path().join("out");
    let out = restore(&env, "nas", &to);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("zeros.log") && err.contains("--max-size"),
        "{err}"
    );
    assert!(!to.join("zeros.log").exists(), "nothing left behind");
    // Asked for, it restores whole.
    let to = env.tmp.path().join("out2");
    let out = env.cli(&[
        "restore",
        "--from",
        "nas",
        "--to",
        to.to_str().unwrap(),
        "--prefix",
        &format!("ci/{NODE}"),
        "--max-size",
        "200MiB",
    ]);
    assert_ok(&out, "restore with --max-size");
    assert_eq!(
        std::fs::metadata(to.join("zeros.log")).unwrap().len(),
        100 << 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbolic_links_planted_in_a_file_store_are_never_followed_by_restore() {
    // Reproduced: a restore without a key copied `/etc/shadow`, a 0600 root file and all of
    // `/etc` through `etclink -> /etc` planted in the `file://` store. Here the outside is a
    // directory of the test's own.
    let env = Env::new();
    let outside = env.tmp.path().join("outside");
    std::fs::create_dir_all(outside.join("deep")).unwrap();
    std::fs::write(outside.join("secret.txt"), b"not for the bucket").unwrap();
    std::fs::write(outside.join("deep/more.txt"), b"nor this").unwrap();
    let dir = env.nas.join(format!("ci/{NODE}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("genuine.txt"), b"a real object").unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("etclink")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), dir.join("shadow")).unwrap();
    let to = env.tmp.path().join("out");
    let out = restore(&env, "nas", &to);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        std::fs::read(to.join("genuine.txt")).unwrap(),
        b"a real object",
        "{said}"
    );
    let got = tree(&to);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["genuine.txt"], "{said}");
    assert!(
        said.contains("etclink") && said.contains("shadow"),
        "named: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbolic_links_planted_in_a_file_store_never_redirect_an_upload() {
    // Reproduced: a symlink in the `file://` store redirected an upload to write outside it.
    let env = Env::new();
    let outside = env.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep.txt"), b"outside").unwrap();
    std::fs::set_permissions(
        outside.join("keep.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mtime = || {
        std::fs::metadata(outside.join("keep.txt"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = mtime();
    let dir = env.nas.join(format!("ci/{NODE}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("logs")).unwrap();
    // A link at an object's own key, to an outside file the upload must not touch.
    std::os::unix::fs::symlink(outside.join("keep.txt"), dir.join("top.txt")).unwrap();
    env.write("logs/a.log", b"must not land outside");
    env.write("top.txt", b"replaces the link, never its target");
    env.write("other/b.log", b"stored as usual");
    let out = env.cli(&["sync"]);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the redirected file failed: {said}"
    );
    assert!(said.contains("logs/a.log"), "named: {said}");
    let got = tree(&outside);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["keep.txt"],
        "nothing written outside: {said}"
    );
    assert_eq!(got["keep.txt"], b"outside");
    let mode = std::fs::metadata(outside.join("keep.txt"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "the target's mode untouched"
    );
    assert_eq!(mtime(), before, "the target's mtime untouched");
    assert_eq!(
        std::fs::read(dir.join("other/b.log")).unwrap(),
        b"stored as usual"
    );
    let top = std::fs::symlink_metadata(dir.join("top.txt")).unwrap();
    assert!(
        top.is_file(),
        "the link at the key was replaced by the object"
    );
    assert_eq!(
        std::fs::read(dir.join("top.txt")).unwrap(),
        b"replaces the link, never its target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_part_way_resumes_where_it_stopped_and_restores_byte_identical() {
    // Reproduced by scripts/bench: a 4 GiB restore failed with "operation timed out" once one
    // GET's body outlived the client's request timeout, object_store's own retries being over.
    // Here every answer is cut after 1 MiB, more often than object_store retries by itself.
    let (mut env, _key) = encrypted_env();
    let mut data = vec![0u8; 6 << 20];
    fastrand::fill(&mut data);
    env.write("big/core.dump", &data);
    assert_ok(&env.cli(&["sync"]), "sync");
    let cuts = env.tmp.path().join("cuts");
    let (endpoint, _proxy) = faulty_proxy(&env.s3_endpoint, 1, "cut=1048576", Some(&cuts));
    env.s3_endpoint = endpoint;
    let to = env.tmp.path().join("restored");
    let out = restore(&env, "primary", &to);
    assert_ok(
        &out,
        "restore through a link that cuts every answer after 1 MiB",
    );
    assert_eq!(
        std::fs::read(to.join("big/core.dump")).unwrap(),
        data,
        "byte-identical"
    );
    let n = std::fs::read_to_string(&cuts).unwrap().lines().count();
    assert!(n >= 6, "the body was cut {n} times");
    assert_ok(
        &env.cli(&["verify", "--deep"]),
        "verify --deep through the same link",
    );
}

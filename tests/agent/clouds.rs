//! One suite, run against every cloud backend: S3 (s3s-fs, credentials only from the
//! environment), Azure (Azurite, use_emulator), and GCS (writes through object_store's GCS
//! client to an S3 server via tests/gcs_proxy.py; reads from fake-gcs-server, seeded with what
//! was written). Every backend sits behind a proxy that drops every third connection, so
//! the suite also proves retries. Each run: daemon upload with duplicates (server-side copies)
//! and a multipart file, an independent listing, `restore`, and a presigned URL fetched with
//! curl.

use std::path::PathBuf;
use std::process::Command;

use crate::core::{assert_ok, count_methods};
use crate::fleet::{planted_keys_fail_alone, sync_genuine_files};
use crate::util::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    S3,
    Azure,
    Gcs,
}

struct Cloud {
    backend: Backend,
    env: Env,
    _proxy: ChildGuard,
}

/// A GCS service account file with a real RSA key (so presigning works) whose `gcs_base_url`
/// points at a local server. object_store signs its own JWT with the key: no token server.
fn service_account(env: &Env, name: &str, base_url: &str) -> PathBuf {
    let pem_path = env.tmp.path().join("sa.pem");
    if !pem_path.exists() {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl genpkey failed");
    }
    let json = serde_json::json!({
        "type": "service_account",
        "private_key": std::fs::read_to_string(&pem_path).unwrap(),
        "private_key_id": "test-key",
        "client_email": "panoptic-test@example.iam.gserviceaccount.com",
        "gcs_base_url": base_url,
    });
    let path = env.tmp.path().join(name);
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn setup(backend: Backend) -> Cloud {
    let mut env = Env::new();
    let (primary, proxy) = match backend {
        Backend::S3 => {
            let s3 = shared_s3();
            let (endpoint, proxy) = flaky_proxy(&s3.endpoint, 3);
            // Credentials and endpoint only from the environment, as a systemd
            // EnvironmentFile= would give them.
            env.cmd_env = vec![
                ("AWS_ACCESS_KEY_ID".into(), s3.key.clone()),
                ("AWS_SECRET_ACCESS_KEY".into(), s3.secret.clone()),
                ("AWS_ENDPOINT".into(), endpoint),
                ("AWS_ALLOW_HTTP".into(), "true".into()),
                ("AWS_REGION".into(), "us-east-1".into()),
                ("AWS_METADATA_ENDPOINT".into(), "http://127.0.0.1:9".into()),
            ];
            (format!("url = \"s3://{}/base\"", env.bucket), proxy)
        }
        Backend::Azure => {
            let azurite = test_var("PANOPTIC_TEST_AZURITE_ENDPOINT");
            cloud_check(&["azure", &azurite, "create", &env.bucket]);
            let (endpoint, proxy) = flaky_proxy(&azurite, 3);
            env.cmd_env = vec![("AZURITE_BLOB_STORAGE_URL".into(), endpoint)];
            (
                format!(
                    "url = \"az://{}/base\"\noptions = {{ use_emulator = \"true\" }}",
                    env.bucket
                ),
                proxy,
            )
        }
        Backend::Gcs => {
            let root = PathBuf::from(test_var("PANOPTIC_TEST_GCS_S3_ROOT"));
            std::fs::create_dir_all(root.join(&env.bucket)).unwrap();
            let (endpoint, proxy) = flaky_proxy(&test_var("PANOPTIC_TEST_GCS_WRITE_ENDPOINT"), 3);
            let sa = service_account(&env, "sa-write.json", &endpoint);
            env.cmd_env = vec![("GOOGLE_SERVICE_ACCOUNT".into(), sa.display().to_string())];
            (format!("url = \"gs://{}/base\"", env.bucket), proxy)
        }
    };
    env.primary = Some(format!("[[destination]]\nname = \"primary\"\n{primary}\n"));
    Cloud {
        backend,
        env,
        _proxy: proxy,
    }
}

impl Cloud {
    /// Every object under the primary's base, key (relative to the base) → sha256, read by a
    /// client that is not object_store.
    fn listing(&self) -> std::collections::BTreeMap<String, String> {
        let env = &self.env;
        let raw = match self.backend {
            Backend::S3 => shared_s3().objects(&env.bucket, "base/"),
            Backend::Azure => cloud_check(&[
                "azure",
                &test_var("PANOPTIC_TEST_AZURITE_ENDPOINT"),
                "list",
                &env.bucket,
                "base/",
            ]),
            Backend::Gcs => cloud_check(&[
                "gcs",
                &test_var("PANOPTIC_TEST_GCS_READ_ENDPOINT"),
                "list",
                &env.bucket,
                "base/",
            ]),
        };
        raw.into_iter()
            .map(|(k, v)| (k.trim_start_matches("base/").to_string(), v))
            .filter(|(k, _)| !k.starts_with("_panoptic-sync/"))
            .collect()
    }
}

async fn suite(backend: Backend) {
    let mut cloud = setup(backend);
    let env = &cloud.env;
    let mut child = env.spawn_run();
    for i in 0..30 {
        env.write(
            &format!("logs/{i}.log"),
            format!("{backend:?} log {i}\n").repeat(50).as_bytes(),
        );
    }
    for i in 0..6 {
        // Equal mtimes: a server-side copy carries the right metadata.
        let p = env.watch.join(format!("shards/{i}/same.bin"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_preserved(&p, b"identical bytes in every shard", 1_700_000_000);
    }
    let mut big = vec![0u8; 20 << 20];
    fastrand::fill(&mut big);
    env.write("big/core.dump", &big);
    assert_ok(
        &flush_all(env, "240s").await,
        "flush through a flaky connection",
    );
    let status = child.terminate().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        count_methods(env, "copy") >= 5,
        "duplicates must be server-side copies"
    );

    if backend == Backend::Gcs {
        // The read path: what the GCS client wrote, served by fake-gcs-server.
        let read = test_var("PANOPTIC_TEST_GCS_READ_ENDPOINT");
        let written = PathBuf::from(test_var("PANOPTIC_TEST_GCS_S3_ROOT")).join(&env.bucket);
        cloud_check(&["gcs", &read, "create", &env.bucket]);
        cloud_check(&[
            "gcs",
            &read,
            "seed",
            &env.bucket,
            written.to_str().unwrap(),
            "",
        ]);
        let sa = service_account(env, "sa-read.json", &read);
        cloud.env.cmd_env = vec![("GOOGLE_SERVICE_ACCOUNT".into(), sa.display().to_string())];
    }
    let env = &cloud.env;
    assert_eq!(
        cloud.listing(),
        env.expected(),
        "{backend:?} holds other objects"
    );

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
    assert_ok(&out, "restore");
    assert_eq!(
        tree(&to),
        tree(&env.watch),
        "{backend:?} round trip differs"
    );

    // A presigned URL that curl fetches with no credentials.
    let file = env.watch.join("logs/3.log");
    let out = env.cli(&["url", file.to_str().unwrap(), "--expires", "10m"]);
    assert_ok(&out, "url");
    let link = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(link.starts_with("http://127.0.0.1:"), "{link}");
    let got = Command::new("curl")
        .args(["-sS", "--fail", "--retry", "5", "--retry-all-errors", &link])
        .output()
        .unwrap();
    assert!(
        got.status.success(),
        "curl {link}: {}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(got.stdout, std::fs::read(&file).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_with_credentials_from_the_environment_round_trips() {
    suite(Backend::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_on_azurite_round_trips() {
    suite(Backend::Azure).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_writes_through_the_proxy_and_reads_from_fake_gcs_server() {
    suite(Backend::Gcs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_name_object_store_cannot_parse_fails_alone_on_azure() {
    let azurite = test_var("PANOPTIC_TEST_AZURITE_ENDPOINT");
    let mut env = Env::new();
    cloud_check(&["azure", &azurite, "create", &env.bucket]);
    env.cmd_env = vec![("AZURITE_BLOB_STORAGE_URL".into(), azurite.clone())];
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"az://{}/base\"\noptions = {{ use_emulator = \"true\" }}\n",
        env.bucket
    ));
    sync_genuine_files(&env);
    // Names Azurite stores and lists but object_store cannot parse: a tab, an empty segment.
    // (A listing holding a name with \x01 Azurite answers with 500: its XML writer refuses
    // the character; Azure itself sends such a name percent-encoded, `Encoded="true"`.)
    let run = format!("base/ci/{NODE}/run");
    let planted = [format!("{run}//double.log"), format!("{run}/bad\tkey.log")];
    for name in planted
        .iter()
        .map(String::as_str)
        .chain(["base/_panoptic-sync/nodes/bad\tnode.json"])
    {
        cloud_check(&["azure", &azurite, "put", &env.bucket, name]);
    }
    planted_keys_fail_alone(
        &mut env,
        &["run//double.log", "bad\\u{9}key.log"],
        "bad\\u{9}node.json",
    )
    .await;
    let left = cloud_check(&["azure", &azurite, "list", &env.bucket, "base/ci/"]);
    assert_eq!(
        left.into_keys().collect::<Vec<_>>(),
        planted,
        "only the crafted blobs are left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_name_object_store_cannot_parse_fails_alone_on_gcs() {
    // Encrypted: fake-gcs-server is seeded without the objects' metadata, so the rebuild
    // reads the hashes from the encrypted records.
    let (mut env, _key) = crate::restore::encrypted_env();
    let written = PathBuf::from(test_var("PANOPTIC_TEST_GCS_S3_ROOT")).join(&env.bucket);
    std::fs::create_dir_all(&written).unwrap();
    let sa = service_account(
        &env,
        "sa-write.json",
        &test_var("PANOPTIC_TEST_GCS_WRITE_ENDPOINT"),
    );
    env.cmd_env = vec![("GOOGLE_SERVICE_ACCOUNT".into(), sa.display().to_string())];
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"gs://{}/base\"\n",
        env.bucket
    ));
    sync_genuine_files(&env);
    // Read (and delete) from fake-gcs-server, seeded with what was written.
    let read = test_var("PANOPTIC_TEST_GCS_READ_ENDPOINT");
    cloud_check(&["gcs", &read, "create", &env.bucket]);
    cloud_check(&[
        "gcs",
        &read,
        "seed",
        &env.bucket,
        written.to_str().unwrap(),
        "",
    ]);
    let sa = service_account(&env, "sa-read.json", &read);
    env.cmd_env = vec![("GOOGLE_SERVICE_ACCOUNT".into(), sa.display().to_string())];
    // Names fake-gcs-server stores and lists but object_store cannot parse: `.` and `..`
    // segments, an empty segment, a tab. (It lists \x01 as U+FFFD: Go's XML escaping.)
    let run = format!("base/ci/{NODE}/run");
    let planted = [
        format!("{run}/./dot.log"),
        format!("{run}//double.log"),
        format!("{run}/bad\tkey.log"),
        format!("{run}/x/../dotdot.log"),
    ];
    for name in planted
        .iter()
        .map(String::as_str)
        .chain(["base/_panoptic-sync/nodes/bad\tnode.json"])
    {
        cloud_check(&["gcs", &read, "put", &env.bucket, name]);
    }
    planted_keys_fail_alone(
        &mut env,
        &[
            "run/./dot.log",
            "run//double.log",
            "bad\\u{9}key.log",
            "run/x/../dotdot.log",
        ],
        "bad\\u{9}node.json",
    )
    .await;
    let left = cloud_check(&["gcs", &read, "list", &env.bucket, "base/ci/"]);
    assert_eq!(
        left.into_keys().collect::<Vec<_>>(),
        planted,
        "only the crafted objects are left"
    );
}

#[test]
fn url_uses_public_base_url_when_configured() {
    let mut env = Env::new();
    env.write("report.html", b"<html/>");
    assert_ok(&env.cli(&["sync"]), "sync");
    let s3 = shared_s3();
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"s3://{}/base\"\npublic_base_url = \"https://cdn.example.com/panoptic/\"\noptions = {{ endpoint = \"{}\", allow_http = \"true\", access_key_id = \"{}\", secret_access_key = \"{}\", region = \"us-east-1\", metadata_endpoint = \"http://127.0.0.1:9\" }}\n",
        env.bucket, s3.endpoint, s3.key, s3.secret
    ));
    let out = env.cli(&["url", env.watch.join("report.html").to_str().unwrap()]);
    assert_ok(&out, "url");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("https://cdn.example.com/panoptic/ci/{NODE}/report.html")
    );
    // A file that was never uploaded has no link.
    env.write("later.txt", b"x");
    let out = env.cli(&["url", env.watch.join("later.txt").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has not been uploaded"));
}

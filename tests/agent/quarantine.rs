//! The flaky-test quarantine and `gate`: the list in the primary (S3, and file://), its
//! expiry, the copy that decides offline, a tampered list refused with a key, concurrent
//! writers, and entries proposed from the fleet's flaky tests.

use std::path::PathBuf;
use std::process::Output;

use crate::util::*;

/// A JUnit file (under the setup's temp dir, outside the watched tree) with the cases given
/// as `(class, name, outcome)`: `passed`, `failed` or `error`.
fn junit(env: &Env, name: &str, cases: &[(&str, &str, &str)]) -> PathBuf {
    let mut xml = String::from("<testsuites><testsuite name=\"suite\">");
    for (class, test, outcome) in cases {
        xml.push_str(&format!(
            "<testcase classname=\"{class}\" name=\"{test}\" time=\"0.1\">"
        ));
        match *outcome {
            "failed" => xml.push_str("<failure message=\"boom\">trace</failure>"),
            "error" => xml.push_str("<error message=\"crash\"/>"),
            _ => {}
        }
        xml.push_str("</testcase>");
    }
    xml.push_str("</testsuite></testsuites>");
    let p = env.tmp.path().join(name);
    std::fs::write(&p, xml).unwrap();
    p
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn gate(env: &Env, files: &[&PathBuf]) -> Output {
    let mut args = vec!["gate".to_string()];
    args.extend(files.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.cli(&args)
}

fn ok(out: Output) -> Output {
    assert_eq!(code(&out), 0, "{}", text(&out));
    out
}

/// The setup's primary pointed at a port where nothing listens (an unreachable bucket).
fn unreachable_primary(env: &Env) -> String {
    format!(
        r#"[[destination]]
name = "primary"
url = "s3://{bucket}/base"
options = {{ endpoint = "http://127.0.0.1:9", allow_http = "true", access_key_id = "{key}", secret_access_key = "{secret}", region = "us-east-1", metadata_endpoint = "http://127.0.0.1:9" }}
"#,
        bucket = env.bucket,
        key = env.s3_key,
        secret = env.s3_secret,
    )
}

fn encrypted(env: &mut Env) {
    let key = env.keygen("key");
    env.pipeline = format!(
        "[pipeline]\ncompression = \"zstd\"\nencryption = \"aes-256-gcm\"\nkey_file = \"{}\"\n",
        key.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_passes_only_when_every_failure_is_quarantined_and_unexpired() {
    let env = Env::new();
    let s3 = shared_s3();
    ok(env.cli(&[
        "quarantine",
        "add",
        "app.Login::flaky_one",
        "--reason",
        "JIRA-1: races the clock",
        "--expires",
        "14d",
    ]));
    let out = env.cli(&[
        "quarantine",
        "add",
        "suite::no_class",
        "--reason",
        "r",
        "--expires",
        "2099-01-01",
    ]);
    assert_eq!(code(&out), 2, "an expiry decades ahead: {}", text(&out));

    let passing = junit(&env, "pass.xml", &[("app.Login", "works", "passed")]);
    let quarantined = junit(
        &env,
        "q.xml",
        &[
            ("app.Login", "works", "passed"),
            ("app.Login", "flaky_one", "failed"),
        ],
    );
    let one_not = junit(
        &env,
        "n.xml",
        &[
            ("app.Login", "flaky_one", "error"),
            ("app.Cart", "broken", "failed"),
        ],
    );
    let empty = junit(&env, "empty.xml", &[]);
    let missing = env.tmp.path().join("never-written.xml");
    let expired_list = r#"{"format":1,"entries":[{"test":"app.Login::flaky_one","reason":"r","expires":"2020-01-01T00:00:00Z","added_by":"n","added_ms":0}]}"#;

    // The table: (files, exit code, what the output says).
    let table: Vec<(&str, Vec<&PathBuf>, i32, &str)> = vec![
        ("no failure", vec![&passing], 0, "gate passed"),
        (
            "all failures quarantined",
            vec![&quarantined],
            0,
            "quarantined",
        ),
        (
            "two files, all quarantined",
            vec![&passing, &quarantined],
            0,
            "gate passed: 3 tests, 1 failure",
        ),
        (
            "one failure not quarantined",
            vec![&one_not],
            1,
            "NOT QUARANTINED app.Cart::broken",
        ),
        ("no tests at all", vec![&empty], 1, "no test case"),
        (
            "a file never written",
            vec![&passing, &missing],
            1,
            "never-written.xml",
        ),
    ];
    for (what, files, want, says) in &table {
        let out = gate(&env, files);
        assert_eq!(code(&out), *want, "{what}: {}", text(&out));
        assert!(text(&out).contains(says), "{what}: {}", text(&out));
    }

    // The list in the bucket, as stored (no key: plain JSON).
    let listed = ok(env.cli(&["quarantine", "list", "--json"]));
    let l: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(l["format"], 1);
    assert_eq!(l["entries"].as_array().unwrap().len(), 1, "{l}");
    let e = &l["entries"][0];
    assert_eq!(e["test"], "app.Login::flaky_one");
    assert_eq!(e["added_by"], NODE);
    assert!(e["added_ms"].as_i64().unwrap() > 0);
    let objects = s3.objects(&env.bucket, "base/_panoptic-sync/");
    assert!(
        objects.contains_key("base/_panoptic-sync/quarantine.json"),
        "{objects:?}"
    );

    // An expired entry quarantines nothing.
    s3.put_raw(
        &env.bucket,
        "base/_panoptic-sync/quarantine.json",
        expired_list.as_bytes(),
    );
    let out = gate(&env, &[&quarantined]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("EXPIRED"), "{}", text(&out));
    let out = ok(env.cli(&["quarantine", "list"]));
    assert!(text(&out).contains("expired"), "{}", text(&out));

    // Adding the test again renews it; removing it ends it.
    ok(env.cli(&[
        "quarantine",
        "add",
        "app.Login::flaky_one",
        "--reason",
        "renewed",
        "--expires",
        "7d",
    ]));
    ok(gate(&env, &[&quarantined]));
    ok(env.cli(&["quarantine", "remove", "app.Login::flaky_one"]));
    assert_eq!(code(&gate(&env, &[&quarantined])), 1);
    // Removing what is not there, and entries without expiry or a test id, are usage errors.
    let out = env.cli(&["quarantine", "remove", "app.Login::flaky_one"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let out = env.cli(&["quarantine", "add", "app.Login::x", "--reason", "r"]);
    assert_eq!(code(&out), 2, "no --expires: {}", text(&out));
    for bad in ["yesterday", "2020-01-01", "91d"] {
        let out = env.cli(&[
            "quarantine",
            "add",
            "app.Login::x",
            "--reason",
            "r",
            "--expires",
            bad,
        ]);
        assert_eq!(code(&out), 2, "{bad}: {}", text(&out));
    }
    let out = env.cli(&["quarantine", "add", "x", "--reason", "r", "--expires", "1d"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_decides_from_the_cached_list_when_the_bucket_is_unreachable() {
    let mut env = Env::new();
    let quarantined = junit(&env, "q.xml", &[("app.Login", "flaky_one", "failed")]);
    let other = junit(&env, "o.xml", &[("app.Cart", "broken", "failed")]);
    ok(env.cli(&[
        "quarantine",
        "add",
        "app.Login::flaky_one",
        "--reason",
        "r",
        "--expires",
        "3d",
    ]));
    // Without a copy, an unreachable bucket fails the gate (closed).
    let fresh_state = env.state.clone();
    std::fs::remove_file(fresh_state.join("quarantine.json")).unwrap();
    env.primary = Some(unreachable_primary(&env));
    let out = gate(&env, &[&quarantined]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("no usable copy"), "{}", text(&out));

    // A gate that read the list keeps a copy; then the bucket goes away.
    env.primary = None;
    ok(gate(&env, &[&quarantined]));
    assert!(env.state.join("quarantine.json").exists());
    env.primary = Some(unreachable_primary(&env));
    let out = ok(gate(&env, &[&quarantined]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not be read") && stderr.contains("copy of the quarantine list"),
        "{}",
        text(&out)
    );
    let out = gate(&env, &[&quarantined, &other]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("NOT QUARANTINED app.Cart::broken"));
    // `list` reads the copy too; writing needs the bucket.
    ok(env.cli(&["quarantine", "list"]));
    let out = env.cli(&[
        "quarantine",
        "add",
        "app.Cart::broken",
        "--reason",
        "r",
        "--expires",
        "1d",
    ]);
    assert_eq!(code(&out), 1, "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_list_is_refused_and_the_gate_fails_closed() {
    let mut env = Env::new();
    let s3 = shared_s3();
    encrypted(&mut env);
    let quarantined = junit(&env, "q.xml", &[("app.Login", "flaky_one", "failed")]);
    ok(env.cli(&[
        "quarantine",
        "add",
        "app.Login::flaky_one",
        "--reason",
        "r",
        "--expires",
        "3d",
    ]));
    ok(gate(&env, &[&quarantined]));
    let key = "base/_panoptic-sync/quarantine.json.enc";
    let dump = env.tmp.path().join("dump");
    let objects = s3.dump(&env.bucket, "base/_panoptic-sync/", &dump);
    assert!(objects.contains_key(key), "{objects:?}");
    let stored = std::fs::read(dump.join(key)).unwrap();
    assert!(
        !String::from_utf8_lossy(&stored).contains("flaky_one"),
        "the list is encrypted"
    );

    // One byte flipped: refused, naming the object, although a copy from before is kept.
    let mut tampered = stored.clone();
    let at = tampered.len() - 20;
    tampered[at] ^= 1;
    s3.put_raw(&env.bucket, key, &tampered);
    let out = gate(&env, &[&quarantined]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("_panoptic-sync/quarantine.json.enc"),
        "{}",
        text(&out)
    );
    // Adding to it is refused too.
    let out = env.cli(&[
        "quarantine",
        "add",
        "a::b",
        "--reason",
        "r",
        "--expires",
        "1d",
    ]);
    assert_eq!(code(&out), 1, "{}", text(&out));

    // A plain list planted beside, with the genuine list restored, is never read; and a
    // genuine list put back passes again.
    let plain = br#"{"format":1,"entries":[{"test":"app.Cart::broken","reason":"planted","expires":"2099-01-01T00:00:00Z","added_by":"x","added_ms":0}]}"#;
    s3.put_raw(&env.bucket, "base/_panoptic-sync/quarantine.json", plain);
    s3.put_raw(&env.bucket, key, &stored);
    ok(gate(&env, &[&quarantined]));
    let other = junit(&env, "o.xml", &[("app.Cart", "broken", "failed")]);
    assert_eq!(code(&gate(&env, &[&other])), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_works_in_a_file_store_and_with_a_key() {
    let mut env = Env::new();
    encrypted(&mut env);
    let store = env.tmp.path().join("primary-store");
    env.primary = Some(format!(
        "[[destination]]\nname = \"primary\"\nurl = \"file://{}\"\n",
        store.display()
    ));
    let quarantined = junit(&env, "q.xml", &[("app.Login", "flaky_one", "failed")]);
    for t in ["app.Login::flaky_one", "app.Other::x"] {
        ok(env.cli(&["quarantine", "add", t, "--reason", "r", "--expires", "2d"]));
    }
    assert!(store.join("_panoptic-sync/quarantine.json.enc").is_file());
    ok(gate(&env, &[&quarantined]));
    ok(env.cli(&["quarantine", "remove", "app.Login::flaky_one"]));
    assert_eq!(code(&gate(&env, &[&quarantined])), 1);
    let out = ok(env.cli(&["quarantine", "list"]));
    assert!(text(&out).contains("app.Other::x"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_lists_the_fleets_flaky_tests_and_adds_them_with_an_expiry() {
    let env = Env::new();
    let s3 = shared_s3();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let date = chrono::Utc::now().format("%Y-%m-%d");
    // Two nodes ran one commit: `app.Net::retries` failed on one and passed on the other.
    for (node, outcome) in [("n1", "failed"), ("n2", "passed")] {
        let record = format!(
            r#"{{"schema":1,"run":"r","node_id":"{node}","sealed_ms":{now_ms},"key_prefix":"ci/{node}/r","branch":"main","commit":"{c}","tests":2,"cases":[{{"suite":"s","class":"app.Net","name":"retries","status":"{outcome}"}},{{"suite":"s","class":"app.Net","name":"steady","status":"passed"}}]}}"#,
            c = "a".repeat(40)
        );
        s3.put_raw(
            &env.bucket,
            &format!("base/_panoptic-sync/runs/date={date}/node={node}/r~0123456789abcdef.json"),
            format!("{record}\n").as_bytes(),
        );
    }
    let out = ok(env.cli(&["quarantine", "propose"]));
    assert!(
        text(&out).contains("app.Net::retries") && !text(&out).contains("steady"),
        "{}",
        text(&out)
    );
    ok(env.cli(&["quarantine", "propose", "--add", "--expires", "5d"]));
    let out = ok(env.cli(&["quarantine", "list", "--json"]));
    let l: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l["entries"][0]["test"], "app.Net::retries", "{l}");
    assert!(
        l["entries"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("flaky"),
        "{l}"
    );
    // Quarantined now: nothing left to propose.
    let out = ok(env.cli(&["quarantine", "propose"]));
    assert!(
        text(&out).contains("1 quarantined already"),
        "{}",
        text(&out)
    );
}

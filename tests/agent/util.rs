//! Test utilities: real S3 servers (s3s-fs), temp trees, a config builder, an in-process
//! daemon, the CLI binary, an independent S3 client (boto3) and waiting with deadlines.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use panoptic_sync::Config;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub const NODE: &str = "test-node";
pub const KEY: &str = "panoptic-test-key";

/// An S3 server: the shared one started by `scripts/test`, or one this process started.
pub struct S3 {
    pub endpoint: String,
    pub root: PathBuf,
    pub key: String,
    pub secret: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn s3s_fs_bin() -> PathBuf {
    if let Ok(p) = which("s3s-fs") {
        return p;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cargo/bin/s3s-fs");
    assert!(
        p.exists(),
        "s3s-fs is not installed: run the tests with scripts/test, which installs it"
    );
    p
}

fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

impl S3 {
    /// Start a private s3s-fs on `port` and wait until it accepts connections.
    pub fn spawn(port: u16) -> S3 {
        Self::spawn_with_secret(port, &format!("secret-{}", fastrand::u64(..)))
    }

    /// Start a private s3s-fs on `port` with a given secret key.
    pub fn spawn_with_secret(port: u16, secret: &str) -> S3 {
        let dir = tempfile::tempdir().unwrap();
        let secret = secret.to_string();
        let child = Command::new(s3s_fs_bin())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY, "--secret-key", &secret])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        wait_for_port(port, Duration::from_secs(30));
        S3 {
            endpoint: format!("http://127.0.0.1:{port}"),
            root: dir.path().to_path_buf(),
            key: KEY.into(),
            secret,
            child: Some(child),
            _dir: Some(dir),
        }
    }

    /// The server's process id (for SIGSTOP/SIGCONT outages).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("a server this test started")
            .id()
    }

    /// Create a bucket (s3s-fs keeps a bucket as a directory under its root).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
    }

    /// Every object under `prefix` in `bucket`, key → sha256 hex, read with boto3.
    pub fn objects(&self, bucket: &str, prefix: &str) -> BTreeMap<String, String> {
        self.boto(bucket, &[prefix])
    }

    /// Like [`S3::objects`], also writing each object's raw bytes to `dir/<key>`.
    pub fn dump(&self, bucket: &str, prefix: &str, dir: &Path) -> BTreeMap<String, String> {
        self.boto(bucket, &[prefix, dir.to_str().unwrap()])
    }

    /// Upload raw bytes under any key, with boto3 (for crafted objects).
    pub fn put_raw(&self, bucket: &str, key: &str, data: &[u8]) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), data).unwrap();
        self.boto(bucket, &["put", key, f.path().to_str().unwrap()]);
    }

    /// An object's ContentType, ContentEncoding and ContentLength, read with boto3.
    pub fn head(&self, bucket: &str, key: &str) -> serde_json::Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3_check.py");
        let out = Command::new("python3")
            .arg(script)
            .args([&self.endpoint, &self.key, &self.secret, bucket, "head", key])
            .output()
            .expect("running python3 tests/s3_check.py");
        assert!(
            out.status.success(),
            "head {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn boto(&self, bucket: &str, args: &[&str]) -> BTreeMap<String, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3_check.py");
        let out = Command::new("python3")
            .arg(script)
            .args([&self.endpoint, &self.key, &self.secret, bucket])
            .args(args)
            .output()
            .expect("running python3 tests/s3_check.py");
        assert!(
            out.status.success(),
            "boto3 listing failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// The shared S3 server for this test binary.
pub fn shared_s3() -> &'static S3 {
    static S3_SERVER: OnceLock<S3> = OnceLock::new();
    S3_SERVER.get_or_init(|| match std::env::var("PANOPTIC_TEST_S3_ENDPOINT") {
        Ok(endpoint) => S3 {
            endpoint,
            root: std::env::var("PANOPTIC_TEST_S3_ROOT").unwrap().into(),
            key: std::env::var("PANOPTIC_TEST_S3_KEY").unwrap(),
            secret: std::env::var("PANOPTIC_TEST_S3_SECRET").unwrap(),
            child: None,
            _dir: None,
        },
        Err(_) => S3::spawn(free_port()),
    })
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "server on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until `f` is true, polling; panic with `what` at the deadline.
pub async fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A test setup: a watched tree, a state dir, an S3 primary and a file:// backup.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub watch: PathBuf,
    pub state: PathBuf,
    pub nas: PathBuf,
    pub bucket: String,
    pub s3_endpoint: String,
    pub s3_key: String,
    pub s3_secret: String,
    /// Extra TOML appended to the [[watch]] table.
    pub watch_extra: String,
    /// A `[pipeline]` table, if any.
    pub pipeline: String,
    /// The primary's `[[destination]]` table (default: the S3 bucket of this setup).
    pub primary: Option<String>,
    /// Environment for every CLI or daemon process of this setup.
    pub cmd_env: Vec<(String, String)>,
    /// TOML appended at the end (e.g. `[retention]`, `[metrics]`).
    pub tail: String,
    /// Extra TOML for the file:// backup's `[[destination]]` table (e.g. `concurrency`).
    pub nas_extra: String,
    /// This setup's node id.
    pub node: String,
}

impl Env {
    /// A fresh setup using the shared S3 server with a bucket of its own.
    pub fn new() -> Env {
        let s3 = shared_s3();
        Self::with_s3(&s3.endpoint, &s3.key, &s3.secret, Some(s3))
    }

    /// A fresh setup against the S3 server at `endpoint` (which may not be running yet).
    pub fn with_s3(endpoint: &str, key: &str, secret: &str, server: Option<&S3>) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let bucket = format!("b{}", fastrand::u32(..));
        if let Some(s) = server {
            s.create_bucket(&bucket);
        }
        let env = Env {
            watch: tmp.path().join("artifacts"),
            state: tmp.path().join("state"),
            nas: tmp.path().join("nas"),
            tmp,
            bucket,
            s3_endpoint: endpoint.into(),
            s3_key: key.into(),
            s3_secret: secret.into(),
            watch_extra: String::new(),
            pipeline: String::new(),
            primary: None,
            cmd_env: Vec::new(),
            tail: String::new(),
            nas_extra: String::new(),
            node: NODE.to_string(),
        };
        std::fs::create_dir_all(&env.watch).unwrap();
        env
    }

    pub fn config_text(&self) -> String {
        let primary = self.primary.clone().unwrap_or_else(|| {
            format!(
                r#"[[destination]]
name = "primary"
url = "s3://{bucket}/base"
options = {{ endpoint = "{endpoint}", allow_http = "true", access_key_id = "{key}", secret_access_key = "{secret}", region = "us-east-1", metadata_endpoint = "http://127.0.0.1:9" }}
"#,
                bucket = self.bucket,
                endpoint = self.s3_endpoint,
                key = self.s3_key,
                secret = self.s3_secret,
            )
        });
        format!(
            r#"node_id = "{node}"
state_dir = "{state}"

{pipeline}

[[watch]]
path = "{watch}"
prefix = "ci/{{node}}"
exclude = ["**/*.tmp"]
settle_ms = 300
{extra}

{primary}
[[destination]]
name = "nas"
url = "file://{nas}"
{nas_extra}

{tail}
"#,
            node = self.node,
            tail = self.tail,
            state = self.state.display(),
            pipeline = self.pipeline,
            watch = self.watch.display(),
            extra = self.watch_extra,
            nas = self.nas.display(),
            nas_extra = self.nas_extra,
        )
    }

    pub fn config_path(&self) -> PathBuf {
        let p = self.tmp.path().join("config.toml");
        std::fs::write(&p, self.config_text()).unwrap();
        p
    }

    pub fn config(&self) -> Config {
        Config::parse(&self.config_text(), "test config").unwrap()
    }

    /// Run the CLI binary with this setup's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("PANOPTIC_SYNC_LOG", "warn")
            .envs(self.cmd_env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }

    /// Start the CLI binary's `run` in the background (killed if the test fails); its log
    /// goes to `daemon.log` in the temp dir.
    ///
    /// Returns once the daemon holds the state directory (its pid is in the lock file) or has
    /// exited: a CLI command run right after would otherwise take the state lock first and
    /// the daemon would exit, saying another process uses the state directory.
    pub fn spawn_run(&self) -> ChildGuard {
        let log = std::fs::File::create(self.tmp.path().join("daemon.log")).unwrap();
        let mut child = ChildGuard(
            Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
                .arg("--config")
                .arg(self.config_path())
                .arg("run")
                .envs(self.cmd_env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_to_string(self.state.join("lock"))
            .unwrap_or_default()
            .trim()
            != pid
            && child.0.try_wait().unwrap().is_none()
        {
            assert!(
                Instant::now() < deadline,
                "the daemon did not take the state directory within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Create a key file with `keygen` (mode 0600) and return its path.
    pub fn keygen(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        let out = Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .args(["keygen", "--out"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }

    /// Write a file (creating directories).
    pub fn write(&self, rel: &str, data: &[u8]) -> PathBuf {
        let p = self.watch.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        p
    }

    /// What the destinations must hold: key (relative to the destination base) → sha256 of
    /// every file in the tree except `*.tmp`.
    pub fn expected(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for e in walkdir::WalkDir::new(&self.watch) {
            let e = e.unwrap();
            if e.file_type().is_file() && !e.path().to_string_lossy().ends_with(".tmp") {
                let rel = e.path().strip_prefix(&self.watch).unwrap();
                let data = std::fs::read(e.path()).unwrap();
                out.insert(format!("ci/{NODE}/{}", rel.display()), sha_hex(&data));
            }
        }
        out
    }

    /// The S3 primary's artifacts (key relative to the base), read with boto3; the agent's
    /// own objects (`_panoptic-sync/`: node status) are left out.
    pub fn s3_objects(&self, s3: &S3) -> BTreeMap<String, String> {
        s3.objects(&self.bucket, "base/")
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("base/").to_string(), v))
            .filter(|(k, _)| !k.starts_with("_panoptic-sync/"))
            .collect()
    }

    /// The file:// backup's content (every file under it, staging files included).
    pub fn nas_objects(&self) -> BTreeMap<String, String> {
        dir_objects(&self.nas)
    }

    /// Status as JSON, from the CLI.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Write `data` to `path` with mtime `secs` (since the epoch), atomically (a `.tmp` name, which
/// the tests' watches exclude, then a rename), as `cp -p` or an artifact cache leaves copies:
/// duplicates written like this have equal metadata, so they may become server-side copies.
pub fn write_preserved(path: &Path, data: &[u8], secs: u64) {
    let tmp = path.with_extension("dup.tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Every file under `dir`: relative path → contents.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            out.insert(rel, std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// A child process killed when dropped (test-owned servers and proxies).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// Send SIGTERM and wait (at most 60 s) for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The environment variable `name`, which `scripts/test` sets; a clear panic otherwise.
pub fn test_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test, which starts the servers")
    })
}

/// Run `tests/cloud_check.py` and parse its JSON answer.
pub fn cloud_check(args: &[&str]) -> BTreeMap<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cloud_check.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cloud_check {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A TCP proxy to `target` ("http://127.0.0.1:PORT") that drops every `every`-th connection.
pub fn flaky_proxy(target: &str, every: u32) -> (String, ChildGuard) {
    faulty_proxy(target, every, "drop", None)
}

/// A TCP proxy to `target` that, on every `every`-th connection, does `mode`: `drop` (close
/// at once) or `5xx` (answer the first request with 500 InternalError or 503 SlowDown).
/// Each fault appends a line to `count_file` when given.
pub fn faulty_proxy(
    target: &str,
    every: u32,
    mode: &str,
    count_file: Option<&Path>,
) -> (String, ChildGuard) {
    use std::io::BufRead;
    let target_port = target.rsplit(':').next().unwrap().trim_end_matches('/');
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/flaky_proxy.py");
    let mut args = vec![target_port.to_string(), every.to_string(), mode.to_string()];
    args.extend(count_file.map(|p| p.display().to_string()));
    let mut child = Command::new("python3")
        .arg(script)
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The proxy prints its port once it listens.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("flaky proxy port");
    (format!("http://127.0.0.1:{port}"), ChildGuard(child))
}

/// The daemon running in-process.
pub struct Daemon {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    pub fn start(config: Config) -> Daemon {
        let token = CancellationToken::new();
        let handle = tokio::spawn(panoptic_sync::daemon::run(config, token.clone()));
        Daemon { token, handle }
    }

    /// Stop it (as SIGTERM would) and return its result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("daemon did not stop within 60 s")
            .expect("daemon task panicked")
    }
}

/// Run the CLI binary with this setup's config on a blocking thread (the test's runtime keeps
/// serving meanwhile) and return its output.
pub async fn cli_async(env: &Env, args: &[&str]) -> Output {
    let cfg = env.config_path();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let vars = env.cmd_env.clone();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(cfg)
            .args(args)
            .env("PANOPTIC_SYNC_LOG", "warn")
            .envs(vars)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Run `flush --all-destinations` on a blocking thread and return its output.
pub async fn flush_all(env: &Env, timeout: &str) -> Output {
    cli_async(env, &["flush", "--all-destinations", "--timeout", timeout]).await
}

/// The content of a file:// store at `dir`: every file under it (staging files included),
/// by path relative to `dir`, with its SHA-256.
pub fn dir_objects(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return out;
    }
    // A live store renames staging files into place while it is read: a file that vanished
    // between the listing and the read is skipped.
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_file()
            && let Ok(data) = std::fs::read(e.path())
        {
            let rel = e.path().strip_prefix(dir).unwrap();
            out.insert(rel.display().to_string(), sha_hex(&data));
        }
    }
    out
}

/// Held by the tests that load the whole machine (thousands of files, kill loops, rename
/// storms, a hung server with a deadline), so no two of them run at once: on 2 cores one of
/// them beside another starved the backup past its deadline.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Headless Chromium (scripts/test installs it) with a profile under `profile_dir`, no
/// network services, and `args` (e.g. `--screenshot=..` or `--dump-dom`, then a URL).
pub fn chromium(profile_dir: &Path, args: &[String]) -> std::process::Output {
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
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .args(args)
        .output()
        .expect("chromium (scripts/test installs it)");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A PNG screenshot that shows something: a blank page compresses to a few KiB.
pub fn assert_screenshot_has_content(png: &Path, min_bytes: usize) {
    let data = std::fs::read(png).unwrap();
    assert_eq!(&data[1..4], b"PNG", "{}", png.display());
    assert!(
        data.len() > min_bytes,
        "screenshot {} looks empty ({} bytes)",
        png.display(),
        data.len()
    );
}

/// Parse the Prometheus text format into (name{labels}, value) pairs.
pub fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("a sample line");
            (name.to_string(), value.parse::<f64>().expect("a number"))
        })
        .collect()
}

/// GET with curl: (status, body); status 0 when nothing answered.
pub fn http_get(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap_or(0), body.to_string())
}

//! Core benchmarks (run with `cargo bench --bench core`; needs `s3s-fs` on PATH, which
//! `scripts/test` installs):
//!
//! 1. indexing throughput: files stat'ed, hashed and recorded per second on a fresh index,
//!    then the catch-up pass over the same unchanged tree (nothing is read again);
//! 2. close-to-durable latency: the running daemon with an S3 primary on a local s3s-fs,
//!    files closed at 20/s, time from close to the upload being recorded as done (which
//!    happens only after the store acknowledged the object).

use std::sync::Arc;
use std::time::{Duration, Instant};

use panoptic_sync::config::Config;
use panoptic_sync::index::{Index, now_ms};
use panoptic_sync::ingest::{Ingest, IngestStats};
use panoptic_sync::scan::{self, Feeder, Root};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const DIRS: usize = 50;
const PER_DIR: usize = 400;
const LATENCY_FILES: usize = 200;

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        indexing().await;
        latency().await;
    });
}

async fn indexing() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let mut payload = vec![0u8; 2048];
    for d in 0..DIRS {
        let dir = tree.join(format!("dir-{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..PER_DIR {
            fastrand::fill(&mut payload[..64]);
            std::fs::write(dir.join(format!("file-{f}.log")), &payload).unwrap();
        }
    }
    let total = (DIRS * PER_DIR) as f64;
    let config = Config::parse(
        &format!(
            "node_id = \"bench\"\nstate_dir = \"{}\"\n[[watch]]\npath = \"{}\"\n[[destination]]\nname = \"a\"\nurl = \"file://{}\"\n[[destination]]\nname = \"b\"\nurl = \"file://{}\"\n",
            tmp.path().join("state").display(),
            tree.display(),
            tmp.path().join("a").display(),
            tmp.path().join("b").display()
        ),
        "bench",
    )
    .unwrap();
    let index = Arc::new(Index::open(&config.state_dir).unwrap());
    let roots = Arc::new(Root::from_config(&config));
    for pass in [
        "fresh index (stat + hash + record)",
        "unchanged tree (stat + one index range scan per directory)",
    ] {
        let (feeder, rx, outstanding) = Feeder::new(65_536, Some(index.clone()));
        let ingest = Ingest {
            index: index.clone(),
            roots: roots.clone(),
            dests: vec!["a".into(), "b".into()],
            wake: vec![Arc::new(Notify::new())],
            outstanding,
            stats: Arc::new(IngestStats::default()),
            metrics: Arc::new(panoptic_sync::metrics::Metrics::new()),
            closed: feeder.closed(),
        };
        let start = Instant::now();
        let thread = std::thread::spawn(move || ingest.run(rx));
        let f = feeder.clone();
        let r = roots.clone();
        tokio::task::spawn_blocking(move || scan::walk_all(&r, &f))
            .await
            .unwrap();
        while feeder.outstanding() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        drop(feeder);
        thread.join().unwrap();
        println!(
            "indexing, {pass}: {total} files in {secs:.3} s = {:.0} files/s",
            total / secs
        );
    }
}

async fn latency() {
    let tmp = tempfile::tempdir().unwrap();
    let s3root = tmp.path().join("s3");
    std::fs::create_dir_all(s3root.join("bench")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "bench", "--secret-key", "bench-secret"])
        .arg(&s3root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("s3s-fs on PATH (scripts/test installs it)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let config = Config::parse(
        &format!(
            "node_id = \"bench\"\nstate_dir = \"{}\"\n[[watch]]\npath = \"{}\"\n[[destination]]\nname = \"primary\"\nurl = \"s3://bench/x\"\noptions = {{ endpoint = \"http://127.0.0.1:{port}\", allow_http = \"true\", access_key_id = \"bench\", secret_access_key = \"bench-secret\", region = \"us-east-1\", metadata_endpoint = \"http://127.0.0.1:9\" }}\n",
            tmp.path().join("state").display(),
            tree.display(),
        ),
        "bench",
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let daemon = tokio::spawn(panoptic_sync::daemon::run(config.clone(), cancel.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut closed = Vec::new();
    let mut payload = vec![0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for i in 0..LATENCY_FILES {
        tick.tick().await;
        fastrand::fill(&mut payload);
        let p = tree.join(format!("f-{i}.log"));
        std::fs::write(&p, &payload).unwrap();
        closed.push((format!("bench/f-{i}.log"), now_ms()));
    }
    let db = rusqlite::Connection::open(config.state_dir.join("index.sqlite3")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lat: Vec<i64> = loop {
        let done: Vec<(String, i64)> = db
            .prepare("SELECT key, done_ms FROM uploads WHERE state = 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if done.len() == LATENCY_FILES {
            let map: std::collections::HashMap<_, _> = done.into_iter().collect();
            break closed.iter().map(|(k, t)| map[k] - t).collect();
        }
        assert!(Instant::now() < deadline, "uploads did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cancel.cancel();
    daemon.await.unwrap().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "close-to-durable latency, {LATENCY_FILES} files of 4 KiB at 20/s to s3s-fs: p50 {} ms, p99 {} ms, max {} ms",
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
}

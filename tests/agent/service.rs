//! Running as a systemd service: the unit passes systemd's own checks, the daemon speaks
//! sd_notify (READY, WATCHDOG, STATUS, RELOADING, STOPPING), and SIGHUP reloads the config.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::assert_ok;
use crate::util::*;

fn unit_for_test(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/panoptic-sync.service"),
    )
    .unwrap();
    // The unit names the installed binary; point it at the one under test.
    let unit = unit.replace(
        "/usr/bin/panoptic-sync",
        env!("CARGO_BIN_EXE_panoptic-sync"),
    );
    let p = dir.join("panoptic-sync.service");
    std::fs::write(&p, unit).unwrap();
    p
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_scores_2_or_better() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (scripts/test installs systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "verify failed: {text}");
    assert!(
        !text.contains("panoptic-sync.service"),
        "verify warns: {text}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("panoptic-sync.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in: {text}"));
    assert!(score <= 2.0, "exposure {score} > 2.0");
}

/// Collects every datagram sent to a NOTIFY_SOCKET.
struct NotifySocket {
    path: std::path::PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let m = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => m
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
                if Arc::strong_count(&m) == 1 {
                    break;
                }
            }
        });
        NotifySocket { path, messages }
    }

    fn count(&self, what: &str) -> usize {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.lines().any(|l| l == what))
            .count()
    }

    fn any_starting(&self, prefix: &str) -> bool {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.lines().any(|l| l.starts_with(prefix)))
    }
}

fn spawn_notified(env: &Env, sock: &NotifySocket, watchdog_usec: u64) -> ChildGuard {
    ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_panoptic-sync"))
            .arg("--config")
            .arg(env.config_path())
            .arg("run")
            .env("NOTIFY_SOCKET", &sock.path)
            .env("WATCHDOG_USEC", watchdog_usec.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_speaks_sd_notify_ready_watchdog_status_and_stopping() {
    let env = Env::new();
    let sock = NotifySocket::new(env.tmp.path());
    let mut child = spawn_notified(&env, &sock, 400_000);
    wait_until(Duration::from_secs(30), "READY=1", || {
        sock.count("READY=1") >= 1
    })
    .await;
    wait_until(Duration::from_secs(30), "three WATCHDOG=1", || {
        sock.count("WATCHDOG=1") >= 3
    })
    .await;
    wait_until(Duration::from_secs(30), "STATUS=", || {
        sock.any_starting("STATUS=")
    })
    .await;
    assert_eq!(sock.count("STOPPING=1"), 0);
    signal(&child.0, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child.0).await.code(), Some(0));
    wait_until(Duration::from_secs(5), "STOPPING=1", || {
        sock.count("STOPPING=1") == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_picks_up_a_new_watch_root_and_rejects_a_broken_config() {
    let mut env = Env::new();
    let sock = NotifySocket::new(env.tmp.path());
    let mut child = spawn_notified(&env, &sock, 10_000_000);
    wait_until(Duration::from_secs(30), "READY=1", || {
        sock.count("READY=1") >= 1
    })
    .await;

    // A second watch root, added by reload.
    let second = env.tmp.path().join("second");
    std::fs::create_dir(&second).unwrap();
    env.watch_extra = format!(
        "\n[[watch]]\npath = \"{}\"\nprefix = \"second/{{node}}\"\nsettle_ms = 300\n",
        second.display()
    );
    env.config_path();
    signal(&child.0, libc::SIGHUP);
    wait_until(Duration::from_secs(30), "RELOADING=1 then READY=1", || {
        sock.count("RELOADING=1") == 1 && sock.count("READY=1") >= 2
    })
    .await;
    std::fs::write(second.join("new-root.txt"), b"picked up after reload").unwrap();
    env.write("first.txt", b"still watched");
    assert_ok(&flush_all(&env, "60s").await, "flush after reload");
    let objects = env.s3_objects(shared_s3());
    assert_eq!(
        objects.get(&format!("second/{NODE}/new-root.txt")),
        Some(&sha_hex(b"picked up after reload"))
    );

    // A broken config is rejected; the daemon keeps running with the old one.
    std::fs::write(env.config_path(), "this is = = not toml").unwrap();
    signal(&child.0, libc::SIGHUP);
    wait_until(
        Duration::from_secs(30),
        "second RELOADING=1 answered",
        || sock.count("RELOADING=1") == 2 && sock.count("READY=1") >= 3,
    )
    .await;
    assert!(child.0.try_wait().unwrap().is_none(), "the daemon exited");
    std::fs::write(second.join("after-bad.txt"), b"old config still runs").unwrap();
    wait_until(
        Duration::from_secs(60),
        "file uploaded under the kept config",
        || {
            env.nas_objects()
                .contains_key(&format!("second/{NODE}/after-bad.txt"))
        },
    )
    .await;
    signal(&child.0, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child.0).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_metrics_port_are_capped_and_timed_out() {
    // Reproduced: 1,100 idle connections to the metrics port took the daemon's descriptors
    // at the default soft limit of 1,024, and new files were not stored.
    let mut env = Env::new();
    let port = free_port();
    env.tail = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let daemon = env.spawn_run();
    let pid = daemon.0.id();
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    wait_until(Duration::from_secs(30), "/healthz answers", || {
        http_get(&healthz).0 == 200
    })
    .await;
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Over the next 3 s (the daemon accepts them from its backlog meanwhile), the
    // descriptors it holds stay near the cap of 64, never one per client.
    let window = Instant::now() + Duration::from_secs(3);
    let mut most = before;
    while Instant::now() < window {
        most = most.max(fds());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        most < before + 64 + 16,
        "{most} descriptors with 300 idle connections ({before} before)"
    );
    // Files are still stored.
    env.write("during/idle.log", b"stored while 300 clients idle");
    wait_until(Duration::from_secs(30), "the file stored", || {
        env.nas
            .join(format!("ci/{}/during/idle.log", env.node))
            .is_file()
    })
    .await;
    // An idle connection is closed at the header deadline, and /healthz answers again.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 16];
    let closed = match std::io::Read::read(&mut first, &mut buf) {
        Ok(0) => true,
        Ok(_) => true, // an answer (408) then the close
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the idle connection was closed by the daemon");
    wait_until(Duration::from_secs(30), "/healthz answers again", || {
        http_get(&healthz).0 == 200
    })
    .await;
    drop(idle);
}

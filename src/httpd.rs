//! A bounded HTTP/1.1 server for the daemon's own ports (`[metrics] listen`, `serve`): at most
//! a fixed number of connections at once (others are closed as they are accepted, so idle
//! clients cannot take the process's descriptors), a deadline for a request's headers, a
//! deadline for a whole connection, and a prompt stop on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;

/// How a server is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are closed when accepted.
    pub connections: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Time a connection may stay open in all (a streamed download included).
    pub connection_timeout: Duration,
}

impl Limits {
    /// For `/metrics` and `/healthz`: small answers, few scrapers.
    pub const METRICS: Limits = Limits {
        connections: 64,
        header_timeout: Duration::from_secs(5),
        connection_timeout: Duration::from_secs(30),
    };

    /// For `serve`: pages and files, some large (a 4 GiB log streams for a while).
    pub const GATEWAY: Limits = Limits {
        connections: 256,
        header_timeout: Duration::from_secs(10),
        connection_timeout: Duration::from_secs(6 * 3600),
    };
}

/// Counts of what the server refused, for tests and logs.
#[derive(Debug, Default)]
pub struct Refused {
    /// Connections closed because the cap was reached.
    pub over_cap: AtomicU64,
}

/// Serve `app` on `listener` until `shutdown`, within `limits`. `what` names the server in
/// logs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    what: &'static str,
    shutdown: CancellationToken,
) -> Arc<Refused> {
    let refused = Arc::new(Refused::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a moment instead of spinning.
                    tracing::warn!(server = what, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let n = refused.over_cap.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    server = what,
                    cap = limits.connections,
                    refused = n + 1,
                    "too many connections: closing new ones"
                );
            }
            drop(stream);
            continue;
        };
        let app = app.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            serve_one(stream, peer, app, limits, stop).await;
        });
    }
    // Shutdown: connections still open are dropped with the tasks.
    tasks.shutdown().await;
    refused
}

async fn serve_one(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let service = TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        res = tokio::time::timeout(limits.connection_timeout, conn.as_mut()) => match res {
            Ok(Err(e)) if !e.is_incomplete_message() => {
                tracing::debug!(%peer, error = %e, "connection ended with an error")
            }
            Ok(_) => {}
            Err(_) => tracing::debug!(%peer, "connection closed at its deadline"),
        },
        _ = stop.cancelled() => {}
    }
}

/// Bind `addr`; the error names the address and what it was for.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for {what} on {addr}: {e}"))
}

//! The status endpoint on `--listen`: `GET /metrics` (Prometheus text), `GET /healthz` (200
//! `ok` while streaming, 503 with the reason otherwise), `GET /status` (JSON); `HEAD` of each.
//!
//! Served by hyper (HTTP/1.1) and kept apart from the streaming path, so that whoever can reach
//! the port cannot slow archiving down:
//! * it runs on its own thread and runtime, at a lower CPU priority (nice +10) than the agent's
//!   streaming thread;
//! * at most [`MAX_CONNECTIONS`] connections are open at once: the next one is not even
//!   accepted (it waits in the kernel's backlog) until one closes, so descriptors stay for the
//!   archive; at start the agent raises its soft descriptor limit to the hard one;
//! * each connection has one deadline ([`CONNECTION_DEADLINE`]) for reading the request and
//!   writing the answer, and serves one request;
//! * accept errors (`EMFILE`, …) back off (10 ms doubling to 1 s) instead of spinning, and are
//!   logged at most once a second.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;

/// What the endpoint serves: the agent's [`crate::metrics::Metrics`], or the copier's.
pub trait Endpoint: Send + Sync + 'static {
    fn prometheus(&self) -> String;
    fn status_json(&self) -> serde_json::Value;
    /// `Ok` for 200 on /healthz, else the reason for a 503.
    fn health(&self) -> Result<(), String>;
}

impl Endpoint for crate::metrics::Metrics {
    fn prometheus(&self) -> String {
        crate::metrics::Metrics::prometheus(self)
    }
    fn status_json(&self) -> serde_json::Value {
        crate::metrics::Metrics::status_json(self)
    }
    fn health(&self) -> Result<(), String> {
        crate::metrics::Metrics::health(self)
    }
}

type Metrics = dyn Endpoint;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a connection may take, from accept to the last byte of the answer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// The bound socket (bound before the agent starts, so a busy port fails the start).
pub fn bind(addr: &str) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("listen on {addr}\nHINT: choose a free address with --listen (or drop --listen)"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A running endpoint: its thread, stopped by cancelling its token.
pub struct Server {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Server {
    /// Serve `listener` on a thread of its own until [`Server::stop`].
    pub fn start(listener: std::net::TcpListener, metrics: Arc<dyn Endpoint>) -> Result<Self> {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new().name("walvault-http".into()).spawn(move || {
            lower_priority();
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return tracing::error!("status endpoint: cannot start its runtime: {e}"),
            };
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => serve(l, metrics, token).await,
                    Err(e) => tracing::error!("status endpoint: {e}"),
                }
            });
        })?;
        Ok(Server { thread: Some(thread), stop })
    }

    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// nice +10 for this thread (Linux: a thread id is a process id for setpriority).
fn lower_priority() {
    // SAFETY: gettid and setpriority have no memory-safety preconditions.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Raise the soft limit on open files to the hard limit (best effort), so that descriptors
/// are not what a busy agent runs out of.
pub fn raise_fd_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(10);
    let mut last_log = std::time::Instant::now() - Duration::from_secs(10);
    loop {
        // A slot first: beyond the cap, connections wait unaccepted in the kernel's backlog.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let sock = match accepted {
            Ok((sock, _)) => {
                backoff = Duration::from_millis(10);
                sock
            }
            Err(e) => {
                if last_log.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!("status endpoint: accept failed: {e}; backing off {backoff:?}");
                    last_log = std::time::Instant::now();
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, metrics.as_ref())) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
            drop(permit);
        });
    }
}

/// The answer to one request.
fn answer(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.prometheus()),
        "/status" => (StatusCode::OK, "application/json", metrics.status_json().to_string()),
        "/healthz" => match metrics.health() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "try /metrics, /status or /healthz\n".to_string()),
    };
    // hyper sends no body for HEAD, with the Content-Length GET would have.
    let (status, body) = match *req.method() {
        Method::GET | Method::HEAD => (status, body),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    resp
}

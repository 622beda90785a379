//! The status endpoint on `--listen`: `GET /metrics` (Prometheus text), `GET /healthz`
//! (200 `ok` while streaming or reconnecting normally, 503 with the reason otherwise),
//! `GET /status` (JSON). A deliberately tiny HTTP/1.1 responder: one request per connection.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}\nHINT: choose a free address with --listen"))
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read until the end of the request head (or the buffer is full).
            while n < buf.len() {
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(m)) => n += m,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.prometheus()),
                "/status" => ("200 OK", "application/json", metrics.status_json().to_string()),
                "/healthz" => {
                    if metrics.up.get() == 1 {
                        ("200 OK", "text/plain", "ok\n".to_string())
                    } else {
                        ("503 Service Unavailable", "text/plain", "not streaming\n".to_string())
                    }
                }
                _ => ("404 Not Found", "text/plain", "try /metrics, /status or /healthz\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

//! The observability kit in deploy/observability against what the agent really exports, checked
//! with Prometheus' own tool (`promtool`): the alert rules parse, a live `/metrics` scrape of
//! the agent and of the copier passes `promtool check metrics`, and every walvault metric the
//! rules and the Grafana dashboard use is exported.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use walvault_shared::lsn::Lsn;
use walvault_tests::agent::{workspace_binary, Agent};
use walvault_tests::pg::{PgCluster, PgOptions};

const PROMTOOL: &str = "/usr/bin/promtool";

fn deploy(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability").join(file)
}

/// `promtool check metrics` on a scrape: (success, its output).
fn check_metrics(scrape: &str) -> (bool, String) {
    let mut c = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (tests/run.sh installs Debian's prometheus package)");
    c.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// The names of the series in a scrape.
fn names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split([' ', '{']).next().map(String::from))
        .collect()
}

/// Every `walvault_…` identifier in a file.
fn used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(p) = text[i..].find("walvault_") {
        let start = i + p;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_string());
        i = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_dashboard_and_live_metrics_agree_and_pass_promtool() {
    walvault_tests::init_logging();
    let rules = deploy("walvault-alerts.yml");
    let o = Command::new(PROMTOOL).args(["check", "rules"]).arg(&rules).output().expect("promtool");
    assert!(
        o.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let dashboard = std::fs::read_to_string(deploy("walvault-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    assert!(d["panels"].as_array().unwrap().len() >= 8);

    let pg = PgCluster::start_new("observability", PgOptions::default()).unwrap();
    let (_keep, archive, _) = walvault_tests::local_archive().unwrap();
    let mut agent = Agent::start(&pg.url(), &archive, &["--no-backups"]).unwrap();
    pg.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)").await.unwrap();
    let end: Lsn = pg.query_one_text("SELECT pg_current_wal_flush_lsn()").await.unwrap().parse().unwrap();
    agent.wait_archived(end, Duration::from_secs(60)).await.unwrap();
    let (_, scrape) = agent.http_get("/metrics").await.unwrap();
    let (ok, out) = check_metrics(&scrape);
    assert!(ok, "promtool check metrics on the agent's /metrics:\n{out}\n{scrape}");
    let mut exported = names(&scrape);

    // The copier's /metrics.
    let copy_dir = walvault_tests::test_root().unwrap().join(format!("obs-copy-{:08x}", rand::random::<u32>()));
    let port = walvault_tests::free_port().unwrap();
    let mut copier = Command::new(workspace_binary("walvault-agent").unwrap())
        .args([
            "copy",
            "--from",
            &archive,
            "--to",
            copy_dir.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut copy_scrape = String::new();
    for _ in 0..100 {
        if let Ok(body) = http_get(port, "/metrics").await {
            if body.contains("walvault_copy_passes_total 1") || body.contains("walvault_copy_passes_total 2") {
                copy_scrape = body;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    copier.kill().unwrap();
    copier.wait().unwrap();
    assert!(!copy_scrape.is_empty(), "the copier served its metrics after a pass");
    let (ok, out) = check_metrics(&copy_scrape);
    assert!(ok, "promtool check metrics on the copier's /metrics:\n{out}\n{copy_scrape}");
    exported.extend(names(&copy_scrape));

    let mut wanted = used(&std::fs::read_to_string(&rules).unwrap());
    wanted.extend(used(&dashboard));
    let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used by the rules or the dashboard but not exported: {missing:?}\nexported: {exported:?}"
    );
    assert!(wanted.len() >= 15, "the kit covers the main series: {wanted:?}");
    assert_eq!(agent.stop().unwrap(), 0);
}

async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

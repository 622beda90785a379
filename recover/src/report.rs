//! `walvault-recover report`: the disaster-recovery plan's table, made of measurements.
//!
//! Per scenario, where the data would come from and what the archive proves about it:
//! * **database corruption or a bad change** → point-in-time restore from the archive: the
//!   achieved RPO is irrelevant (the target is a time before the damage), the RTO is the last
//!   drill's;
//! * **loss of the database host** → restore from the archive: the achieved RPO over the period
//!   (`audit`'s p99 and max) and how old the newest archived commit is now;
//! * **loss of the archive's provider or region** → restore from the copy (`walvault-agent
//!   copy`, `--copy URL`): the same, measured on the copy (what the copy lags is in its RPO and
//!   data age), and the last drill run against the copy.
//!
//! Each row is checked against `--rpo-target` and `--rto-target`: a row passes when its
//! measured RPO (the larger of the period's max and the newest commit's age) and its last
//! measured RTO are within them, and a drill passed within `--max-drill-age`. Exit 0 when every
//! row passes, 1 when one does not (or nothing was measured), 2 on error.

use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use walvault_shared::archive::drills;
use walvault_shared::archive::read::Reader;

use crate::audit::{self, AuditOptions};

#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub restore_from: String,
    pub rpo_p99_s: Option<f64>,
    pub rpo_max_s: Option<f64>,
    /// Seconds between the newest archived commit and now.
    pub newest_commit_age_s: Option<f64>,
    pub last_rto_s: Option<f64>,
    pub last_drill_age_days: Option<f64>,
    pub rpo_met: Option<bool>,
    pub rto_met: Option<bool>,
    pub pass: bool,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(with = "walvault_shared::time::rfc3339")]
    pub at: DateTime<Utc>,
    pub since: String,
    pub rpo_target_s: Option<f64>,
    pub rto_target_s: Option<f64>,
    pub max_drill_age_days: f64,
    pub rows: Vec<Row>,
    pub pass: bool,
}

pub struct ReportOptions {
    pub since: DateTime<Utc>,
    pub rpo_target: Option<Duration>,
    pub rto_target: Option<Duration>,
    pub max_drill_age: Duration,
}

/// What one archive (the main one or the copy) shows.
struct Measured {
    url: String,
    rpo_p99: Option<f64>,
    rpo_max: Option<f64>,
    newest_commit: Option<DateTime<Utc>>,
    drill: Option<drills::DrillRecord>,
}

async fn measure(reader: &Reader, o: &ReportOptions) -> Result<Measured> {
    let a = audit::audit(reader, &AuditOptions { since: Some(o.since), until: None, rpo_target: None }).await?;
    let listing = {
        let id = walvault_shared::archive::identity::load_existing(reader).await?;
        reader.wal_listing(id.wal_segment_size).await?
    };
    let (records, _) = reader.chunk_records(&listing).await?;
    let newest_commit = records.iter().filter_map(|r| r.commits.as_ref().and_then(|c| c.last)).max();
    Ok(Measured {
        url: reader.url(),
        rpo_p99: a.p99_rpo_s,
        rpo_max: a.max_rpo_s,
        newest_commit,
        drill: drills::newest_pass_quick(reader).await?,
    })
}

fn row(scenario: &'static str, m: &Measured, o: &ReportOptions, use_rpo: bool, now: DateTime<Utc>) -> Row {
    let age = m.newest_commit.map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
    let drill_age = m.drill.as_ref().map(|d| (now - d.finished_at).num_seconds() as f64 / 86400.0);
    let rto = m.drill.as_ref().and_then(|d| d.rto_seconds);
    let mut notes = Vec::new();
    let rpo_met = match (use_rpo, o.rpo_target) {
        (true, Some(t)) => {
            let worst = m.rpo_max.unwrap_or(f64::INFINITY).max(age.unwrap_or(f64::INFINITY));
            if m.rpo_max.is_none() {
                notes.push("no commits measured in the period".into());
            }
            Some(worst <= t.as_secs_f64())
        }
        _ => None,
    };
    let rto_met = o.rto_target.map(|t| rto.is_some_and(|r| r <= t.as_secs_f64()));
    let fresh = drill_age.is_some_and(|d| d <= o.max_drill_age.as_secs_f64() / 86400.0);
    if m.drill.is_none() {
        notes.push("never drilled: run walvault-recover verify against it".into());
    } else if !fresh {
        notes.push("the last passed drill is older than --max-drill-age".into());
    }
    let pass = rpo_met != Some(false) && rto_met != Some(false) && fresh;
    Row {
        scenario,
        restore_from: m.url.clone(),
        rpo_p99_s: m.rpo_p99.filter(|_| use_rpo),
        rpo_max_s: m.rpo_max.filter(|_| use_rpo),
        newest_commit_age_s: age.filter(|_| use_rpo),
        last_rto_s: rto,
        last_drill_age_days: drill_age,
        rpo_met,
        rto_met,
        pass,
        notes,
    }
}

pub async fn report(archive: &Reader, copy: Option<&Reader>, o: &ReportOptions) -> Result<Report> {
    let now = walvault_shared::time::now();
    let main = measure(archive, o).await?;
    let mut rows = vec![
        row("database corruption or a bad change: point-in-time restore", &main, o, false, now),
        row("loss of the database host: restore from the archive", &main, o, true, now),
    ];
    match copy {
        Some(c) => {
            let m = measure(c, o).await?;
            rows.push(row("loss of the archive's provider or region: restore from the copy", &m, o, true, now));
        }
        None => rows.push(Row {
            scenario: "loss of the archive's provider or region: restore from the copy",
            restore_from: "-".into(),
            rpo_p99_s: None,
            rpo_max_s: None,
            newest_commit_age_s: None,
            last_rto_s: None,
            last_drill_age_days: None,
            rpo_met: None,
            rto_met: None,
            pass: false,
            notes: vec!["no copy: keep one with walvault-agent copy, give it with --copy".into()],
        }),
    }
    let pass = rows.iter().all(|r| r.pass);
    Ok(Report {
        at: now,
        since: walvault_shared::time::text(o.since),
        rpo_target_s: o.rpo_target.map(|d| d.as_secs_f64()),
        rto_target_s: o.rto_target.map(|d| d.as_secs_f64()),
        max_drill_age_days: o.max_drill_age.as_secs_f64() / 86400.0,
        rows,
        pass,
    })
}

fn s(x: Option<f64>, unit: &str) -> String {
    x.map(|v| format!("{v:.1} {unit}")).unwrap_or_else(|| "-".into())
}

fn yes(x: Option<bool>) -> &'static str {
    match x {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "-",
    }
}

pub fn text(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "disaster-recovery report, {} (period since {}; RPO target {}, RTO target {}, drills at most {:.0} days old)",
        walvault_shared::time::text(r.at),
        r.since,
        s(r.rpo_target_s, "s"),
        s(r.rto_target_s, "s"),
        r.max_drill_age_days
    );
    for row in &r.rows {
        let _ = writeln!(out, "\n{}: {}", row.scenario, if row.pass { "PASS" } else { "FAIL" });
        let _ = writeln!(out, "  restore from:        {}", row.restore_from);
        if row.rpo_met.is_some() || row.rpo_max_s.is_some() {
            let _ = writeln!(
                out,
                "  achieved RPO:        p99 {}, max {}; newest commit {} old ({})",
                s(row.rpo_p99_s, "s"),
                s(row.rpo_max_s, "s"),
                s(row.newest_commit_age_s, "s"),
                yes(row.rpo_met)
            );
        }
        let _ = writeln!(
            out,
            "  last measured RTO:   {} ({}); last passed drill {} days ago",
            s(row.last_rto_s, "s"),
            yes(row.rto_met),
            row.last_drill_age_days.map(|d| format!("{d:.1}")).unwrap_or_else(|| "-".into())
        );
        for n in &row.notes {
            let _ = writeln!(out, "  note: {n}");
        }
    }
    let _ = writeln!(
        out,
        "\n{}",
        if r.pass { "every scenario within its targets" } else { "NOT every scenario is within its targets" }
    );
    out
}

pub fn html(r: &Report) -> String {
    let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut rows = String::new();
    for row in &r.rows {
        rows.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            if row.pass { "pass" } else { "fail" },
            esc(row.scenario),
            esc(&row.restore_from),
            s(row.rpo_max_s, "s"),
            s(row.newest_commit_age_s, "s"),
            s(row.last_rto_s, "s"),
            row.last_drill_age_days.map(|d| format!("{d:.1}")).unwrap_or_else(|| "-".into()),
            if row.pass { "PASS" } else { "FAIL" },
            esc(&row.notes.join("; "))
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>walvault disaster-recovery report</title>\
         <style>body{{font-family:sans-serif}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd}}.fail{{background:#fdd}}.pass{{background:#dfd}}</style></head>\
         <body><h1>Disaster-recovery report</h1><p>{} &mdash; period since {}; RPO target {}, RTO target {}</p>\
         <table><tr><th>scenario</th><th>restore from</th><th>max RPO</th><th>newest commit age</th><th>last RTO</th><th>drill age (days)</th><th>result</th><th>notes</th></tr>\n{rows}</table></body></html>\n",
        walvault_shared::time::text(r.at),
        esc(&r.since),
        s(r.rpo_target_s, "s"),
        s(r.rto_target_s, "s")
    )
}

//! `walvault-recover audit`: the RPO actually achieved, from archive metadata alone.
//!
//! **Achieved RPO of a commit** = the time its WAL became durable in the archive minus its
//! commit time (both as recorded: the commit timestamp inside the WAL record, the time the
//! store acknowledged the object holding the record's last byte). It is what a crash of the
//! primary at the worst moment would have lost.
//!
//! Sources, cheapest first: the commit index (`index/day/*`, `index/batch/*`: a few GETs per
//! month), then the metadata of segments and chunks the index does not cover yet (one ranged
//! GET each: recent WAL only), and for objects written without commit statistics, their WAL
//! itself (one GET per segment, read with `shared::walreader`). Each chunk record gives its durable time `D`, commit count `n`,
//! first and last commit times `F`, `L`: its commits' RPOs lie in `[D−L, D−F]`; the maximum
//! (`D−F`) is exact; percentiles treat the `n` commits as spread evenly between `F` and `L`.
//! Commits made while the agent or the archive was down are archived late, so an outage shows
//! as a window of high RPO, never as silence.
//!
//! Also reported: gaps (LSN ranges missing between archived WAL, per timeline), timelines, and
//! the recoverable window. Exit codes: 0 target met and no gaps; 1 target missed or gaps;
//! 2 error (including an empty archive or a wrong prefix).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use walvault_shared::archive::backup;
use walvault_shared::archive::read::Reader;
use walvault_shared::archive::walcat::{ChunkRecord, WalCatalog};
use walvault_shared::lsn::{Lsn, TimelineId};

pub struct AuditOptions {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub rpo_target: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Period {
    pub start: String,
    pub commits: u64,
    pub max_rpo_s: f64,
    pub p99_rpo_s: f64,
    pub p50_rpo_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub timeline: TimelineId,
    pub first_commit: String,
    pub last_commit: String,
    pub durable_at: String,
    pub commits: u64,
    pub max_rpo_s: f64,
    pub lsn_start: Lsn,
    pub lsn_end: Lsn,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub timeline: TimelineId,
    pub from: Lsn,
    pub to: Lsn,
    /// When the WAL before the gap and after it became durable (the gap's place in time).
    #[serde(with = "walvault_shared::time::rfc3339_opt")]
    pub from_time: Option<DateTime<Utc>>,
    #[serde(with = "walvault_shared::time::rfc3339_opt")]
    pub to_time: Option<DateTime<Utc>>,
}

/// What the HTML chart draws.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Chart {
    /// `minute`, `hour` or `day`.
    pub resolution: String,
    pub periods: Vec<Period>,
    /// Backups (id, stop time) inside the charted span.
    pub backups: Vec<(String, String)>,
    /// The recoverable window: the first backup's end to the newest durable WAL.
    #[serde(with = "walvault_shared::time::rfc3339_opt")]
    pub recoverable_from: Option<DateTime<Utc>>,
    #[serde(with = "walvault_shared::time::rfc3339_opt")]
    pub recoverable_to: Option<DateTime<Utc>>,
}

/// The period length for a span: minutes up to 6 hours, hours up to 6 days, then days.
fn resolution(span: chrono::Duration) -> (&'static str, i64, &'static str) {
    if span <= chrono::Duration::hours(6) {
        ("minute", 60, "%Y-%m-%dT%H:%MZ")
    } else if span <= chrono::Duration::days(6) {
        ("hour", 3600, "%Y-%m-%dT%H:00Z")
    } else {
        ("day", 86400, "%Y-%m-%d")
    }
}

#[derive(Debug, Serialize)]
pub struct AuditReport {
    pub archive: String,
    pub since: Option<String>,
    pub until: Option<String>,
    pub commits: u64,
    pub max_rpo_s: Option<f64>,
    pub p99_rpo_s: Option<f64>,
    pub p50_rpo_s: Option<f64>,
    pub rpo_target_s: Option<f64>,
    pub target_met: Option<bool>,
    pub per_day: Vec<Period>,
    pub per_hour: Vec<Period>,
    pub worst_windows: Vec<Window>,
    pub gaps: Vec<Gap>,
    pub timelines: Vec<serde_json::Value>,
    pub recoverable_from: Option<String>,
    pub recoverable_to_lsn: Option<Lsn>,
    /// The chart: periods of a length that fits the audited span (minutes for hours, hours for
    /// days, days beyond), with the backups and gaps that fall in it.
    pub chart: Chart,
    pub objects_read: usize,
    pub chunk_records: usize,
    pub records_without_commit_data: usize,
    /// The newest restore drill that passed (recorded by `walvault-recover verify`): when it
    /// finished, its age in days at the audit, and the RTO it measured.
    pub last_drill_pass_at: Option<String>,
    pub last_drill_age_days: Option<f64>,
    pub last_drill_rto_s: Option<f64>,
    pub pass: bool,
}

/// (commit time, rpo seconds, weight)
type Sample = (DateTime<Utc>, f64, f64);

fn samples_of(r: &ChunkRecord) -> Vec<Sample> {
    let Some(c) = &r.commits else { return Vec::new() };
    let (Some(f), Some(l), d) = (c.first, c.last, r.durable_at) else {
        return Vec::new();
    };
    if c.count == 0 {
        return Vec::new();
    }
    let k = c.count.min(5);
    let w = c.count as f64 / k as f64;
    (0..k)
        .map(|i| {
            let frac = if k == 1 { 0.0 } else { i as f64 / (k - 1) as f64 };
            let t = f + chrono::Duration::microseconds(((l - f).num_microseconds().unwrap_or(0) as f64 * frac) as i64);
            let rpo = (d - t).num_microseconds().unwrap_or(0) as f64 / 1e6;
            (t, rpo.max(0.0), w)
        })
        .collect()
}

fn weighted_percentile(v: &mut [(f64, f64)], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    let total: f64 = v.iter().map(|x| x.1).sum();
    let mut acc = 0.0;
    for (x, w) in v.iter() {
        acc += w;
        if acc >= total * p {
            return *x;
        }
    }
    v.last().map(|x| x.0).unwrap_or(0.0)
}

fn period(start: String, s: &[Sample]) -> Period {
    let mut v: Vec<(f64, f64)> = s.iter().map(|x| (x.1, x.2)).collect();
    Period {
        start,
        commits: s.iter().map(|x| x.2).sum::<f64>().round() as u64,
        max_rpo_s: v.iter().map(|x| x.0).fold(0.0, f64::max),
        p99_rpo_s: weighted_percentile(&mut v, 0.99),
        p50_rpo_s: weighted_percentile(&mut v, 0.50),
    }
}

pub async fn audit(reader: &Reader, opts: &AuditOptions) -> Result<AuditReport> {
    let id = walvault_shared::archive::identity::load_existing(reader).await?;
    let seg = id.wal_segment_size;
    let listing = reader.wal_listing(seg).await?;
    if listing.objects.is_empty() {
        bail!("the archive {} holds no WAL: nothing to audit\nHINT: check the archive URL and prefix, and that walvault-agent run streams into it", reader.url());
    }
    let cat = &listing.catalog;
    let (records, objects_read) = reader.chunk_records(&listing).await?;
    let in_period = |t: DateTime<Utc>| opts.since.is_none_or(|s| t >= s) && opts.until.is_none_or(|u| t < u);
    let all: Vec<Sample> = records.iter().flat_map(samples_of).filter(|s| in_period(s.0)).collect();
    let (gaps, timelines) = gaps_and_timelines(cat, &records);
    let backups = backup::complete(reader, seg).await.unwrap_or_default();
    let mut all_w: Vec<(f64, f64)> = all.iter().map(|x| (x.1, x.2)).collect();
    let max = all.iter().map(|x| x.1).fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let target = opts.rpo_target.map(|d| d.as_secs_f64());
    let target_met = target.map(|t| max.is_none_or(|m| m <= t));
    let drill = walvault_shared::archive::drills::newest_pass_quick(reader).await.unwrap_or(None);
    Ok(AuditReport {
        archive: reader.url(),
        since: opts.since.map(|t| t.to_rfc3339()),
        until: opts.until.map(|t| t.to_rfc3339()),
        commits: all.iter().map(|x| x.2).sum::<f64>().round() as u64,
        max_rpo_s: max,
        p99_rpo_s: (!all_w.is_empty()).then(|| weighted_percentile(&mut all_w, 0.99)),
        p50_rpo_s: (!all_w.is_empty()).then(|| weighted_percentile(&mut all_w, 0.50)),
        rpo_target_s: target,
        target_met,
        per_day: periods(&all, 86400, "%Y-%m-%d"),
        per_hour: periods(&all, 3600, "%Y-%m-%dT%H:00Z"),
        worst_windows: worst_windows(&records, &in_period),
        pass: gaps.is_empty() && target_met.unwrap_or(true),
        gaps,
        timelines,
        recoverable_from: backups
            .first()
            .map(|b| format!("{} ({}, backup {})", b.stop_lsn, walvault_shared::time::text(b.stop_time), b.id)),
        recoverable_to_lsn: cat.highest_timeline().and_then(|t| cat.ranges(t).last().map(|r| r.1)),
        chart: chart(&all, &backups, &records),
        objects_read,
        chunk_records: records.len(),
        records_without_commit_data: records.iter().filter(|r| r.commits.is_none()).count(),
        last_drill_pass_at: drill.as_ref().map(|d| walvault_shared::time::text(d.finished_at)),
        last_drill_age_days: drill
            .as_ref()
            .map(|d| (walvault_shared::time::now() - d.finished_at).num_seconds() as f64 / 86400.0),
        last_drill_rto_s: drill.as_ref().and_then(|d| d.rto_seconds),
    })
}

/// The samples bucketed by whole periods of `secs` since the epoch, labelled with `fmt`.
fn periods(all: &[Sample], secs: i64, fmt: &str) -> Vec<Period> {
    let mut buckets: BTreeMap<i64, Vec<Sample>> = BTreeMap::new();
    for s in all {
        buckets.entry(s.0.timestamp().div_euclid(secs)).or_default().push(*s);
    }
    let key = |k: i64| DateTime::from_timestamp(k * secs, 0).unwrap_or_default().format(fmt).to_string();
    buckets.into_iter().map(|(k, v)| period(key(k), &v)).collect()
}

/// The five chunks whose earliest commit (in the period) waited longest.
fn worst_windows(records: &[ChunkRecord], in_period: &dyn Fn(DateTime<Utc>) -> bool) -> Vec<Window> {
    let mut worst: Vec<Window> = records
        .iter()
        .filter_map(|r| {
            let c = r.commits.as_ref()?;
            let f = c.first.filter(|f| in_period(*f))?;
            let d = r.durable_at;
            Some(Window {
                timeline: r.timeline,
                first_commit: walvault_shared::time::text(f),
                last_commit: walvault_shared::time::text(c.last?),
                durable_at: walvault_shared::time::text(d),
                commits: c.count,
                max_rpo_s: (d - f).num_microseconds().unwrap_or(0) as f64 / 1e6,
                lsn_start: r.start_lsn,
                lsn_end: r.end_lsn,
            })
        })
        .collect();
    worst.sort_by(|a, b| b.max_rpo_s.partial_cmp(&a.max_rpo_s).unwrap_or(std::cmp::Ordering::Equal));
    worst.truncate(5);
    worst
}

/// Gaps (missing LSN ranges between archived WAL, each placed in time by the durable times of
/// the WAL around it) and a summary per timeline.
fn gaps_and_timelines(cat: &WalCatalog, records: &[ChunkRecord]) -> (Vec<Gap>, Vec<serde_json::Value>) {
    let mut gaps = Vec::new();
    let mut timelines = Vec::new();
    for tli in cat.timelines.keys() {
        let ranges = cat.ranges(*tli);
        let durable_near = |lsn: Lsn, before: bool| {
            records
                .iter()
                .find(|r| r.timeline == *tli && if before { r.end_lsn == lsn } else { r.start_lsn == lsn })
                .map(|r| r.durable_at)
        };
        for w in ranges.windows(2) {
            gaps.push(Gap {
                timeline: *tli,
                from: w[0].1,
                to: w[1].0,
                from_time: durable_near(w[0].1, true),
                to_time: durable_near(w[1].0, false),
            });
        }
        timelines.push(serde_json::json!({
            "timeline": tli,
            "history_file": cat.histories.contains(tli),
            "wal": ranges.iter().map(|r| serde_json::json!({"start": r.0, "end": r.1})).collect::<Vec<_>>(),
        }));
    }
    (gaps, timelines)
}

/// Bucket the samples at a resolution that fits their span.
fn chart(
    all: &[Sample],
    backups: &[walvault_shared::archive::backup::BackupDescription],
    records: &[ChunkRecord],
) -> Chart {
    let (Some(first), Some(last)) = (all.iter().map(|s| s.0).min(), all.iter().map(|s| s.0).max()) else {
        return Chart::default();
    };
    let (name, secs, fmt) = resolution(last - first);
    Chart {
        resolution: name.to_string(),
        periods: periods(all, secs, fmt),
        backups: backups
            .iter()
            .filter(|b| b.stop_time >= first && b.stop_time <= last)
            .map(|b| (b.id.clone(), walvault_shared::time::text(b.stop_time)))
            .collect(),
        recoverable_from: backups.first().map(|b| b.stop_time),
        recoverable_to: records.iter().map(|r| r.durable_at).max(),
    }
}

pub fn table(r: &AuditReport) -> String {
    let mut s = String::new();
    let f = |x: Option<f64>| x.map(|v| format!("{v:.2} s")).unwrap_or_else(|| "-".into());
    let _ = writeln!(s, "RPO audit of {}", r.archive);
    let _ =
        writeln!(s, "period: {} .. {}", r.since.as_deref().unwrap_or("beginning"), r.until.as_deref().unwrap_or("now"));
    let _ = writeln!(
        s,
        "commits: {}   achieved RPO: max {}  p99 {}  p50 {}",
        r.commits,
        f(r.max_rpo_s),
        f(r.p99_rpo_s),
        f(r.p50_rpo_s)
    );
    if let Some(t) = r.rpo_target_s {
        let _ = writeln!(s, "RPO target {t:.2} s: {}", if r.target_met == Some(true) { "MET" } else { "MISSED" });
    }
    match (&r.last_drill_pass_at, r.last_drill_age_days) {
        (Some(at), Some(age)) => {
            let _ = writeln!(
                s,
                "last passed restore drill: {at} ({age:.1} days ago){}",
                r.last_drill_rto_s.map(|x| format!(", measured RTO {x:.1} s")).unwrap_or_default()
            );
        }
        _ => {
            let _ = writeln!(s, "last passed restore drill: none recorded (walvault-recover verify records one)");
        }
    }
    let _ = writeln!(s, "\nper day:\n  {:<12} {:>9} {:>10} {:>10} {:>10}", "day", "commits", "max", "p99", "p50");
    for p in &r.per_day {
        let _ = writeln!(
            s,
            "  {:<12} {:>9} {:>9.2}s {:>9.2}s {:>9.2}s",
            p.start, p.commits, p.max_rpo_s, p.p99_rpo_s, p.p50_rpo_s
        );
    }
    let _ = writeln!(
        s,
        "\nper hour (hours with commits):\n  {:<18} {:>9} {:>10} {:>10} {:>10}",
        "hour", "commits", "max", "p99", "p50"
    );
    for p in &r.per_hour {
        let _ = writeln!(
            s,
            "  {:<18} {:>9} {:>9.2}s {:>9.2}s {:>9.2}s",
            p.start, p.commits, p.max_rpo_s, p.p99_rpo_s, p.p50_rpo_s
        );
    }
    let _ = writeln!(s, "\nworst windows (commits archived latest):");
    for w in &r.worst_windows {
        let _ = writeln!(
            s,
            "  {:.2} s: {} commits from {} to {}, durable at {} (timeline {}, {}..{})",
            w.max_rpo_s, w.commits, w.first_commit, w.last_commit, w.durable_at, w.timeline, w.lsn_start, w.lsn_end
        );
    }
    let _ = writeln!(s, "\ngaps: {}", if r.gaps.is_empty() { "none".to_string() } else { String::new() });
    for g in &r.gaps {
        let _ = writeln!(s, "  timeline {}: WAL missing from {} to {}", g.timeline, g.from, g.to);
    }
    let _ = writeln!(
        s,
        "\nrecoverable from {} to {}",
        r.recoverable_from.as_deref().unwrap_or("(no complete backup)"),
        r.recoverable_to_lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "read {} objects for {} chunk records ({} without commit data)",
        r.objects_read, r.chunk_records, r.records_without_commit_data
    );
    let _ = writeln!(s, "result: {}", if r.pass { "PASS" } else { "FAIL" });
    s
}

/// A self-contained HTML page: an SVG chart of the maximum (bars) and p99 (line) RPO per
/// period (minutes, hours or days, whichever fits the span), the RPO target (red line), backups
/// (green ticks), gaps (grey bands) and the recoverable window (blue band under the axis), then
/// the report's tables. The SVG scales to the page width; long lines wrap.
pub fn html(r: &AuditReport) -> String {
    let (w, h, pad, bottom) = (960.0, 340.0, 48.0, 60.0);
    let periods = &r.chart.periods;
    let parse = |s: &str| -> Option<DateTime<Utc>> {
        walvault_shared::time::parse(s)
            .or_else(|| {
                chrono::NaiveDateTime::parse_from_str(&format!("{s}:00"), "%Y-%m-%dT%H:%MZ:%S")
                    .ok()
                    .map(|t| t.and_utc())
            })
            .or_else(|| {
                chrono::NaiveDateTime::parse_from_str(&format!("{s}T00:00"), "%Y-%m-%dT%H:%M").ok().map(|t| t.and_utc())
            })
    };
    let step = match r.chart.resolution.as_str() {
        "minute" => 60,
        "hour" => 3600,
        _ => 86400,
    };
    let starts: Vec<Option<DateTime<Utc>>> = periods.iter().map(|p| parse(&p.start)).collect();
    let t0 = starts.iter().flatten().min().copied().unwrap_or_default();
    let t1 = starts.iter().flatten().max().copied().unwrap_or(t0) + chrono::Duration::seconds(step);
    let span = (t1 - t0).num_seconds().max(1) as f64;
    let x =
        |t: DateTime<Utc>| pad + ((t - t0).num_milliseconds() as f64 / 1000.0 / span).clamp(0.0, 1.0) * (w - 2.0 * pad);
    let bw = ((w - 2.0 * pad) * step as f64 / span).max(1.0);
    let ymax = periods.iter().map(|p| p.max_rpo_s).fold(r.rpo_target_s.unwrap_or(1.0), f64::max).max(0.001) * 1.1;
    let y = |v: f64| h - bottom - (v / ymax) * (h - bottom - pad);
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('\'', "&#39;");
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {w} {h}' width='100%' style='max-width:{w}px' font-family='sans-serif' font-size='11'>"
    );
    // The recoverable window under the axis, gaps behind the bars.
    if let (Some(a), Some(b)) = (r.chart.recoverable_from, r.chart.recoverable_to) {
        let (xa, xb) = (x(a.max(t0)), x(b.min(t1)));
        if xb > xa {
            let _ = write!(svg, "<rect x='{xa:.1}' y='{:.1}' width='{:.1}' height='6' fill='#9cc3ff'><title>recoverable from {} to {}</title></rect>", h - bottom + 4.0, xb - xa, walvault_shared::time::text(a), walvault_shared::time::text(b));
        }
    }
    for g in &r.gaps {
        if let (Some(a), Some(b)) = (g.from_time, g.to_time) {
            let (xa, xb) = (x(a), x(b));
            let _ = write!(svg, "<rect x='{xa:.1}' y='{pad}' width='{:.1}' height='{:.1}' fill='#ccc'><title>gap: WAL {}..{} missing (timeline {})</title></rect>", (xb - xa).max(2.0), h - bottom - pad, g.from, g.to, g.timeline);
        }
    }
    let _ = write!(svg, "<line x1='{pad}' y1='{}' x2='{}' y2='{}' stroke='#333'/>", h - bottom, w - pad, h - bottom);
    let _ = write!(svg, "<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{}' stroke='#333'/>", h - bottom);
    let _ = write!(svg, "<text x='4' y='{}'>{ymax:.1}s</text><text x='4' y='{}'>0</text>", pad, h - bottom);
    let mut line = String::new();
    for (p, t) in periods.iter().zip(&starts) {
        let Some(t) = t else { continue };
        let bx = x(*t);
        let _ = write!(svg, "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='{:.1}' fill='#4a7bd0'><title>{} max {:.2}s p99 {:.2}s p50 {:.2}s, {} commits</title></rect>", bx + 0.5, y(p.max_rpo_s), (bw - 1.0).max(1.0), (h - bottom - y(p.max_rpo_s)).max(0.0), esc(&p.start), p.max_rpo_s, p.p99_rpo_s, p.p50_rpo_s, p.commits);
        let _ = write!(line, "{:.1},{:.1} ", bx + bw / 2.0, y(p.p99_rpo_s));
    }
    let _ = write!(svg, "<polyline points='{line}' fill='none' stroke='#e8a33d' stroke-width='2'/>");
    for (id, t) in &r.chart.backups {
        if let Some(t) = walvault_shared::time::parse(t) {
            let bx = x(t);
            let _ = write!(svg, "<line x1='{bx:.1}' y1='{pad}' x2='{bx:.1}' y2='{}' stroke='#2a9d3a' stroke-dasharray='2'><title>backup {}</title></line>", h - bottom, esc(id));
        }
    }
    if let Some(t) = r.rpo_target_s {
        let _ = write!(svg, "<line x1='{pad}' y1='{:.1}' x2='{}' y2='{:.1}' stroke='red' stroke-dasharray='4'/><text x='{}' y='{:.1}' fill='red' text-anchor='end'>target {t:.1}s</text>", y(t), w - pad, y(t), w - pad, y(t) - 3.0);
    }
    // Time axis: five ticks, labelled at the chart's resolution.
    let fmt = match r.chart.resolution.as_str() {
        "minute" => "%H:%M",
        "hour" => "%m-%d %H:00",
        _ => "%Y-%m-%d",
    };
    for i in 0..=4 {
        let t = t0 + chrono::Duration::seconds((span * i as f64 / 4.0) as i64);
        let tx = x(t);
        let anchor = match i {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = write!(svg, "<line x1='{tx:.1}' y1='{}' x2='{tx:.1}' y2='{}' stroke='#333'/><text x='{tx:.1}' y='{}' text-anchor='{anchor}'>{}</text>", h - bottom, h - bottom + 3.0, h - bottom + 24.0, t.format(fmt));
    }
    let _ = write!(
        svg,
        "<text x='{pad}' y='{}'>UTC, one bar per {}; from {} to {}</text>",
        h - 8.0,
        r.chart.resolution,
        t0.format("%Y-%m-%d %H:%M"),
        t1.format("%Y-%m-%d %H:%M")
    );
    svg.push_str("</svg>");
    format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>walvault RPO audit</title>\
         <style>body{{font-family:sans-serif;max-width:1000px;margin:1em auto;padding:0 1em}}pre{{white-space:pre-wrap;overflow-wrap:anywhere}}</style></head><body>\
         <h1>Achieved RPO: {}</h1><p>Bars: maximum RPO per {}; orange line: p99; red: target; green: backups; grey: gaps \
         (missing WAL); blue under the axis: the recoverable window. Achieved RPO of a commit = when its WAL became durable \
         in the archive − its commit time.</p>{svg}<pre>{}</pre></body></html>",
        esc(&r.archive),
        r.chart.resolution,
        esc(&table(r))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_resolution_fits_the_span() {
        assert_eq!(resolution(chrono::Duration::minutes(40)).0, "minute");
        assert_eq!(resolution(chrono::Duration::days(2)).0, "hour");
        assert_eq!(resolution(chrono::Duration::days(30)).0, "day");
    }

    #[test]
    fn a_short_period_is_drawn_in_minutes_with_its_backups_and_no_overflow() {
        let t = |m: i64| walvault_shared::time::parse("2026-11-26T14:00:00Z").unwrap() + chrono::Duration::minutes(m);
        let samples: Vec<Sample> = (0..30).map(|m| (t(m), 0.5 + m as f64 / 100.0, 1.0)).collect();
        let c = chart(&samples, &[], &[]);
        assert_eq!(c.resolution, "minute");
        assert_eq!(c.periods.len(), 30);
        assert_eq!(c.periods[0].start, "2026-11-26T14:00Z");
        let r = AuditReport {
            archive: "file:///x".into(),
            since: None,
            until: None,
            commits: 30,
            max_rpo_s: Some(0.8),
            p99_rpo_s: Some(0.8),
            p50_rpo_s: Some(0.6),
            rpo_target_s: Some(1.0),
            target_met: Some(true),
            per_day: vec![],
            per_hour: vec![],
            worst_windows: vec![],
            last_drill_pass_at: None,
            last_drill_age_days: None,
            last_drill_rto_s: None,
            gaps: vec![Gap {
                timeline: TimelineId(1),
                from: Lsn(1),
                to: Lsn(2),
                from_time: Some(t(10)),
                to_time: Some(t(12)),
            }],
            timelines: vec![],
            recoverable_from: None,
            recoverable_to_lsn: None,
            chart: Chart { backups: vec![("20261126T141500Z".into(), walvault_shared::time::text(t(15)))], ..c },
            objects_read: 0,
            chunk_records: 0,
            records_without_commit_data: 0,
            pass: true,
        };
        let page = html(&r);
        assert!(page.contains("one bar per minute") && page.contains(">14:00<") && page.contains(">14:30<"), "{page}");
        assert!(page.contains("backup 20261126T141500Z") && page.contains("gap: WAL"));
        assert!(page.contains("viewBox") && page.contains("overflow-wrap:anywhere"));
        assert_eq!(page.matches("<rect").count(), 31, "30 bars and a gap band");
    }
}

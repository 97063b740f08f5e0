//! `bench-report RESULTS.jsonl [--footprint F.json] [--roundtrips F.txt] [--heading TEXT]`:
//! the Markdown tables of `docs/performance.md` from `loadgen`'s JSON lines.
//!
//! Every figure is the median over repetitions with the min–max range; ratios divide medians of
//! the same run. Targets are the ones of issue 14 (64 connections unless said), including the
//! comparison with the peer, ldclabs' idempotent-proxy; the peer's wrong answers (not 2xx,
//! transport errors) are listed under the tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Parser;
use idemgate_bench::{Mode, RunResult, median_min_max};

#[derive(Parser)]
#[command(about = "Markdown tables from loadgen's results")]
struct Args {
    /// `loadgen` JSON lines.
    results: PathBuf,
    /// `record-footprint` JSON lines (one per repetition).
    #[arg(long)]
    footprint: Option<PathBuf>,
    /// Text to include verbatim (store round trips).
    #[arg(long)]
    roundtrips: Option<PathBuf>,
}

/// Runs grouped by (delay, connections, label, mode).
type Groups = BTreeMap<(u64, usize, String, Mode), Vec<RunResult>>;

fn group(results: Vec<RunResult>) -> Groups {
    let mut groups = Groups::new();
    for r in results {
        groups
            .entry((r.delay_ms, r.connections, r.label(), r.mode))
            .or_default()
            .push(r);
    }
    groups
}

fn stat(runs: &[RunResult], f: impl Fn(&RunResult) -> f64) -> Option<(f64, f64, f64)> {
    median_min_max(&runs.iter().map(f).collect::<Vec<_>>())
}

fn thousands(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1} k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn millis(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

/// The order rows appear in: baselines first, then stores in the order of the issue.
fn row_rank(label: &str, mode: Mode) -> (usize, Mode) {
    let order = [
        "upstream",
        "nginx",
        "idemgate (memory)",
        "idemgate (file)",
        "idemgate (file-redb)",
        "idemgate (redis)",
        "idemgate (postgres)",
        "idempotent-proxy (memory)",
        "idempotent-proxy (redis)",
    ];
    let rank = order
        .iter()
        .position(|o| *o == label)
        .unwrap_or(order.len());
    (rank, mode)
}

fn mode_title(label: &str, mode: Mode) -> &'static str {
    if label == "upstream" {
        return "direct (no proxy)";
    }
    if !label.starts_with("idemgate") && !label.starts_with("idempotent-proxy") {
        return "plain proxying";
    }
    match mode {
        Mode::Unique => "first execution",
        Mode::Replay => "replay",
        Mode::None => "no key (pass-through)",
    }
}

fn rows(groups: &Groups, delay: u64) -> Vec<(String, Mode)> {
    let mut rows: Vec<(String, Mode)> = groups
        .keys()
        .filter(|k| k.0 == delay)
        .map(|k| (k.2.clone(), k.3))
        .collect();
    rows.sort_by_key(|(l, m)| row_rank(l, *m));
    rows.dedup();
    rows
}

fn throughput_table(out: &mut String, groups: &Groups, delay: u64) {
    let conns: Vec<usize> = {
        let mut c: Vec<usize> = groups
            .keys()
            .filter(|k| k.0 == delay)
            .map(|k| k.1)
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let _ = write!(out, "| target | path |");
    for c in &conns {
        let _ = write!(out, " {c} conn req/s | p50 / p99 / p99.9 ms |");
    }
    let _ = write!(out, "\n| --- | --- |");
    for _ in &conns {
        let _ = write!(out, " --- | --- |");
    }
    out.push('\n');
    for (label, mode) in rows(groups, delay) {
        let _ = write!(out, "| {label} | {} |", mode_title(&label, mode));
        for c in &conns {
            match groups.get(&(delay, *c, label.clone(), mode)) {
                Some(runs) => {
                    let (rps, lo, hi) = stat(runs, |r| r.rps).unwrap_or_default();
                    let p50 = stat(runs, |r| r.p50_us as f64).unwrap_or_default().0;
                    let p99 = stat(runs, |r| r.p99_us as f64).unwrap_or_default().0;
                    let p999 = stat(runs, |r| r.p999_us as f64).unwrap_or_default().0;
                    let _ = write!(
                        out,
                        " {} ({}–{}) | {} / {} / {} |",
                        thousands(rps),
                        thousands(lo),
                        thousands(hi),
                        millis(p50),
                        millis(p99),
                        millis(p999)
                    );
                }
                None => out.push_str(" – | – |"),
            }
        }
        out.push('\n');
    }
}

fn median_of(
    groups: &Groups,
    delay: u64,
    conns: usize,
    label: &str,
    mode: Mode,
    f: impl Fn(&RunResult) -> f64,
) -> Option<f64> {
    groups
        .get(&(delay, conns, label.to_owned(), mode))
        .and_then(|runs| stat(runs, f))
        .map(|s| s.0)
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**missed**" }
}

fn targets_table(out: &mut String, groups: &Groups) {
    out.push_str("| target | measured | goal | verdict |\n| --- | --- | --- | --- |\n");
    let rps = |label: &str, mode| median_of(groups, 0, 64, label, mode, |r| r.rps);
    // nginx and the upstream forward the key header untouched; their runs are labelled `unique`.
    let baselines = [
        ("nginx", rps("nginx", Mode::Unique)),
        ("the upstream alone", rps("upstream", Mode::Unique)),
    ];
    // (what, label, mode, goal, baseline index): issue 14's goals, 64 connections.
    let ratio_rows = [
        (
            "memory store, no key (pass-through)",
            "idemgate (memory)",
            Mode::None,
            1.0,
            0,
        ),
        (
            "memory store, first execution",
            "idemgate (memory)",
            Mode::Unique,
            1.0,
            0,
        ),
        (
            "file (fjall) store, first execution",
            "idemgate (file)",
            Mode::Unique,
            0.5,
            0,
        ),
        (
            "file store on redb (`?engine=redb`), first execution",
            "idemgate (file-redb)",
            Mode::Unique,
            0.5,
            0,
        ),
        (
            "Redis store, first execution",
            "idemgate (redis)",
            Mode::Unique,
            0.6,
            0,
        ),
        (
            "PostgreSQL store, first execution",
            "idemgate (postgres)",
            Mode::Unique,
            0.3,
            0,
        ),
        (
            "memory store, replay",
            "idemgate (memory)",
            Mode::Replay,
            0.7,
            1,
        ),
        (
            "file (fjall) store, replay",
            "idemgate (file)",
            Mode::Replay,
            0.7,
            1,
        ),
        (
            "file store on redb (`?engine=redb`), replay",
            "idemgate (file-redb)",
            Mode::Replay,
            0.7,
            1,
        ),
        (
            "Redis store, replay",
            "idemgate (redis)",
            Mode::Replay,
            0.7,
            1,
        ),
        (
            "PostgreSQL store, replay",
            "idemgate (postgres)",
            Mode::Replay,
            0.7,
            1,
        ),
    ];
    for (what, label, mode, goal, base) in ratio_rows {
        let (name, Some(n)) = baselines[base] else {
            continue;
        };
        let Some(v) = rps(label, mode) else {
            continue;
        };
        let ratio = v / n;
        let _ = writeln!(
            out,
            "| {what}, 64 conn | {ratio:.2}× {name} ({} vs {} req/s) | ≥ {goal:.1}× {name} | {} |",
            thousands(v),
            thousands(n),
            verdict(ratio >= goal)
        );
    }
    for (what, label, goal_ms) in [
        ("memory", "idemgate (memory)", 1.0),
        ("Redis", "idemgate (redis)", 2.0),
    ] {
        let base = median_of(groups, 5, 16, "upstream", Mode::Unique, |r| r.p99_us as f64);
        let with = median_of(groups, 5, 16, label, Mode::Unique, |r| r.p99_us as f64);
        if let (Some(base), Some(with)) = (base, with) {
            let added = (with - base) / 1000.0;
            let _ = writeln!(
                out,
                "| p99 added over the 5 ms upstream, {what} store, first execution, 16 conn | {added:.2} ms ({} vs {} ms) | ≤ {goal_ms:.0} ms | {} |",
                millis(with),
                millis(base),
                verdict(added <= goal_ms)
            );
        }
    }
    // The peer: idemgate ≥ 4× it on Redis first executions, and ahead on every row it has.
    for (what, store, mode, goal) in [
        ("Redis, first execution", "redis", Mode::Unique, 4.0),
        ("Redis, replay", "redis", Mode::Replay, 1.0),
        ("memory, first execution", "memory", Mode::Unique, 1.0),
        ("memory, replay", "memory", Mode::Replay, 1.0),
    ] {
        let (Some(ours), Some(theirs)) = (
            rps(&format!("idemgate ({store})"), mode),
            rps(&format!("idempotent-proxy ({store})"), mode),
        ) else {
            continue;
        };
        let ratio = ours / theirs;
        let goal_text = if goal > 1.0 {
            format!("≥ {goal:.0}× it")
        } else {
            "ahead of it".to_owned()
        };
        let _ = writeln!(
            out,
            "| against idempotent-proxy: {what}, 64 conn | {ratio:.2}× it ({} vs {} req/s) | {goal_text} | {} |",
            thousands(ours),
            thousands(theirs),
            verdict(ratio >= goal)
        );
    }
}

/// The peer's runs that had answers other than 2xx or transport errors (idemgate's runs fail
/// the benchmark instead).
fn peer_answers(out: &mut String, groups: &Groups) {
    let mut lines = Vec::new();
    for ((delay, conns, label, mode), runs) in groups {
        if !label.starts_with("idempotent-proxy") {
            continue;
        }
        let (bad, errors): (u64, u64) = runs
            .iter()
            .fold((0, 0), |(b, e), r| (b + r.non_2xx, e + r.errors));
        let requests: u64 = runs.iter().map(|r| r.requests).sum();
        if bad + errors > 0 {
            lines.push(format!(
                "- {label}, {}, {conns} conn, upstream {delay} ms: {bad} answers not 2xx and {errors} transport errors, over {} repetition(s) ({requests} answered in the measured windows)",
                mode_title(label, *mode),
                runs.len()
            ));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(
            out,
            "### The peer's wrong answers

{}
",
            lines.join("\n")
        );
    }
}

fn footprint_rows(out: &mut String, path: &PathBuf) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut beyond = Vec::new();
    let mut total = Vec::new();
    let mut records = 0u64;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        records = v["records"].as_u64().unwrap_or(0);
        beyond.push(
            v["bytes_per_record_beyond_body"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        total.push(v["bytes_per_record"].as_f64().unwrap_or(f64::NAN));
    }
    if let (Some(b), Some(t)) = (median_min_max(&beyond), median_min_max(&total)) {
        let _ = writeln!(
            out,
            "| bytes per stored record beyond its body, memory store ({records} records) | {:.0} B (min–max {:.0}–{:.0}; {:.0} B with the body, {:.0} MiB per million) | ≤ 300 B | {} |",
            b.0,
            b.1,
            b.2,
            t.0,
            t.0 * 1e6 / 1_048_576.0,
            verdict(b.0 <= 300.0)
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.results)?;
    let mut results = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: RunResult = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", args.results.display(), i + 1))?;
        results.push(r);
    }
    let reps = results.iter().map(|r| r.rep).max().unwrap_or(0);
    let groups = group(results);
    let mut out = String::new();
    let delays: Vec<u64> = {
        let mut d: Vec<u64> = groups.keys().map(|k| k.0).collect();
        d.dedup();
        d
    };
    let _ = writeln!(out, "### Targets\n");
    targets_table(&mut out, &groups);
    if let Some(path) = &args.footprint {
        footprint_rows(&mut out, path)?;
    }
    out.push('\n');
    for delay in delays {
        let _ = writeln!(
            out,
            "### Upstream service time {delay} ms\n\nMedian of {reps} repetitions (min–max) of requests/s; latency medians in ms.\n"
        );
        throughput_table(&mut out, &groups, delay);
        out.push('\n');
    }
    peer_answers(&mut out, &groups);
    if let Some(path) = &args.roundtrips {
        let _ = writeln!(
            out,
            "### Store round trips per request\n\n```text\n{}```",
            std::fs::read_to_string(path)?
        );
    }
    print!("{out}");
    Ok(())
}

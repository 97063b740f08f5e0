//! `idemgate check`: the command line of the idempotency checker ([`idemgate_check`]).
//!
//! Exit codes: 0 every check passed; 1 at least one violation; 2 a usage error, an unreadable
//! or invalid spec, the target unreachable, or (with no violation) a check that could not be
//! carried out or no check carried out at all (every case skipped).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgGroup, Args};
use idemgate_check::{CheckName, Checker, Config, Progress, Spec};

use crate::config::parse_duration;

/// Usage error, unreadable spec, unreachable target, or a check that could not run (the
/// library's [`idemgate_check::Report::exit_code`] gives 0, 1 and 2 for a finished run).
const USAGE: i32 = 2;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["spec", "openapi"])))]
pub struct CheckArgs {
    /// Base URL of the API under test: http://HOST:PORT[/BASE].
    #[arg(long, value_name = "URL")]
    target: String,
    /// The spec: operations to check and how to see their effects (TOML; see docs/check.md).
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// An OpenAPI 3 document (JSON or YAML) instead of a spec: its POST, PUT and PATCH
    /// operations, bodies from its examples, `x-idempotency` extensions.
    #[arg(long, value_name = "FILE")]
    openapi: Option<PathBuf>,
    /// Also write the report as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Identical requests sent at once by the concurrent check.
    #[arg(long, value_name = "N", default_value_t = 16)]
    concurrency: usize,
    /// A header sent with every request, probes included (repeatable), e.g.
    /// 'Authorization: Bearer …'. Credentials are redacted from reports.
    #[arg(long = "header", value_name = "'Name: value'")]
    headers: Vec<String>,
    /// Run only these checks: replay, concurrent, mismatch, missing-key, lost-response,
    /// in-flight, malformed-key, transient, expiry, precondition.
    #[arg(long, value_name = "CHECK,…", value_delimiter = ',')]
    only: Vec<String>,
    /// Seed of keys, UUIDs and bodies: the same seed repeats a run's requests.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// A replay without `Idempotent-Replayed: true` is a violation (default: a warning).
    #[arg(long)]
    strict_marker: bool,
    /// The target's key TTL: adds the expiry check (waits that long).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Deadline of one exchange (the slow_path must answer within it).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Longest answer body read, in bytes; a check that must compare a longer body is an error.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    body_cap: usize,
}

/// Runs the checks; the process exit code.
pub async fn run(args: CheckArgs) -> i32 {
    match run_checks(args).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("idemgate check: {message}");
            USAGE
        }
    }
}

async fn run_checks(args: CheckArgs) -> Result<i32, String> {
    let spec = match (&args.spec, &args.openapi) {
        (Some(path), _) => Spec::from_toml_file(path),
        (None, Some(path)) => Spec::from_openapi_file(path),
        (None, None) => return Err("--spec or --openapi is required".into()),
    }
    .map_err(|e| e.to_string())?;
    let mut config = Config::new(&args.target)
        .concurrency(args.concurrency)
        .strict_marker(args.strict_marker)
        .timeout(args.timeout)
        .body_cap(args.body_cap);
    config.seed = args.seed;
    config.ttl = args.ttl;
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("--header {header:?}: expected 'Name: value'"))?;
        config = config.header(name.trim(), value.trim());
    }
    if !args.only.is_empty() {
        let only = args
            .only
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.parse::<CheckName>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--only: {e}"))?;
        config = config.only(only);
    }
    let checker = Checker::new(spec, config).map_err(|e| e.to_string())?;
    let progress_on_terminal = std::io::stderr().is_terminal();
    let report = checker
        .run_with(|event| progress(event, progress_on_terminal))
        .await
        .map_err(|e| e.to_string())?;
    // The files first: CI reads them even when stdout is gone (a closed pipe). A file that
    // cannot be written is exit 2, after the human report.
    let mut file_error = None;
    if let Some(path) = &args.junit {
        file_error = write_file(path, |w| report.write_junit(w)).err();
    }
    if let Some(path) = &args.json
        && let Err(e) = write_file(path, |w| report.write_json(w))
    {
        file_error.get_or_insert(e);
    }
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = report
        .write_human(&mut stdout, color)
        .and_then(|()| stdout.flush())
    {
        // The verdict does not depend on the human report reaching anyone.
        eprintln!("idemgate check: cannot write the report to stdout: {e}");
    }
    if let Some(e) = file_error {
        return Err(e);
    }
    if let Some(why) = report.inconclusive() {
        eprintln!("idemgate check: {why}");
    }
    Ok(report.exit_code())
}

fn write_file(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), String> {
    let file =
        std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    write(&mut w)
        .and_then(|()| w.flush())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The progress line on stderr: rewritten in place on a terminal, one line per case elsewhere
/// (CI logs).
fn progress(event: Progress<'_>, terminal: bool) {
    let mut err = std::io::stderr().lock();
    let _ = match event {
        Progress::Started {
            index,
            total,
            operation,
            check,
        } if terminal => write!(err, "\r\x1b[2K[{index}/{total}] {operation} · {check} …"),
        Progress::Started { .. } => Ok(()),
        Progress::Finished { index, total, case } if terminal => {
            if index == total {
                write!(err, "\r\x1b[2K")
            } else {
                write!(
                    err,
                    "\r\x1b[2K[{index}/{total}] {} · {} {}",
                    case.operation,
                    case.check,
                    case.outcome.label()
                )
            }
        }
        Progress::Finished { index, total, case } => writeln!(
            err,
            "[{index}/{total}] {} · {}: {} ({} ms)",
            case.operation,
            case.check,
            case.outcome.label(),
            case.elapsed.as_millis()
        ),
    };
    let _ = err.flush();
}

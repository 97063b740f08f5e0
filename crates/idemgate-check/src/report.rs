//! The outcome of a run: one [`CaseResult`] per operation × check, written as a human report,
//! JUnit XML ([`Report::write_junit`]) or JSON ([`Report::to_json`]).

use std::io::{self, Write};
use std::time::Duration;

use serde::Serialize;

use crate::CheckName;

/// How one check of one operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The behaviour the check asks for was seen.
    Passed,
    /// A violation: the target behaved in a way the check forbids (see [`CaseResult::failures`]).
    Failed,
    /// Not applicable to this operation (e.g. no `slow_path`), with the reason.
    Skipped,
    /// The check could not be carried out (the operation did not succeed in the first place, the
    /// probe could not be read, the target went away): nothing is known either way.
    Error,
}

impl Outcome {
    /// `PASS`, `FAIL`, `SKIP`, `ERROR`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Passed => "PASS",
            Outcome::Failed => "FAIL",
            Outcome::Skipped => "SKIP",
            Outcome::Error => "ERROR",
        }
    }
}

/// A request as sent (credential headers redacted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    /// Method.
    pub method: String,
    /// Full URL.
    pub url: String,
    /// Headers in the order sent; values of credential headers are `<redacted>`.
    pub headers: Vec<(String, String)>,
    /// Body (lossy UTF-8, cut at [`SHOWN_BODY`] bytes).
    pub body: String,
}

/// An answer as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AnswerRecord {
    /// Status code.
    pub status: u16,
    /// Headers (credential-like ones such as `set-cookie` redacted).
    pub headers: Vec<(String, String)>,
    /// Body (lossy UTF-8, cut at [`SHOWN_BODY`] bytes).
    pub body: String,
    /// Length of the body read (at most the run's body cap).
    pub body_bytes: usize,
    /// The answer's body was longer than the run's body cap.
    pub truncated: bool,
    /// Time from sending to the end of the body.
    pub elapsed_ms: u64,
}

/// Bytes of a body kept in a report.
pub const SHOWN_BODY: usize = 2048;

/// One request of a check and what came back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exchange {
    /// Its role in the check (`first`, `retry`, `burst 3/16`, …).
    pub label: String,
    /// What was sent.
    pub request: RequestRecord,
    /// What came back, if anything.
    pub answer: Option<AnswerRecord>,
    /// Why nothing came back (`None` when there is an answer, or when none was awaited).
    pub error: Option<String>,
}

/// The result of one check of one operation (one JUnit testcase).
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// The operation's name.
    pub operation: String,
    /// The check.
    pub check: CheckName,
    /// How it ended.
    pub outcome: Outcome,
    /// One line: the first violation, the reason for a skip or an error, or what passed.
    pub message: String,
    /// Every violation seen.
    pub failures: Vec<String>,
    /// Deviations that are allowed but worth knowing (e.g. `409` where `422` is expected, a
    /// replay without `Idempotent-Replayed`).
    pub warnings: Vec<String>,
    /// What was observed (effects counted, statuses seen).
    pub notes: Vec<String>,
    /// A shell script (curl, and bash's `/dev/tcp` for a lost answer) sending the same requests.
    pub reproducer: Option<String>,
    /// Every request sent and its answer.
    pub exchanges: Vec<Exchange>,
    /// Wall time of the check.
    #[serde(rename = "elapsed_ms", serialize_with = "millis")]
    pub elapsed: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The outcome of a whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The target URL.
    pub target: String,
    /// The seed of the run (`--seed` repeats it).
    pub seed: u64,
    /// Every case, operations in spec order, checks in [`CheckName::ALL`] order.
    pub cases: Vec<CaseResult>,
    /// Wall time of the run.
    #[serde(rename = "elapsed_ms", serialize_with = "millis")]
    pub elapsed: Duration,
}

impl Report {
    /// Cases with this outcome.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.cases.iter().filter(|c| c.outcome == outcome).count()
    }

    /// No violation, no error, and at least one check passed (skips allowed, but a run in
    /// which every case was skipped checked nothing and has not passed).
    pub fn passed(&self) -> bool {
        self.count(Outcome::Failed) == 0
            && self.count(Outcome::Error) == 0
            && self.count(Outcome::Passed) > 0
    }

    /// The exit code of `idemgate check` for this report: `0` passed ([`Report::passed`]); `1`
    /// at least one violation; `2` no violation, but a check could not be carried out, or
    /// nothing was checked (every case skipped).
    pub fn exit_code(&self) -> i32 {
        if self.count(Outcome::Failed) > 0 {
            1
        } else if self.passed() {
            0
        } else {
            2
        }
    }

    /// Why a run without a violation did not pass, for a message: errors, or nothing checked.
    pub fn inconclusive(&self) -> Option<String> {
        if self.count(Outcome::Failed) > 0 || self.passed() {
            return None;
        }
        let errors = self.count(Outcome::Error);
        Some(if errors > 0 {
            format!(
                "{errors} check(s) could not be carried out (ERROR): nothing can be concluded from them"
            )
        } else {
            format!(
                "no check was carried out: all {} case(s) were skipped (see the reasons above)",
                self.cases.len()
            )
        })
    }

    /// The cases that failed, as `(operation, check)`.
    pub fn failed_checks(&self) -> Vec<(&str, CheckName)> {
        self.cases
            .iter()
            .filter(|c| c.outcome == Outcome::Failed)
            .map(|c| (c.operation.as_str(), c.check))
            .collect()
    }

    /// The case of one operation and check, if it ran.
    pub fn case(&self, operation: &str, check: CheckName) -> Option<&CaseResult> {
        self.cases
            .iter()
            .find(|c| c.operation == operation && c.check == check)
    }

    /// The report as JSON: `target`, `seed`, `passed`, `summary` (counts per outcome),
    /// `elapsed_ms` and `cases` (every field of [`CaseResult`]).
    pub fn to_json(&self) -> serde_json::Value {
        let mut doc = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("passed".into(), self.passed().into());
            obj.insert(
                "summary".into(),
                serde_json::json!({
                    "passed": self.count(Outcome::Passed),
                    "failed": self.count(Outcome::Failed),
                    "skipped": self.count(Outcome::Skipped),
                    "errors": self.count(Outcome::Error),
                }),
            );
        }
        doc
    }

    /// Writes the JSON report ([`Report::to_json`]), pretty-printed.
    pub fn write_json(&self, mut w: impl Write) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut w, &self.to_json())?;
        w.write_all(b"\n")
    }

    /// Writes JUnit XML: one `<testsuite>` per operation, one `<testcase>` per check (name = the
    /// check, classname = the operation), `<failure>`, `<error>` and `<skipped>` as usual, the
    /// answers seen and a reproducer in the failure's text, notes and warnings in
    /// `<system-out>`.
    pub fn write_junit(&self, mut w: impl Write) -> io::Result<()> {
        writeln!(w, r#"<?xml version="1.0" encoding="UTF-8"?>"#)?;
        writeln!(
            w,
            r#"<testsuites name="idemgate check" tests="{}" failures="{}" errors="{}" skipped="{}" time="{:.3}">"#,
            self.cases.len(),
            self.count(Outcome::Failed),
            self.count(Outcome::Error),
            self.count(Outcome::Skipped),
            self.elapsed.as_secs_f64()
        )?;
        let mut operations: Vec<&str> = Vec::new();
        for c in &self.cases {
            if !operations.contains(&c.operation.as_str()) {
                operations.push(&c.operation);
            }
        }
        for op in operations {
            let cases: Vec<&CaseResult> = self.cases.iter().filter(|c| c.operation == op).collect();
            let count = |o| cases.iter().filter(|c| c.outcome == o).count();
            let time: f64 = cases.iter().map(|c| c.elapsed.as_secs_f64()).sum();
            writeln!(
                w,
                r#"  <testsuite name="{}" tests="{}" failures="{}" errors="{}" skipped="{}" time="{:.3}">"#,
                xml(op),
                cases.len(),
                count(Outcome::Failed),
                count(Outcome::Error),
                count(Outcome::Skipped),
                time
            )?;
            writeln!(w, "    <properties>")?;
            writeln!(
                w,
                r#"      <property name="target" value="{}"/>"#,
                xml(&self.target)
            )?;
            writeln!(w, r#"      <property name="seed" value="{}"/>"#, self.seed)?;
            writeln!(w, "    </properties>")?;
            for c in cases {
                writeln!(
                    w,
                    r#"    <testcase name="{}" classname="{}" time="{:.3}">"#,
                    c.check,
                    xml(&c.operation),
                    c.elapsed.as_secs_f64()
                )?;
                match c.outcome {
                    Outcome::Passed => {}
                    Outcome::Skipped => {
                        writeln!(w, r#"      <skipped message="{}"/>"#, xml(&c.message))?;
                    }
                    Outcome::Failed | Outcome::Error => {
                        let tag = if c.outcome == Outcome::Failed {
                            "failure"
                        } else {
                            "error"
                        };
                        writeln!(
                            w,
                            r#"      <{tag} message="{}" type="{}">{}</{tag}>"#,
                            xml(&c.message),
                            c.check,
                            xml(&details(c, 0))
                        )?;
                    }
                }
                let out: Vec<String> = c
                    .notes
                    .iter()
                    .cloned()
                    .chain(c.warnings.iter().map(|w| format!("warning: {w}")))
                    .collect();
                if !out.is_empty() {
                    writeln!(w, "      <system-out>{}</system-out>", xml(&out.join("\n")))?;
                }
                writeln!(w, "    </testcase>")?;
            }
            writeln!(w, "  </testsuite>")?;
        }
        writeln!(w, "</testsuites>")
    }

    /// Writes the human report: a line per case, and for each violation or error its details,
    /// the answers seen and a reproducer; a summary last. `color`: ANSI colours (a terminal).
    pub fn write_human(&self, mut w: impl Write, color: bool) -> io::Result<()> {
        let paint = |outcome: Outcome| {
            let label = format!("{:<5}", outcome.label());
            if !color {
                return label;
            }
            let code = match outcome {
                Outcome::Passed => "32",
                Outcome::Failed => "31;1",
                Outcome::Skipped => "33",
                Outcome::Error => "35;1",
            };
            format!("\x1b[{code}m{label}\x1b[0m")
        };
        writeln!(
            w,
            "idemgate check: {} (seed {}; repeat with --seed {})",
            self.target, self.seed, self.seed
        )?;
        let mut last_op: Option<&str> = None;
        for c in &self.cases {
            if last_op != Some(c.operation.as_str()) {
                writeln!(w, "\n{}", c.operation)?;
                last_op = Some(&c.operation);
            }
            writeln!(
                w,
                "  {} {:<15} {}",
                paint(c.outcome),
                c.check.as_str(),
                c.message
            )?;
            for warning in &c.warnings {
                writeln!(w, "        warning: {warning}")?;
            }
            if matches!(c.outcome, Outcome::Failed | Outcome::Error) {
                for line in details(c, 1).lines() {
                    writeln!(w, "        {line}")?;
                }
            }
        }
        writeln!(
            w,
            "\nsummary: {} passed, {} failed, {} skipped, {} errors ({:.1} s)",
            self.count(Outcome::Passed),
            self.count(Outcome::Failed),
            self.count(Outcome::Skipped),
            self.count(Outcome::Error),
            self.elapsed.as_secs_f64()
        )
    }
}

/// Violations (less the first `shown`, already on the case's line), notes, answers seen and the
/// reproducer of a case, as text.
fn details(c: &CaseResult, shown: usize) -> String {
    let mut out = String::new();
    for f in c.failures.iter().skip(shown) {
        out.push_str(&format!("violation: {f}\n"));
    }
    for n in &c.notes {
        out.push_str(&format!("seen: {n}\n"));
    }
    if !c.exchanges.is_empty() {
        out.push_str("answers seen:\n");
        for e in &c.exchanges {
            let head = format!("  {} {} {}", e.label, e.request.method, e.request.url);
            match (&e.answer, &e.error) {
                (Some(a), _) => {
                    let marker = a
                        .headers
                        .iter()
                        .find(|(n, _)| n == "idempotent-replayed")
                        .map(|(_, v)| format!(" idempotent-replayed: {v}"))
                        .unwrap_or_default();
                    let retry_after = a
                        .headers
                        .iter()
                        .find(|(n, _)| n == "retry-after")
                        .map(|(_, v)| format!(" retry-after: {v}"))
                        .unwrap_or_default();
                    out.push_str(&format!(
                        "{head} -> {}{marker}{retry_after} ({} ms) {}\n",
                        a.status,
                        a.elapsed_ms,
                        preview(&a.body, 300)
                    ));
                }
                (None, Some(err)) => out.push_str(&format!("{head} -> no answer: {err}\n")),
                (None, None) => out.push_str(&format!("{head} -> (answer not read)\n")),
            }
        }
    }
    if let Some(r) = &c.reproducer {
        out.push_str("reproduce:\n");
        for line in r.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

fn preview(body: &str, max: usize) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.len() <= max {
        return one_line;
    }
    let mut end = max;
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &one_line[..end])
}

/// XML text/attribute escaping; characters XML 1.0 cannot hold become U+FFFD.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn case(check: CheckName, outcome: Outcome, message: &str) -> CaseResult {
        CaseResult {
            operation: "create <order>".into(),
            check,
            outcome,
            message: message.into(),
            failures: if outcome == Outcome::Failed {
                vec![message.into()]
            } else {
                vec![]
            },
            warnings: vec![],
            notes: vec!["1 effect".into()],
            reproducer: Some("curl -si 'http://x/o'".into()),
            exchanges: vec![],
            elapsed: Duration::from_millis(12),
        }
    }

    fn report() -> Report {
        Report {
            target: "http://x".into(),
            seed: 7,
            cases: vec![
                case(CheckName::Replay, Outcome::Passed, "ok"),
                case(
                    CheckName::Concurrent,
                    Outcome::Failed,
                    "2 effects & \"more\"",
                ),
                case(CheckName::InFlight, Outcome::Skipped, "no slow_path"),
                case(
                    CheckName::Mismatch,
                    Outcome::Error,
                    "probe \u{1} unreadable",
                ),
            ],
            elapsed: Duration::from_millis(50),
        }
    }

    #[test]
    fn junit_counts_and_escapes() {
        let mut out = Vec::new();
        report().write_junit(&mut out).unwrap();
        let xml = String::from_utf8(out).unwrap();
        assert!(xml.contains(
            r#"<testsuites name="idemgate check" tests="4" failures="1" errors="1" skipped="1""#
        ));
        assert!(xml.contains(r#"<testsuite name="create &lt;order&gt;" tests="4""#));
        assert!(xml.contains(r#"<testcase name="concurrent" classname="create &lt;order&gt;""#));
        assert!(
            xml.contains(
                r#"<failure message="2 effects &amp; &quot;more&quot;" type="concurrent">"#
            )
        );
        assert!(xml.contains(r#"<skipped message="no slow_path"/>"#));
        assert!(xml.contains("<error message=\"probe \u{FFFD} unreadable\""));
        assert!(xml.contains("reproduce:"));
        assert!(!xml.contains('\u{1}'));
    }

    #[test]
    fn json_has_a_summary_and_every_case() {
        let doc = report().to_json();
        assert_eq!(doc["passed"], false);
        assert_eq!(doc["summary"]["failed"], 1);
        assert_eq!(doc["cases"][1]["check"], "concurrent");
        assert_eq!(doc["cases"][1]["outcome"], "failed");
        assert_eq!(doc["cases"][1]["elapsed_ms"], 12);
    }

    #[test]
    fn human_report_has_plain_text_off_a_terminal() {
        let mut out = Vec::new();
        report().write_human(&mut out, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains('\x1b'));
        assert!(text.contains("FAIL  concurrent"));
        assert!(text.contains("summary: 1 passed, 1 failed, 1 skipped, 1 errors"));
        let mut colored = Vec::new();
        report().write_human(&mut colored, true).unwrap();
        assert!(String::from_utf8(colored).unwrap().contains("\x1b[31;1m"));
    }
}

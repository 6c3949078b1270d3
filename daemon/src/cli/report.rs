//! `lavd audit report`: verify the log as `lavd audit verify` does, then
//! write the oversight report ([`crate::report`]). Like `verify`, it needs
//! no HSM, config or daemon: only the log's verifier key.
//!
//! Its inputs are [`LogSource`]'s: an export, the JSON API, or C2SP tiles,
//! optionally held to a C2SP witness policy (`--policy`).

use std::path::PathBuf;

use anyhow::Context as _;

use super::audit::LogSource;
use crate::report::{html, Options, Report};

/// `lavd audit report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    #[command(flatten)]
    source: LogSource,
    /// Where to write the HTML report.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Also write the same figures as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Count only entries at or after this time (RFC 3339 UTC).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    from: Option<time::OffsetDateTime>,
    /// Count only entries before this time (RFC 3339 UTC); later entries
    /// are ignored altogether.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    to: Option<time::OffsetDateTime>,
    /// Add per-warrant rows (warrant ids, agencies, revocation reasons): for
    /// an internal oversight reader, not for publication.
    #[arg(long)]
    detail: bool,
    /// State that the log held no entries beyond those given at this time
    /// (RFC 3339 UTC), e.g. when an export was made: overdue keys and lapsed
    /// urgent warrants are then judged at it. A log read with `--url` whose
    /// served checkpoint was its newest is judged at its fetch without this
    /// (the daemon then served no entry past it); tiles, even from
    /// `https://…`, need it (docs/audit.md §6).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    as_of: Option<time::OffsetDateTime>,
}

fn parse_time(text: &str) -> Result<time::OffsetDateTime, String> {
    crate::codec::parse_time(text).map_err(|e| e.to_string())
}

impl ReportArgs {
    /// Verifies, then writes the report files.
    ///
    /// # Errors
    /// The [`crate::audit::export::VerifyError`] that failed (nothing is
    /// written then), a `--from` after `--to`, or a file that cannot be
    /// written.
    pub fn run(self) -> anyhow::Result<()> {
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from >= to {
                return Err(
                    super::Refused::new("invalid_period", "--from must be before --to").into(),
                );
            }
        }
        if let Some(as_of) = self.as_of {
            // A moment yet to come would make keys overdue and urgent
            // warrants lapsed that are neither.
            let now = time::OffsetDateTime::now_utc();
            if as_of > now + time::Duration::seconds(300) {
                return Err(super::Refused::new(
                    "invalid_period",
                    format!(
                        "--as-of {} is later than now ({}): the log cannot be stated complete \
                         at a time yet to come",
                        crate::codec::format_time(as_of),
                        crate::codec::format_time(now)
                    ),
                )
                .into());
            }
        }
        let verified = self.source.verify()?;
        let summary = &verified.summary;
        let mut report = Report::build(
            &verified.checked_checkpoint,
            summary,
            &Options {
                from: self.from,
                to: self.to,
                observed: self.as_of.or(verified.fetched_at),
                observed_stated: self.as_of.is_some(),
                detail: self.detail,
            },
        );
        report.verification.witnesses = verified
            .cosigned
            .iter()
            .map(|(name, _)| name.clone())
            .collect();
        report.verification.anchored_by = verified.anchored_by.clone();
        report.verification.witnessed_as_of = verified
            .quorum_as_of
            .and_then(|t| i64::try_from(t).ok())
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .map(crate::codec::format_time);
        let json = report.to_json().context("encoding the JSON report")?;
        let page = html::render(&report);
        // Each through a rename: an interrupted run leaves the previous
        // file or the whole new one, never half a report.
        let unwritable = |path: &std::path::Path, e: std::io::Error| {
            super::Refused::new(
                "output_unwritable",
                format!("writing {}: {e}", path.display()),
            )
        };
        // A detail report names callers and warrants (not for
        // publication): its owner's alone. An aggregate one is for others.
        let mode = match report.form {
            crate::report::Form::Aggregate => 0o644,
            crate::report::Form::Detail => 0o600,
        };
        let write = |path: &std::path::Path, bytes: &[u8]| {
            super::audit::write_atomically_with_mode(path, bytes, mode)
                .map_err(|e| unwritable(path, e))
        };
        if let Some(path) = &self.json {
            write(path, &json)?;
        }
        write(&self.out, page.as_bytes())?;
        eprintln!(
            "verified {} entries of {}; wrote the {} report to {}",
            summary.size,
            summary.origin,
            match report.form {
                crate::report::Form::Aggregate => "aggregate",
                crate::report::Form::Detail => "detail",
            },
            self.out.display()
        );
        Ok(())
    }
}

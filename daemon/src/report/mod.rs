//! The oversight report (`lavd audit report`): what the audit log says, as
//! the aggregates an oversight body reads — envelopes opened, denied and
//! refused per month and agency, denials by reason, refused warrants by
//! code, use of the urgent procedure, revocations and key epochs — as JSON
//! ([`Report`], schema [`SCHEMA`]) and as one self-contained HTML page
//! ([`html::render`]).
//!
//! Trust: only verified leaves. A [`Report`] is built from a [`Summary`],
//! which only the verifier ([`crate::audit::export::verify_export`]) returns,
//! after every leaf has been checked against the signed checkpoint; nothing
//! here reads an unverified byte, and every figure is a count over those
//! leaves. The leaves' text is still attacker-influenced (caller identities
//! come from client certificates, warrant ids from whoever presented a
//! warrant), so the page escapes every string it prints. How each figure is
//! derived is documented on its field and in docs/audit.md ("Reports").

pub mod html;

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::audit::export::Summary;
use crate::audit::leaf::{DenyReason, Event, Leaf, UnwrapOutcome};
use crate::codec;

/// The `schema` value of the JSON report; bumped on any incompatible change.
pub const SCHEMA: &str = "lavd.oversight-report/1";

/// How long after its `destroy_after` a retention destruction still counts
/// as on time: one day, the schedule OPERATIONS.md §2 prescribes for
/// `lavd keys destroy --expired`.
pub const DESTROY_GRACE: Duration = Duration::days(1);

/// The refusal code of an urgent warrant used after its urgent period.
const EMERGENCY_EXPIRED: &str = "emergency_expired";
/// The refusal code of an urgent warrant presented after a fully signed one
/// replaced it.
const EMERGENCY_SUPERSEDED: &str = "emergency_superseded";

/// Which form of the report: what it may be shown to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Form {
    /// Counts only: no warrant ids, targets, envelope digests or refs. For
    /// publication.
    Aggregate,
    /// Adds one row per warrant and per revocation (ids, agencies, reasons):
    /// for an internal oversight reader.
    Detail,
}

/// What to report on.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Count only leaves at or after this time.
    pub from: Option<OffsetDateTime>,
    /// Count only leaves before this time; later leaves are ignored
    /// altogether.
    pub to: Option<OffsetDateTime>,
    /// A time at which the log is known to have held no leaf beyond the
    /// verified ones: when a live log was fetched, or what the reader states
    /// (`--as-of`). Without it, nothing shows the log was complete after its
    /// newest leaf.
    pub observed: Option<OffsetDateTime>,
    /// `observed` is what the reader stated (`--as-of`), not a fetch that
    /// found the log complete.
    pub observed_stated: bool,
    /// The detail form.
    pub detail: bool,
}

/// The moment the report describes, at which it judges whether an urgent
/// warrant lapsed or a key is overdue: the newest leaf before `to`, or
/// later, as far as `observed` shows the log complete (never past `to`).
/// The newest leaf, not the last: a leaf's time is when its request's work
/// started, so leaves can be slightly out of time order.
/// A verified leaf at or after `to` shows the log complete up to `to` too
/// (`past_to`).
fn as_of(history: &[&Leaf], options: &Options, past_to: bool) -> Option<OffsetDateTime> {
    let newest = history.iter().map(|l| l.time).max();
    let complete_until = match (options.observed, options.to) {
        (_, Some(to)) if past_to => Some(to),
        (Some(seen), Some(to)) => Some(seen.min(to)),
        (seen, _) => seen,
    };
    newest.max(complete_until)
}

/// The report: the figures of one verified log, for one period.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: &'static str,
    /// Aggregate or detail.
    pub form: Form,
    /// The period and the times of the leaves it covers.
    pub period: Period,
    /// What was verified.
    pub verification: Verification,
    /// Headline counts over the period.
    pub totals: Totals,
    /// Unwrap outcomes and refusals per month and agency.
    pub monthly: Vec<MonthRow>,
    /// Denied envelopes by reason.
    pub denials_by_reason: BTreeMap<String, u64>,
    /// Refused warrants by refusal code.
    pub refusals_by_code: BTreeMap<String, u64>,
    /// Use of the urgent procedure.
    pub urgent: Urgent,
    /// Revocations.
    pub revocations: Revocations,
    /// Escrow key epochs.
    pub keys: Keys,
    /// Per-warrant rows; only in the detail form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
}

/// The period of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Period {
    /// `--from`, if given.
    pub from: Option<String>,
    /// `--to`, if given.
    pub to: Option<String>,
    /// Time of the first leaf in the period.
    pub first_leaf: Option<String>,
    /// Time of the last leaf in the period.
    pub last_leaf: Option<String>,
    /// The moment the report describes (whether an urgent warrant lapsed or
    /// a key is overdue is judged then): the newest leaf before `to`, or
    /// `observed` if later (at most `to`), or `to` when a leaf at or after
    /// it was verified.
    pub as_of: Option<String>,
    /// When the log was seen to hold nothing beyond the verified leaves: the
    /// fetch of a live log, or `--as-of`; `null` for a file with neither.
    pub observed: Option<String>,
    /// Where `observed` comes from: `fetch` (the read of a live log found
    /// nothing more) or `stated` (`--as-of`, unverified); `null` with it.
    pub observed_by: Option<&'static str>,
    /// Whether a verified leaf at or after `to` shows that the log held
    /// nothing more before `to` (then `as_of` is `to`).
    pub later_leaf: bool,
    /// Leaves in the period.
    pub leaves: u64,
}

/// The verification block: what the figures are backed by.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// The log's origin.
    pub origin: String,
    /// Number of leaves verified (the whole log, whatever the period).
    pub size: u64,
    /// The verified root hash, standard base64 as in the checkpoint.
    pub root: String,
    /// The signed checkpoint, as text.
    pub checkpoint: String,
    /// Sizes of the other signed checkpoints shown to be prefixes of it.
    pub consistent_with: Vec<u64>,
    /// The witnesses whose cosignatures on the checkpoint verified under
    /// the `--policy` it was held to (which met its quorum); empty without
    /// a policy, as nothing then says which witnesses to trust.
    pub witnesses: Vec<String>,
    /// The latest time the policy's quorum cosigned the checkpoint (RFC
    /// 3339 UTC; each witness's newest cosignature counted): how fresh the
    /// view the report was made from is. `None` without a policy, or under
    /// `quorum none`.
    pub witnessed_as_of: Option<String>,
    /// What tied the log to more than its own signature
    /// ([`crate::cli::audit::Verified::anchored_by`]). Only `fetch` shows
    /// that the log held no more than these entries (as of the fetch);
    /// without it the page says at its top that it is not shown complete.
    pub anchored_by: Vec<&'static str>,
}

/// Headline counts over the period.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// `unwrap` leaves with `outcome: opened`.
    pub opened: u64,
    /// `unwrap` leaves with `outcome: denied`.
    pub denied: u64,
    /// Of `denied`, the envelopes the HSM certainly opened and whose keys
    /// were not released: the reasons of audit leaves only
    /// (`audit_commit_failed`; `warrant_expired`, `emergency_expired`,
    /// `authority_not_valid` and `configuration_changed` written in
    /// flight), and `warrant_revoked` on
    /// an envelope (the warrant revoked while its request ran: a request
    /// that arrives revoked is refused whole). Envelopes denied
    /// `key_destroyed`, `budget_exhausted`, `open_failed` or
    /// `open_interrupted` may include some the HSM opened too (a key's
    /// retention or a budget lease that ended while the request ran, an
    /// HSM failure later in its batch, a process that stopped before its
    /// audit commit), which the log does not tell apart; the other reasons
    /// were never opened.
    pub opened_not_released: u64,
    /// `warrant_refused` leaves.
    pub refused: u64,
    /// `revocation` leaves.
    pub revocations: u64,
    /// Urgent warrants first seen in the period.
    pub urgent_warrants: u64,
    /// `key_generated` leaves.
    pub keys_generated: u64,
    /// Keys whose destruction falls in the period: each key once, at its
    /// first `key_destroyed` leaf. A destruction applied again after a store
    /// restore (OPERATIONS §4) adds a leaf, not a key.
    pub keys_destroyed: u64,
}

/// One month and agency.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MonthRow {
    /// `YYYY-MM` (UTC) of the leaves' `time`.
    pub month: String,
    /// The caller identity of the leaves.
    pub agency: String,
    /// `unwrap` leaves, opened.
    pub opened: u64,
    /// `unwrap` leaves, denied.
    pub denied: u64,
    /// `warrant_refused` leaves.
    pub refused: u64,
}

/// What became of an urgent warrant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UrgentStatus {
    /// A fully signed warrant with the same id was used after it (or the
    /// urgent one was refused as `emergency_superseded`).
    Replaced,
    /// Not replaced, and either refused as `emergency_expired` or past its
    /// urgent period as of the report.
    Lapsed,
    /// Neither yet: possibly still inside its urgent period.
    Pending,
}

impl UrgentStatus {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replaced => "replaced",
            Self::Lapsed => "lapsed",
            Self::Pending => "pending",
        }
    }
}

/// Use of the urgent procedure.
///
/// An urgent warrant is a warrant id with an `unwrap` leaf saying
/// `emergency: true`, or a `warrant_refused` leaf `emergency_expired`. It is
/// counted in the period of its first such leaf (`first`). Then:
/// - replaced: a later `unwrap` leaf with the same id and `emergency:
///   false`, or a `warrant_refused` leaf `emergency_superseded` with the
///   same id (the first of these is `replaced_at`), unless an
///   `emergency_expired` refusal came before it;
/// - lapsed: not replaced, and a `warrant_refused` leaf `emergency_expired`
///   with the same id, or `as_of >= first + max_hours` (the emergency rule of
///   the last `authorities_loaded` leaf before `first`; the urgent period
///   starts at the warrant's `not_before`, which is at or before `first`, so
///   it has surely ended then);
/// - pending otherwise.
///
/// Duration: `replaced_at - first` when replaced (not below 0), else the
/// time between the first and the last `emergency: true` unwrap leaf that
/// is a use: not one denied for the warrant's lapse (`emergency_expired`,
/// `warrant_expired`), a signer's end (`authority_not_valid`) or a reload
/// (`configuration_changed`), nor one written after the open, in place of
/// an open intent or a failed audit commit (`open_interrupted`,
/// `audit_commit_failed`, which carry the time they were written: neither
/// a use nor, from the fully signed warrant, its replacement; they set
/// `first` only when earlier than every other leaf). 0 when it was only
/// refused. Leaves after `to` are ignored.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Urgent {
    /// Urgent warrants first seen in the period.
    pub warrants: u64,
    /// Of those, replaced by a fully signed warrant.
    pub replaced: u64,
    /// Of those, lapsed.
    pub lapsed: u64,
    /// Of those, neither yet.
    pub pending: u64,
    /// `emergency: true` unwrap leaves in the period, opened.
    pub opened: u64,
    /// `emergency: true` unwrap leaves in the period, denied.
    pub denied: u64,
    /// Durations of the urgent warrants, in seconds.
    pub duration_seconds: DurationStats,
}

/// Summary of a set of durations, in whole seconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DurationStats {
    /// The shortest (0 when there are none).
    pub min: i64,
    /// The lower median (0 when there are none).
    pub median: i64,
    /// The longest (0 when there are none).
    pub max: i64,
}

impl DurationStats {
    fn of(mut seconds: Vec<i64>) -> Self {
        seconds.sort_unstable();
        match (seconds.first(), seconds.last()) {
            (Some(&min), Some(&max)) => Self {
                min,
                median: seconds[(seconds.len() - 1) / 2],
                max,
            },
            _ => Self::default(),
        }
    }
}

/// Revocations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Revocations {
    /// `revocation` leaves in the period. A warrant revoked again (a
    /// retried request, or an admin and then an authority) counts each time.
    pub total: u64,
    /// Warrants whose first `revocation` leaf is in the period: each
    /// warrant once.
    pub warrants: u64,
    /// Of the `total` leaves (not of the `warrants`), those by a caller
    /// with the `admin` role (`by: admin`).
    pub by_admin: u64,
    /// Of the `total` leaves, those by an authority's signed revocation
    /// (`by: authority`).
    pub by_authority: u64,
    /// Per month.
    pub monthly: Vec<RevocationMonth>,
}

/// Revocations in one month.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RevocationMonth {
    /// `YYYY-MM` (UTC).
    pub month: String,
    /// By an admin.
    pub admin: u64,
    /// By an authority.
    pub authority: u64,
}

/// Where an escrow key stands, as of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// Destroyed after its `destroy_after`, within [`DESTROY_GRACE`].
    OnTime,
    /// Destroyed more than [`DESTROY_GRACE`] after its `destroy_after`.
    Late,
    /// Destroyed before its `destroy_after` (`forced: true`, an operator's
    /// decision).
    Early,
    /// Not destroyed, and more than [`DESTROY_GRACE`] past its
    /// `destroy_after` as of the report.
    Overdue,
    /// Not destroyed, and not yet due.
    Retained,
}

impl KeyStatus {
    /// Every status, in the order the page shows them.
    pub const ALL: [KeyStatus; 5] = [
        Self::OnTime,
        Self::Late,
        Self::Early,
        Self::Overdue,
        Self::Retained,
    ];

    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnTime => "on_time",
            Self::Late => "late",
            Self::Early => "early",
            Self::Overdue => "overdue",
            Self::Retained => "retained",
        }
    }
}

/// Escrow key epochs: every key whose `key_generated` leaf is before `to`
/// and that was not destroyed before `from`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Keys {
    /// Keys listed.
    pub keys: u64,
    /// Of those, generated in the period.
    pub generated: u64,
    /// Of those, destroyed in the period.
    pub destroyed: u64,
    /// Keys per status.
    pub by_status: BTreeMap<&'static str, u64>,
    /// [`DESTROY_GRACE`] in hours.
    pub grace_hours: i64,
    /// One row per key, by generation time. Key ids are public (the JWK
    /// Set), so they are in both forms.
    pub epochs: Vec<KeyEpoch>,
}

/// One escrow key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyEpoch {
    /// The key id.
    pub kid: String,
    /// Time of its `key_generated` leaf.
    pub generated: String,
    /// Its validity start.
    pub not_before: String,
    /// Its validity end.
    pub not_after: String,
    /// End of its retention.
    pub destroy_after: String,
    /// Time of its `key_destroyed` leaf, if any before `to`.
    pub destroyed: Option<String>,
    /// Where it stands.
    pub status: KeyStatus,
}

/// The detail form's rows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Detail {
    /// One row per warrant id seen in the period, by id: ids of warrants
    /// whose signatures met the policy, so that an id in a row is one the
    /// authorities signed.
    pub warrants: Vec<WarrantRow>,
    /// Refusals of warrants that did not get as far (malformed, a bad or
    /// unknown signature, too few signatures), in log order. Their ids are
    /// only what the request claimed, which any caller can write: they are
    /// listed apart, never counted in a warrant's row.
    pub claimed: Vec<ClaimedRow>,
    /// One row per revocation in the period, in log order.
    pub revocations: Vec<RevocationRow>,
}

/// One warrant, in the period.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WarrantRow {
    /// The warrant id.
    pub id: String,
    /// Caller identities that used or presented it (not who revoked it).
    pub agencies: Vec<String>,
    /// Envelopes opened under it.
    pub opened: u64,
    /// Envelopes denied under it.
    pub denied: u64,
    /// Requests refused with it.
    pub refused: u64,
    /// What became of it, if it was an urgent warrant: also one first seen
    /// before the period (the `urgent` figures count only those first
    /// seen in it).
    pub urgent: Option<UrgentStatus>,
    /// Its urgent duration in seconds, likewise.
    pub urgent_seconds: Option<i64>,
    /// Whether a revocation leaf names it, in the period or before it.
    pub revoked: bool,
    /// Time of its earliest leaf in the period.
    pub first_seen: String,
    /// Time of its latest leaf in the period.
    pub last_seen: String,
    /// Those two, as times.
    #[serde(skip)]
    seen: Option<(OffsetDateTime, OffsetDateTime)>,
}

/// A refusal whose warrant id was claimed, not signed.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimedRow {
    /// Time of the leaf.
    pub time: String,
    /// Who sent it.
    pub agency: String,
    /// The id the request claimed, if the leaf names one.
    pub claimed_id: Option<String>,
    /// The refusal code.
    pub code: String,
}

/// Whether a refusal with `code` came after the warrant's signatures met
/// the policy (`warrant::Verifier::verify` checks structure, signatures,
/// claims and the emergency rule, then the policy, then time and agency;
/// `warrant::admit` then revocation and ids): only then does the id it
/// names come from the authorities.
fn after_the_policy(code: &str) -> bool {
    matches!(
        code,
        "warrant_not_yet_valid"
            | "warrant_expired"
            | "emergency_expired"
            | "agency_mismatch"
            | "warrant_revoked"
            | "warrant_id_conflict"
            | "emergency_superseded"
    )
}

/// One revocation.
#[derive(Debug, Clone, Serialize)]
pub struct RevocationRow {
    /// Time of the leaf.
    pub time: String,
    /// The revoked warrant id.
    pub warrant_id: String,
    /// `admin` or `authority`.
    pub by: &'static str,
    /// The revoker's reason (free text).
    pub reason: String,
}

/// What the log shows of one urgent warrant.
#[derive(Debug, Default)]
struct UrgentTrack {
    first: Option<OffsetDateTime>,
    last_use: Option<OffsetDateTime>,
    replaced_at: Option<OffsetDateTime>,
    /// The earliest `emergency_expired` refusal naming it (or leaf denied
    /// for its lapse).
    expired_refusal: Option<OffsetDateTime>,
    max_hours: Option<u32>,
}

impl UrgentTrack {
    /// A leaf of this warrant at `time`, under the policy's `max_hours`
    /// then. Its start is the earliest leaf time, not the first leaf's
    /// (replicas' clocks differ); the policy is the one the first leaf was
    /// written under.
    fn seen(&mut self, time: OffsetDateTime, max_hours: Option<u32>) {
        match self.first {
            None => {
                self.first = Some(time);
                self.max_hours = max_hours;
            }
            Some(first) if time < first => self.first = Some(time),
            Some(_) => {}
        }
    }

    fn outcome(&self, as_of: OffsetDateTime) -> Option<(UrgentStatus, i64)> {
        let first = self.first?;
        // Replaced, unless the log shows it lapsed first: an
        // `emergency_expired` refusal before the replacement's first use is
        // the daemon's record that the urgent period ended unreplaced.
        if let Some(at) = self.replaced_at {
            if self.expired_refusal.is_none_or(|lapsed| lapsed > at) {
                // Not below 0: the replacement's leaf may carry an earlier
                // time than the urgent one's (another replica's clock).
                return Some((UrgentStatus::Replaced, (at - first).whole_seconds().max(0)));
            }
        }
        let used = self
            .last_use
            .map_or(0, |last| (last - first).whole_seconds());
        let period_over = self
            .max_hours
            // Past the last representable time, the period never ends.
            .and_then(|h| first.checked_add(Duration::hours(i64::from(h))))
            .is_some_and(|end| as_of >= end);
        let status = if self.expired_refusal.is_some() || period_over {
            UrgentStatus::Lapsed
        } else {
            UrgentStatus::Pending
        };
        Some((status, used))
    }
}

fn month(t: OffsetDateTime) -> String {
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

impl Report {
    /// Builds the report from a verified log: `summary` is what
    /// [`crate::audit::export::verify_export`] returned, and `checkpoint`
    /// its newest checkpoint with only the signature lines that were
    /// verified (the page shows it as "the signed checkpoint").
    pub fn build(checkpoint: &str, summary: &Summary, options: &Options) -> Self {
        let before_to = |t: OffsetDateTime| options.to.is_none_or(|to| t < to);
        let in_period = |t: OffsetDateTime| before_to(t) && options.from.is_none_or(|f| t >= f);
        let history: Vec<&Leaf> = summary
            .leaves
            .iter()
            .filter(|l| before_to(l.time))
            .collect();
        let past_to = options
            .to
            .is_some_and(|to| summary.leaves.iter().any(|l| l.time >= to));
        let as_of = as_of(&history, options, past_to);
        let period: Vec<&Leaf> = history
            .iter()
            .copied()
            .filter(|l| in_period(l.time))
            .collect();

        let mut totals = Totals::default();
        let mut monthly: BTreeMap<(String, String), MonthRow> = BTreeMap::new();
        let mut denials: BTreeMap<String, u64> = BTreeMap::new();
        let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
        let mut revocations = Revocations::default();
        let mut revocation_months: BTreeMap<String, RevocationMonth> = BTreeMap::new();
        let mut warrants: BTreeMap<String, WarrantRow> = BTreeMap::new();
        let mut claimed: Vec<ClaimedRow> = Vec::new();
        let mut agencies: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut revocation_rows = Vec::new();
        let mut urgent = Urgent::default();
        // Warrants with a revocation leaf before the period: a later one is
        // a repeat (a retried or re-delivered revocation), not a new one.
        let mut revoked: BTreeSet<&str> = history
            .iter()
            .filter(|l| !in_period(l.time))
            .filter_map(|l| match &l.event {
                Event::Revocation(r) => Some(r.warrant_id()),
                _ => None,
            })
            .collect();
        // A warrant's row says it was revoked before the period too.
        let revoked_before = revoked.clone();
        let mut revoked_in_period: BTreeSet<&str> = BTreeSet::new();

        for leaf in &period {
            // Formatted only for the rows that show it (not unwraps').
            let time = || codec::format_time(leaf.time);
            match &leaf.event {
                Event::Unwrap(u) => {
                    let m = monthly_row(&mut monthly, leaf.time, u.caller());
                    let w = warrant_row(
                        &mut warrants,
                        &mut agencies,
                        u.warrant_id(),
                        Some(u.caller()),
                        leaf.time,
                    );
                    match u.outcome() {
                        UnwrapOutcome::Opened => {
                            totals.opened += 1;
                            m.opened += 1;
                            w.opened += 1;
                            urgent.opened += u64::from(u.emergency());
                        }
                        UnwrapOutcome::Denied(reason) => {
                            totals.denied += 1;
                            // `open_interrupted`: the HSM may not have
                            // finished (or begun) the open.
                            totals.opened_not_released += u64::from(
                                (!reason.in_replies() && reason != DenyReason::OpenInterrupted)
                                    || reason == DenyReason::WarrantRevoked,
                            );
                            m.denied += 1;
                            w.denied += 1;
                            urgent.denied += u64::from(u.emergency());
                            *denials.entry(reason.as_str().to_owned()).or_default() += 1;
                        }
                    }
                }
                Event::WarrantRefused(r) => {
                    totals.refused += 1;
                    monthly_row(&mut monthly, leaf.time, r.caller()).refused += 1;
                    *refusals.entry(r.reason().to_owned()).or_default() += 1;
                    match r.warrant_id() {
                        Some(id) if after_the_policy(r.reason()) => {
                            warrant_row(
                                &mut warrants,
                                &mut agencies,
                                id,
                                Some(r.caller()),
                                leaf.time,
                            )
                            .refused += 1;
                        }
                        claimed_id => claimed.push(ClaimedRow {
                            time: time(),
                            agency: r.caller().to_owned(),
                            claimed_id: claimed_id.map(str::to_owned),
                            code: r.reason().to_owned(),
                        }),
                    }
                }
                Event::Revocation(r) => {
                    totals.revocations += 1;
                    if revoked.insert(r.warrant_id()) {
                        revocations.warrants += 1;
                    }
                    let by_authority = r.authority().is_some();
                    let m = revocation_months
                        .entry(month(leaf.time))
                        .or_insert_with(|| RevocationMonth {
                            month: month(leaf.time),
                            ..RevocationMonth::default()
                        });
                    if by_authority {
                        revocations.by_authority += 1;
                        m.authority += 1;
                    } else {
                        revocations.by_admin += 1;
                        m.admin += 1;
                    }
                    // Marked on the warrant's row, if it has one (below):
                    // a revocation makes no row of its own, for an id no
                    // signatures met the policy for.
                    revoked_in_period.insert(r.warrant_id());
                    revocation_rows.push(RevocationRow {
                        time: time(),
                        warrant_id: r.warrant_id().to_owned(),
                        by: if by_authority { "authority" } else { "admin" },
                        reason: r.reason().to_owned(),
                    });
                }
                Event::KeyGenerated(_) => totals.keys_generated += 1,
                // Counted per key below, from the keys' history.
                Event::KeyDestroyed(_) => {}
                Event::AuthoritiesLoaded(_) => {}
            }
        }
        revocations.total = totals.revocations;
        revocations.monthly = revocation_months.into_values().collect();

        // Urgent warrants and keys need the history before the period too.
        let mut tracks: BTreeMap<&str, UrgentTrack> = BTreeMap::new();
        let mut max_hours: Option<u32> = None;
        for leaf in &history {
            match &leaf.event {
                Event::AuthoritiesLoaded(a) => {
                    max_hours = a.policy().emergency.as_ref().map(|e| e.max_hours);
                }
                Event::Unwrap(u) if u.emergency() => {
                    let t = tracks.entry(u.warrant_id()).or_default();
                    t.seen(leaf.time, max_hours);
                    match u.outcome() {
                        // A request that lapsed in flight: the daemon refused
                        // it whole and wrote only these leaves, which prove
                        // the lapse as a refusal leaf would.
                        UnwrapOutcome::Denied(
                            DenyReason::EmergencyExpired | DenyReason::WarrantExpired,
                        ) => earliest(&mut t.expired_refusal, leaf.time),
                        // A signer's end reached in flight, or a reload
                        // that no longer admits it: refused whole, neither
                        // a use nor the warrant's lapse. Nor are the
                        // leaves written in place of an open intent or a
                        // failed audit commit: they carry the time they
                        // were written (at the next start, or once the
                        // store was back), not the time of the open.
                        UnwrapOutcome::Denied(
                            DenyReason::AuthorityNotValid
                            | DenyReason::ConfigurationChanged
                            | DenyReason::OpenInterrupted
                            | DenyReason::AuditCommitFailed,
                        ) => {}
                        // The latest use, by time.
                        _ => t.last_use = t.last_use.max(Some(leaf.time)),
                    }
                }
                // The fully signed warrant's use, unless the leaf was
                // written later than it (as above).
                Event::Unwrap(u)
                    if !matches!(
                        u.outcome(),
                        UnwrapOutcome::Denied(
                            DenyReason::OpenInterrupted | DenyReason::AuditCommitFailed
                        )
                    ) =>
                {
                    if let Some(t) = tracks.get_mut(u.warrant_id()) {
                        earliest(&mut t.replaced_at, leaf.time);
                    }
                }
                Event::WarrantRefused(r) => {
                    let Some(id) = r.warrant_id() else { continue };
                    if r.reason() == EMERGENCY_EXPIRED {
                        let t = tracks.entry(id).or_default();
                        t.seen(leaf.time, max_hours);
                        earliest(&mut t.expired_refusal, leaf.time);
                    } else if r.reason() == EMERGENCY_SUPERSEDED {
                        if let Some(t) = tracks.get_mut(id) {
                            earliest(&mut t.replaced_at, leaf.time);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut durations = Vec::new();
        if let Some(as_of) = as_of {
            for (id, track) in &tracks {
                let Some(first) = track.first else { continue };
                let Some((status, seconds)) = track.outcome(as_of) else {
                    continue;
                };
                // Counted in the period it began; its row, in any period
                // that shows the warrant, says what it was.
                if in_period(first) {
                    urgent.warrants += 1;
                    match status {
                        UrgentStatus::Replaced => urgent.replaced += 1,
                        UrgentStatus::Lapsed => urgent.lapsed += 1,
                        UrgentStatus::Pending => urgent.pending += 1,
                    }
                    durations.push(seconds);
                }
                if let Some(w) = warrants.get_mut(*id) {
                    w.urgent = Some(status);
                    w.urgent_seconds = Some(seconds);
                }
            }
        }
        urgent.duration_seconds = DurationStats::of(durations);
        totals.urgent_warrants = urgent.warrants;

        let keys = key_epochs(&history, options, as_of, &in_period);
        totals.keys_destroyed = keys.destroyed;

        for w in warrants.values_mut() {
            w.revoked |=
                revoked_before.contains(w.id.as_str()) || revoked_in_period.contains(w.id.as_str());
        }
        for (id, callers) in agencies {
            if let Some(w) = warrants.get_mut(&id) {
                w.agencies = callers.into_iter().collect();
            }
        }
        let detail = options.detail.then(|| Detail {
            warrants: warrants.into_values().collect(),
            claimed,
            revocations: revocation_rows,
        });

        Self {
            schema: SCHEMA,
            form: if options.detail {
                Form::Detail
            } else {
                Form::Aggregate
            },
            period: Period {
                from: options.from.map(codec::format_time),
                to: options.to.map(codec::format_time),
                // The earliest and the latest leaf time, not the first and
                // the last leaf's: replicas' clocks differ, so the log's
                // order is not quite the time order.
                first_leaf: period.iter().map(|l| l.time).min().map(codec::format_time),
                last_leaf: period.iter().map(|l| l.time).max().map(codec::format_time),
                as_of: as_of.map(codec::format_time),
                observed: options.observed.map(codec::format_time),
                observed_by: options.observed.map(|_| {
                    if options.observed_stated {
                        "stated"
                    } else {
                        "fetch"
                    }
                }),
                later_leaf: past_to,
                leaves: period.len() as u64,
            },
            verification: Verification {
                origin: summary.origin.clone(),
                size: summary.size,
                root: STANDARD.encode(summary.root),
                checkpoint: checkpoint.to_string(),
                consistent_with: summary.consistent_with.clone(),
                witnesses: Vec::new(),
                witnessed_as_of: None,
                anchored_by: Vec::new(),
            },
            totals,
            monthly: monthly.into_values().collect(),
            denials_by_reason: denials,
            refusals_by_code: refusals,
            urgent,
            revocations,
            keys,
            detail,
        }
    }

    /// The report as pretty JSON, with a final newline.
    ///
    /// # Errors
    /// A serialization failure (not expected: every field is plain data).
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut out = serde_json::to_vec_pretty(self)?;
        out.push(b'\n');
        Ok(out)
    }
}

/// Sets `slot` to `time` when it is empty or later: the first of a kind of
/// leaf by time, not by place in the log (leaves are not in time order).
fn earliest(slot: &mut Option<OffsetDateTime>, time: OffsetDateTime) {
    *slot = Some(slot.map_or(time, |was| was.min(time)));
}

/// Warrant `id`'s row, made on its first leaf, spanning the earliest to
/// the latest leaf time seen (not the first and last in the log: a leaf's
/// time is when its request began, and replicas' clocks differ).
fn warrant_row<'a>(
    warrants: &'a mut BTreeMap<String, WarrantRow>,
    agencies: &mut BTreeMap<String, BTreeSet<String>>,
    id: &str,
    caller: Option<&str>,
    time: OffsetDateTime,
) -> &'a mut WarrantRow {
    let callers = agencies.entry(id.to_owned()).or_default();
    if let Some(caller) = caller {
        callers.insert(caller.to_owned());
    }
    let w = warrants.entry(id.to_owned()).or_insert_with(|| WarrantRow {
        id: id.to_owned(),
        ..WarrantRow::default()
    });
    let (first, last) = w.seen.map_or((time, time), |(first, last)| {
        (first.min(time), last.max(time))
    });
    if w.seen != Some((first, last)) {
        w.seen = Some((first, last));
        w.first_seen = codec::format_time(first);
        w.last_seen = codec::format_time(last);
    }
    w
}

fn monthly_row<'a>(
    monthly: &'a mut BTreeMap<(String, String), MonthRow>,
    time: OffsetDateTime,
    caller: &str,
) -> &'a mut MonthRow {
    monthly
        .entry((month(time), caller.to_owned()))
        .or_insert_with(|| MonthRow {
            month: month(time),
            agency: caller.to_owned(),
            ..MonthRow::default()
        })
}

/// Every key generated before `to` and not destroyed before `from`, with its
/// status as of the report.
fn key_epochs(
    history: &[&Leaf],
    options: &Options,
    as_of: Option<OffsetDateTime>,
    in_period: &dyn Fn(OffsetDateTime) -> bool,
) -> Keys {
    struct Epoch {
        generated: OffsetDateTime,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        destroy_after: OffsetDateTime,
        destroyed: Option<(OffsetDateTime, bool)>,
    }
    let mut epochs: BTreeMap<&str, Epoch> = BTreeMap::new();
    for leaf in history {
        match &leaf.event {
            Event::KeyGenerated(k) => {
                epochs.entry(k.kid()).or_insert(Epoch {
                    generated: leaf.time,
                    not_before: k.not_before(),
                    not_after: k.not_after(),
                    destroy_after: k.destroy_after(),
                    destroyed: None,
                });
            }
            Event::KeyDestroyed(k) => {
                // A kid is never generated twice, and destroyed once; a
                // destruction without its generation leaf has no dates to
                // judge it by and is left out.
                if let Some(e) = epochs.get_mut(k.kid()) {
                    e.destroyed.get_or_insert((leaf.time, k.forced()));
                }
            }
            _ => {}
        }
    }
    let mut keys = Keys {
        grace_hours: DESTROY_GRACE.whole_hours(),
        by_status: KeyStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect(),
        ..Keys::default()
    };
    let mut rows: Vec<(OffsetDateTime, KeyEpoch)> = Vec::new();
    for (kid, e) in epochs {
        if let (Some(from), Some((at, _))) = (options.from, e.destroyed) {
            if at < from {
                continue;
            }
        }
        // `None` when the grace would end past the last representable time
        // (a key kept "forever", to 9999-12-31): then it never ends.
        let grace_end = e.destroy_after.checked_add(DESTROY_GRACE);
        let past_grace = |t: OffsetDateTime| grace_end.is_some_and(|end| t > end);
        let status = match (e.destroyed, as_of) {
            // By the leaf's time alone, which the log proves: a `forced`
            // flag after the due date (lavd before 2026-12 set it for any
            // `--force`) does not hide a late destruction.
            (Some((at, _)), _) if at < e.destroy_after => KeyStatus::Early,
            (Some((at, _)), _) if !past_grace(at) => KeyStatus::OnTime,
            (Some(_), _) => KeyStatus::Late,
            (None, Some(now)) if past_grace(now) => KeyStatus::Overdue,
            (None, _) => KeyStatus::Retained,
        };
        keys.keys += 1;
        keys.generated += u64::from(in_period(e.generated));
        keys.destroyed += u64::from(e.destroyed.is_some_and(|(at, _)| in_period(at)));
        *keys.by_status.entry(status.as_str()).or_default() += 1;
        rows.push((
            e.generated,
            KeyEpoch {
                kid: kid.to_owned(),
                generated: codec::format_time(e.generated),
                not_before: codec::format_time(e.not_before),
                not_after: codec::format_time(e.not_after),
                destroy_after: codec::format_time(e.destroy_after),
                destroyed: e.destroyed.map(|(at, _)| codec::format_time(at)),
                status,
            },
        ));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.kid.cmp(&b.1.kid)));
    keys.epochs = rows.into_iter().map(|(_, row)| row).collect();
    keys
}

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use time::macros::datetime;

use super::*;
use crate::audit::export::Export;
use crate::audit::leaf::tests::{denied, opened, warrant};
use crate::audit::leaf::{
    AuthoritiesLoaded, AuthoritySummary, DenyReason, Digest, EmergencySummary, KeyDestroyed,
    KeyGenerated, PolicySummary, Revocation, WarrantRefused,
};

const A: &str = "spiffe://agency.example/lea";
const B: &str = "spiffe://police.example/unit-9";
const ADMIN: &str = "spiffe://agency.example/admin";

fn policy(max_hours: u32) -> Event {
    AuthoritiesLoaded::new(
        Digest::of_trust_config(b"[policy]\n"),
        vec![AuthoritySummary {
            kid: "executive-1".into(),
            role: "executive".into(),
            alg: "ES256".into(),
            holder: None,
        }],
        PolicySummary {
            require: BTreeMap::from([("executive".into(), 1)]),
            emergency: Some(EmergencySummary {
                require: BTreeMap::from([("executive".into(), 1)]),
                max_hours,
            }),
        },
    )
    .unwrap()
    .into()
}

fn key(kid: &str, destroy_after: OffsetDateTime) -> Event {
    KeyGenerated::new(
        kid,
        datetime!(2026-01-01 00:00 UTC),
        datetime!(2026-02-01 00:00 UTC),
        destroy_after,
        None,
    )
    .unwrap()
    .into()
}

fn destroyed(kid: &str, forced: bool) -> Event {
    KeyDestroyed::new(
        kid,
        if forced { "forced" } else { "retention" },
        forced,
        None,
    )
    .unwrap()
    .into()
}

fn refused(caller: &str, id: Option<&str>, code: &'static str) -> Event {
    WarrantRefused::new(caller, id, None, code).unwrap().into()
}

fn revoked(id: &str, authority: Option<&str>) -> Event {
    let signed = authority.map(|authority| crate::audit::leaf::SignedRevocation {
        authority,
        digest: [5; 32],
        time: datetime!(2026-05-01 00:00 UTC),
    });
    Revocation::new(ADMIN, id, "the investigation closed", signed)
        .unwrap()
        .into()
}

/// The report of `events` with its detail form (per-warrant rows).
fn detailed(events: &[(OffsetDateTime, Event)]) -> Report {
    build(
        events,
        &Options {
            detail: true,
            ..Options::default()
        },
    )
}

/// A verifier's summary of these leaves. The aggregation trusts its input
/// (the verifier's tests are in `audit::export`); here only the figures are
/// under test.
fn summary(events: &[(OffsetDateTime, Event)]) -> (Export, Summary) {
    let leaves: Vec<Leaf> = (0u64..)
        .zip(events)
        .map(|(seq, (time, event))| Leaf {
            seq,
            time: *time,
            event: event.clone(),
        })
        .collect();
    let export = Export {
        origin: "lavd.example/audit".into(),
        checkpoint: "lavd.example/audit\n3\nroot\n\n— lavd.example/audit sig\n".into(),
        earlier_checkpoints: Vec::new(),
        entries: Vec::new(),
    };
    let summary = Summary {
        origin: "lavd.example/audit".into(),
        size: leaves.len() as u64,
        root: [7; 32],
        consistent_with: vec![2],
        span: None,
        events: BTreeMap::new(),
        opened: 0,
        denied: BTreeMap::new(),
        refused: BTreeMap::new(),
        callers: BTreeMap::new(),
        warrants: BTreeMap::new(),
        leaves,
    };
    (export, summary)
}

/// The scripted mix: two agencies over two months, denials, refusals, three
/// urgent warrants (replaced, lapsed, pending), two revocations, four keys
/// (on time, late, early, overdue) and one still retained.
fn mix() -> Vec<(OffsetDateTime, Event)> {
    let full = warrant("W-FULL", false);
    let u1 = warrant("W-URGENT-1", true);
    let u1_full = warrant("W-URGENT-1", false);
    let u2 = warrant("W-URGENT-2", true);
    let u3 = warrant("W-URGENT-3", true);
    vec![
        (datetime!(2026-01-01 00:00 UTC), policy(2)),
        (
            datetime!(2026-01-01 00:01 UTC),
            key("2026-01", datetime!(2026-06-01 00:00 UTC)),
        ),
        (
            datetime!(2026-01-01 00:02 UTC),
            key("2026-02", datetime!(2026-06-02 00:00 UTC)),
        ),
        (
            datetime!(2026-01-01 00:03 UTC),
            key("2026-03", datetime!(2026-12-01 00:00 UTC)),
        ),
        (
            datetime!(2026-01-01 00:04 UTC),
            key("2026-04", datetime!(2026-06-03 00:00 UTC)),
        ),
        (
            datetime!(2026-01-01 00:05 UTC),
            key("2026-05", datetime!(2027-06-01 00:00 UTC)),
        ),
        (datetime!(2026-05-03 10:00 UTC), opened(A, &full, 1)),
        (datetime!(2026-05-03 10:00 UTC), opened(A, &full, 2)),
        (
            datetime!(2026-05-03 10:00 UTC),
            denied(A, &full, DenyReason::OutOfWindow),
        ),
        (
            datetime!(2026-05-20 09:00 UTC),
            refused(B, Some("W-BAD"), "policy_not_met"),
        ),
        (
            datetime!(2026-05-21 09:00 UTC),
            refused(B, None, "malformed_warrant"),
        ),
        // Urgent 1: used, then replaced 90 minutes later.
        (datetime!(2026-05-22 08:00 UTC), opened(B, &u1, 3)),
        (datetime!(2026-05-22 09:30 UTC), opened(B, &u1_full, 4)),
        (
            datetime!(2026-05-22 09:40 UTC),
            refused(B, Some("W-URGENT-1"), "emergency_superseded"),
        ),
        // Urgent 2: used twice 30 minutes apart, then refused as expired.
        (datetime!(2026-05-23 08:00 UTC), opened(B, &u2, 5)),
        (
            datetime!(2026-05-23 08:30 UTC),
            denied(B, &u2, DenyReason::BudgetExhausted),
        ),
        (
            datetime!(2026-05-23 11:00 UTC),
            refused(B, Some("W-URGENT-2"), "emergency_expired"),
        ),
        (datetime!(2026-06-01 12:00 UTC), destroyed("2026-01", false)),
        (datetime!(2026-06-04 12:00 UTC), destroyed("2026-02", false)),
        (datetime!(2026-06-01 12:00 UTC), destroyed("2026-03", true)),
        (datetime!(2026-06-10 08:00 UTC), revoked("W-FULL", None)),
        (
            datetime!(2026-06-10 09:00 UTC),
            revoked("W-URGENT-2", Some("executive-1")),
        ),
        (
            datetime!(2026-06-10 10:00 UTC),
            refused(A, Some("W-FULL"), "warrant_revoked"),
        ),
        // Urgent 3: first used one hour before the end of the log.
        (datetime!(2026-06-10 10:00 UTC), opened(A, &u3, 6)),
        (datetime!(2026-06-10 11:00 UTC), opened(A, &full, 7)),
    ]
}

fn build(events: &[(OffsetDateTime, Event)], options: &Options) -> Report {
    let (export, summary) = summary(events);
    Report::build(&export.checkpoint, &summary, options)
}

#[test]
fn figures_count_each_event_of_the_mix() {
    let r = build(&mix(), &Options::default());
    assert_eq!(r.schema, "lavd.oversight-report/1");
    assert_eq!(r.form, Form::Aggregate);
    assert!(r.detail.is_none());
    let t = &r.totals;
    assert_eq!((t.opened, t.denied, t.refused, t.revocations), (7, 2, 5, 2));
    assert_eq!((t.keys_generated, t.keys_destroyed), (5, 3));
    assert_eq!(r.period.leaves, 25);
    assert_eq!(r.period.as_of.as_deref(), Some("2026-06-10T11:00:00Z"));

    let row = |month: &str, agency: &str| {
        r.monthly
            .iter()
            .find(|m| m.month == month && m.agency == agency)
            .map(|m| (m.opened, m.denied, m.refused))
    };
    assert_eq!(r.monthly.len(), 3);
    assert_eq!(row("2026-05", A), Some((2, 1, 0)));
    assert_eq!(row("2026-05", B), Some((3, 1, 4)));
    assert_eq!(row("2026-06", A), Some((2, 0, 1)));

    assert_eq!(
        r.denials_by_reason,
        BTreeMap::from([("budget_exhausted".into(), 1), ("out_of_window".into(), 1)])
    );
    assert_eq!(r.refusals_by_code["policy_not_met"], 1);
    assert_eq!(r.refusals_by_code["emergency_expired"], 1);
    assert_eq!(r.refusals_by_code.values().sum::<u64>(), 5);

    let u = &r.urgent;
    assert_eq!(
        (u.warrants, u.replaced, u.lapsed, u.pending),
        (3, 1, 1, 1),
        "{u:?}"
    );
    assert_eq!((u.opened, u.denied), (3, 1));
    // Replaced after 90 min; lapsed after 30 min of use; pending: 0 s.
    assert_eq!(
        u.duration_seconds,
        DurationStats {
            min: 0,
            median: 1800,
            max: 5400
        }
    );

    assert_eq!(
        (
            r.revocations.total,
            r.revocations.warrants,
            r.revocations.by_admin,
            r.revocations.by_authority
        ),
        (2, 2, 1, 1)
    );
    assert_eq!(
        r.revocations.monthly,
        vec![RevocationMonth {
            month: "2026-06".into(),
            admin: 1,
            authority: 1
        }]
    );

    let k = &r.keys;
    assert_eq!((k.keys, k.generated, k.destroyed), (5, 5, 3));
    let status: BTreeMap<&str, KeyStatus> = k
        .epochs
        .iter()
        .map(|e| (e.kid.as_str(), e.status))
        .collect();
    assert_eq!(status["2026-01"], KeyStatus::OnTime); // 12 h after
    assert_eq!(status["2026-02"], KeyStatus::Late); // 2.5 days after
    assert_eq!(status["2026-03"], KeyStatus::Early); // forced
    assert_eq!(status["2026-04"], KeyStatus::Overdue); // 7 days past, as of the log
    assert_eq!(status["2026-05"], KeyStatus::Retained);
    assert_eq!(k.by_status["on_time"], 1);
    assert_eq!(k.by_status.values().sum::<u64>(), 5);

    assert_eq!(r.verification.size, 25);
    assert_eq!(r.verification.consistent_with, vec![2]);
    assert!(r.verification.witnesses.is_empty());
}

#[test]
fn an_urgent_warrant_lapses_by_the_policy_hours_alone() {
    let u = warrant("W-U", true);
    let events = vec![
        (datetime!(2026-05-01 00:00 UTC), policy(2)),
        (datetime!(2026-05-01 10:00 UTC), opened(A, &u, 1)),
        (
            datetime!(2026-05-01 11:59 UTC),
            refused(A, None, "malformed_warrant"),
        ),
    ];
    assert_eq!(build(&events, &Options::default()).urgent.pending, 1);
    let mut later = events.clone();
    later.push((
        datetime!(2026-05-01 12:00 UTC),
        refused(A, None, "malformed_warrant"),
    ));
    let r = build(&later, &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.pending), (1, 0));
    // Without an emergency rule in the log, nothing says it lapsed.
    let r = build(&later[1..], &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.pending), (0, 1));
}

/// Used under the urgent rule, refused as expired once its period ended,
/// and only then used fully signed: the log shows it lapsed before it was
/// replaced. A replacement seen before any such refusal is a replacement.
#[test]
fn an_urgent_warrant_refused_as_expired_before_its_replacement_lapsed() {
    let u = warrant("W-U", true);
    let full = warrant("W-U", false);
    let events = vec![
        (datetime!(2026-05-01 00:00 UTC), policy(72)),
        (datetime!(2026-05-01 10:00 UTC), opened(A, &u, 1)),
        (
            datetime!(2026-05-04 18:00 UTC),
            refused(A, Some("W-U"), "emergency_expired"),
        ),
        (datetime!(2026-05-31 10:00 UTC), opened(A, &full, 2)),
    ];
    let r = build(&events, &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.replaced), (1, 0));
    // Replaced first, refused later (a stale copy presented again): replaced.
    let mut swapped = events.clone();
    swapped[2].0 = datetime!(2026-06-01 10:00 UTC);
    swapped.sort_by_key(|(t, _)| *t);
    let r = build(&swapped, &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.replaced), (0, 1));
}

/// A monthly detail report whose period begins after an urgent warrant
/// was first used, or after a warrant was revoked: the warrant's row still
/// says it is urgent (and what became of it) and revoked; the urgent
/// figures count only warrants first seen in the period.
#[test]
fn a_row_says_urgent_and_revoked_when_that_began_before_the_period() {
    let u = warrant("W-U", true);
    let events = vec![
        (datetime!(2026-04-01 00:00 UTC), policy(72)),
        (datetime!(2026-04-20 10:00 UTC), revoked("W-R", None)),
        (datetime!(2026-04-30 23:30 UTC), opened(A, &u, 1)),
        (datetime!(2026-05-01 00:30 UTC), opened(A, &u, 2)),
        (
            datetime!(2026-05-03 10:00 UTC),
            refused(A, Some("W-R"), "warrant_revoked"),
        ),
    ];
    let report = build(
        &events,
        &Options {
            from: Some(datetime!(2026-05-01 00:00 UTC)),
            detail: true,
            ..Options::default()
        },
    );
    let rows = &report.detail.as_ref().unwrap().warrants;
    let row = |id: &str| rows.iter().find(|w| w.id == id).unwrap();
    // Judged as of the newest leaf (05-03 10:00), inside its 72 hours.
    assert_eq!(row("W-U").urgent, Some(UrgentStatus::Pending));
    assert!(row("W-R").revoked);
    assert_eq!(report.urgent.warrants, 0, "first seen before the period");
    assert_eq!(report.revocations.warrants, 0, "revoked before the period");
}

/// Envelopes the HSM opened but whose request failed (leaf-only reasons)
/// are denied, and counted apart as opened but not released.
#[test]
fn opens_that_were_not_released_are_counted_apart() {
    let w = warrant("W-1", false);
    let events = vec![
        (datetime!(2026-05-01 10:00 UTC), opened(A, &w, 1)),
        (
            datetime!(2026-05-01 10:01 UTC),
            denied(A, &w, DenyReason::AuditCommitFailed),
        ),
        (
            datetime!(2026-05-01 10:02 UTC),
            denied(A, &w, DenyReason::WarrantExpired),
        ),
        (
            datetime!(2026-05-01 10:03 UTC),
            denied(A, &w, DenyReason::OutOfWindow),
        ),
        // Revoked while its request ran: an envelope leaf says so only then.
        (
            datetime!(2026-05-01 10:04 UTC),
            denied(A, &w, DenyReason::WarrantRevoked),
        ),
        (
            datetime!(2026-05-01 10:05 UTC),
            denied(A, &w, DenyReason::KeyDestroyed),
        ),
        // The process stopped before the audit commit: the HSM may not
        // have finished the open, so it is not counted as certainly opened.
        (
            datetime!(2026-05-01 10:06 UTC),
            denied(A, &w, DenyReason::OpenInterrupted),
        ),
        // A reload while its HSM opens ran no longer admitted it.
        (
            datetime!(2026-05-01 10:07 UTC),
            denied(A, &w, DenyReason::ConfigurationChanged),
        ),
    ];
    let r = build(&events, &Options::default());
    assert_eq!(
        (
            r.totals.opened,
            r.totals.denied,
            r.totals.opened_not_released
        ),
        (1, 7, 4)
    );
    let page = html::render(&r);
    assert!(
        page.contains("nothing was released: 4 in this period"),
        "{page}"
    );
    assert!(
        page.contains("may include some the HSM opened too"),
        "{page}"
    );
}

/// An urgent warrant whose hours ended while a request of it was in
/// flight: the daemon wrote that request's leaves denied
/// `emergency_expired` and no refusal leaf. Those leaves prove the lapse,
/// as a refusal would: lapsed, not pending, and not hidden by a later use
/// of the fully signed warrant.
#[test]
fn an_urgent_warrant_that_lapsed_in_flight_is_reported_lapsed() {
    let u = warrant("W-U", true);
    let full = warrant("W-U", false);
    let events = vec![
        (datetime!(2026-05-01 00:00 UTC), policy(72)),
        (datetime!(2026-05-01 01:00 UTC), opened(A, &u, 1)),
        (
            datetime!(2026-05-03 23:54 UTC),
            denied(A, &u, DenyReason::EmergencyExpired),
        ),
    ];
    let r = build(&events, &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.pending), (1, 0));
    // The lapse is not a use: the duration ends at the last one.
    assert_eq!(r.urgent.duration_seconds.max, 0);
    let mut later = events.clone();
    later.push((datetime!(2026-05-04 08:00 UTC), opened(A, &full, 2)));
    let r = build(&later, &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.replaced), (1, 0));
}

/// An urgent warrant first used so late that `max_hours` more would pass
/// the last representable time: still pending, not a panic.
#[test]
fn an_urgent_period_past_the_end_of_time_never_lapses() {
    let u = warrant("W-U", true);
    let events = vec![
        (datetime!(9999-12-31 00:00 UTC), policy(720)),
        (datetime!(9999-12-31 23:00 UTC), opened(A, &u, 1)),
    ];
    let r = build(&events, &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.pending), (0, 1));
}

/// A key kept "forever" (`destroy_after` on the last day of year 9999,
/// which `lavd keys generate` accepts): retained, not a panic.
#[test]
fn a_retention_past_the_end_of_time_is_retained() {
    let events = vec![(
        datetime!(2026-05-01 00:00 UTC),
        key("forever", datetime!(9999-12-31 23:59:59 UTC)),
    )];
    let r = build(&events, &Options::default());
    assert_eq!(r.keys.by_status["retained"], 1);
}

#[test]
fn a_period_counts_its_leaves_and_judges_as_of_its_end() {
    let options = Options {
        from: Some(datetime!(2026-05-22 00:00 UTC)),
        to: Some(datetime!(2026-06-02 00:00 UTC)),
        ..Options::default()
    };
    let r = build(&mix(), &options);
    assert_eq!(r.period.from.as_deref(), Some("2026-05-22T00:00:00Z"));
    // Judged at the period's end: the mix's later leaves show that the log
    // held nothing more before it.
    assert_eq!(r.period.as_of.as_deref(), Some("2026-06-02T00:00:00Z"));
    assert!(r.period.later_leaf);
    assert_eq!(
        (r.totals.opened, r.totals.denied, r.totals.refused),
        (3, 1, 2)
    );
    assert_eq!(r.totals.revocations, 0);
    // Urgent 3 is after the period; 1 and 2 are in it.
    assert_eq!(
        (r.urgent.warrants, r.urgent.replaced, r.urgent.lapsed),
        (2, 1, 1)
    );
    // Keys: all generated before; as of 2 June, 2026-04 is not yet overdue
    // and 2026-02 not yet destroyed.
    let status: BTreeMap<&str, KeyStatus> = r
        .keys
        .epochs
        .iter()
        .map(|e| (e.kid.as_str(), e.status))
        .collect();
    assert_eq!(status["2026-02"], KeyStatus::Retained);
    assert_eq!(status["2026-04"], KeyStatus::Retained);
    assert_eq!((r.keys.generated, r.keys.destroyed), (0, 2));
    // A key destroyed before the period is not listed.
    let r = build(
        &mix(),
        &Options {
            from: Some(datetime!(2026-06-05 00:00 UTC)),
            ..Options::default()
        },
    );
    assert!(r.keys.epochs.iter().all(|e| e.kid != "2026-01"));
    assert_eq!(r.keys.keys, 2);
}

#[test]
fn the_aggregate_form_names_no_warrant_and_the_detail_form_does() {
    let aggregate = build(&mix(), &Options::default());
    let json = String::from_utf8(aggregate.to_json().unwrap()).unwrap();
    let page = html::render(&aggregate);
    // No script, no fetch: the page may only use its own inline style; it
    // cannot be given another base URL, nor post a form anywhere.
    let csp = "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
               style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'\">";
    assert!(page.find(csp) < page.find("<style>"), "{page}");
    assert!(page.contains(csp));
    let digest = Digest::of_warrant_payload(b"W-FULL").to_string();
    let envelope = Digest::of_envelope(&[1], &[0x04; 65]).to_string();
    for text in [&json, &page] {
        for secret in [
            "W-FULL",
            "W-URGENT",
            "W-BAD",
            &digest,
            &envelope,
            "investigation",
        ] {
            assert!(!text.contains(secret), "{secret} in the aggregate form");
        }
    }
    assert!(page.contains("data-form=\"aggregate\""));
    assert!(json.contains("\"form\": \"aggregate\""));

    let detail = detailed(&mix());
    let rows = &detail.detail.as_ref().unwrap().warrants;
    let ids: Vec<&str> = rows.iter().map(|w| w.id.as_str()).collect();
    // W-BAD was refused before its signatures met the policy: its id is
    // only claimed, so it has no row of its own.
    assert_eq!(ids, ["W-FULL", "W-URGENT-1", "W-URGENT-2", "W-URGENT-3"]);
    let full = &rows[0];
    assert_eq!(
        (full.opened, full.denied, full.refused, full.revoked),
        (3, 1, 1, true)
    );
    assert_eq!(full.agencies, [A]);
    assert_eq!(rows[1].urgent, Some(UrgentStatus::Replaced));
    assert_eq!(rows[1].urgent_seconds, Some(5400));
    let claimed: Vec<(&str, Option<&str>, &str)> = detail
        .detail
        .as_ref()
        .unwrap()
        .claimed
        .iter()
        .map(|c| (c.agency.as_str(), c.claimed_id.as_deref(), c.code.as_str()))
        .collect();
    assert_eq!(
        claimed,
        [
            (B, Some("W-BAD"), "policy_not_met"),
            (B, None, "malformed_warrant")
        ]
    );
    let page = html::render(&detail);
    assert!(page.contains("data-form=\"detail\""));
    assert!(page.contains("<th scope=\"row\">W-URGENT-2</th>"));
    assert!(page.contains("the investigation closed"));
    // Never envelope digests, even in detail.
    assert!(!page.contains(&envelope));
    assert!(!String::from_utf8(detail.to_json().unwrap())
        .unwrap()
        .contains(&envelope));
}

/// Any caller can send a badly signed warrant that claims another
/// agency's warrant id. Such a refusal is listed apart, as a claimed id: the
/// real warrant's row keeps its own agencies, refusal count and first
/// sighting.
#[test]
fn a_claimed_id_is_not_merged_into_the_warrant_of_that_id() {
    let mut events = mix();
    events.push((
        datetime!(2026-05-01 00:00 UTC),
        refused(B, Some("W-FULL"), "bad_signature"),
    ));
    events.sort_by_key(|(t, _)| *t);
    let report = detailed(&events);
    let detail = report.detail.as_ref().unwrap();
    let full = detail.warrants.iter().find(|w| w.id == "W-FULL").unwrap();
    assert_eq!(full.agencies, [A]);
    assert_eq!(full.refused, 1);
    assert_eq!(full.first_seen, "2026-05-03T10:00:00Z");
    assert!(detail.claimed.iter().any(|c| c.agency == B
        && c.claimed_id.as_deref() == Some("W-FULL")
        && c.code == "bad_signature"));
    assert_eq!(report.totals.refused, 6);
}

#[test]
fn hostile_identities_and_ids_are_escaped() {
    let caller = "spiffe://evil.example/<script>alert(1)</script>";
    let id = "<script>alert(\"w\")</script><img src=x onerror=alert(2)>";
    let w = warrant(id, true);
    let events = vec![
        (datetime!(2026-05-01 10:00 UTC), opened(caller, &w, 1)),
        (
            datetime!(2026-05-01 10:01 UTC),
            refused(caller, Some(id), "emergency_expired"),
        ),
        (datetime!(2026-05-01 10:02 UTC), revoked(id, None)),
    ];
    let report = detailed(&events);
    let page = html::render(&report);
    assert!(!page.contains("<script"), "{page}");
    assert!(!page.contains("<img"), "{page}");
    assert!(page.contains("spiffe://evil.example/&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.contains(
        "&lt;script&gt;alert(&quot;w&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
    ));
    // In attributes too (the chart's data-row).
    assert!(page.contains("data-row=\"2026-05 · spiffe://evil.example/&lt;script&gt;"));
}

/// A caller's name (or a field of a log written before format characters
/// were refused) with a right-to-left override would display reversed, and
/// a zero-width space would make two names look alike: the page shows such
/// characters as their code points.
#[test]
fn invisible_format_characters_are_shown_not_obeyed() {
    let caller = "spiffe://police.example/\u{202e}tinu-lagelli\u{200b}";
    let w = warrant("W-1", false);
    let events = vec![(datetime!(2026-05-01 10:00 UTC), opened(caller, &w, 1))];
    let report = detailed(&events);
    let page = html::render(&report);
    assert!(!page.chars().any(crate::bounds::is_format), "{page}");
    assert!(page.contains("spiffe://police.example/[U+202E]tinu-lagelli[U+200B]"));
    // A character that displays as nothing: `lea` and `lea\u{3164}` would be
    // two rows that look alike.
    let twin = "spiffe://police.example/lea\u{3164}";
    let events = vec![(datetime!(2026-05-01 10:00 UTC), opened(twin, &w, 1))];
    let page = html::render(&build(&events, &Options::default()));
    assert!(!page.chars().any(crate::bounds::is_ignorable), "{page}");
    assert!(
        page.contains("spiffe://police.example/lea[U+3164]"),
        "{page}"
    );
}

/// A key destroyed months after its due date is late, whatever the leaf's
/// `forced` flag says (lavd before 2026-12 set it for any `--force`).
#[test]
fn a_forced_destruction_after_the_due_date_is_late() {
    let events = vec![
        (
            datetime!(2026-01-01 00:00 UTC),
            key("K", datetime!(2026-06-01 00:00 UTC)),
        ),
        (datetime!(2026-09-01 00:00 UTC), destroyed("K", true)),
    ];
    let r = build(&events, &Options::default());
    assert_eq!(r.keys.epochs[0].status, KeyStatus::Late);
    assert_eq!(r.keys.by_status["early"], 0);
}

/// A destruction applied again after a store restore adds a leaf for a
/// key already destroyed: the totals count the key once, as its row does.
#[test]
fn a_key_destroyed_again_counts_once() {
    let events = vec![
        (
            datetime!(2026-01-01 00:00 UTC),
            key("K", datetime!(2026-03-01 00:00 UTC)),
        ),
        (datetime!(2026-03-02 00:00 UTC), destroyed("K", false)),
        (datetime!(2026-03-05 00:00 UTC), destroyed("K", false)),
    ];
    let r = build(&events, &Options::default());
    assert_eq!(r.totals.keys_destroyed, 1);
    assert_eq!(r.keys.destroyed, 1);
    assert_eq!(
        r.keys.epochs[0].destroyed.as_deref(),
        Some("2026-03-02T00:00:00Z")
    );
}

/// Revoking a warrant again (a retried request, an admin and then an
/// authority, a revocation re-delivered) adds a leaf, not a warrant.
#[test]
fn a_warrant_revoked_again_counts_once() {
    let events = vec![
        (datetime!(2026-04-20 10:00 UTC), revoked("W-2", None)),
        (datetime!(2026-05-01 10:00 UTC), revoked("W-1", None)),
        (
            datetime!(2026-05-01 10:05 UTC),
            revoked("W-1", Some("judicial-3")),
        ),
        (
            datetime!(2026-05-01 10:06 UTC),
            revoked("W-1", Some("judicial-3")),
        ),
        (datetime!(2026-05-02 10:00 UTC), revoked("W-2", None)),
    ];
    let r = build(
        &events,
        &Options {
            from: Some(datetime!(2026-05-01 00:00 UTC)),
            ..Options::default()
        },
    );
    assert_eq!((r.revocations.total, r.revocations.warrants), (4, 1));
    assert_eq!(r.totals.revocations, 4);
    let page = html::render(&r);
    assert!(
        page.contains("<dt>warrants revoked</dt><dd data-total=\"warrants_revoked\">1</dd>"),
        "{page}"
    );
}

/// A quiet period followed by a verified leaf after `--to`: that leaf
/// shows the log held nothing more before `--to`, so the key overdue by
/// then is overdue, not retained.
#[test]
fn a_leaf_after_the_period_shows_it_complete() {
    let events = vec![
        (
            datetime!(2026-01-01 00:00 UTC),
            key("K", datetime!(2026-03-01 00:00 UTC)),
        ),
        (datetime!(2026-01-02 00:00 UTC), revoked("W-1", None)),
        (datetime!(2026-08-01 00:00 UTC), revoked("W-2", None)),
    ];
    let to = datetime!(2026-07-01 00:00 UTC);
    let r = build(
        &events,
        &Options {
            to: Some(to),
            ..Options::default()
        },
    );
    assert_eq!(r.keys.epochs[0].status, KeyStatus::Overdue);
    assert_eq!(r.period.as_of.as_deref(), Some("2026-07-01T00:00:00Z"));
    assert!(r.period.later_leaf);
    assert!(html::render(&r).contains("a verified entry after it shows"));
    // Without the later leaf, nothing shows it: judged at the newest leaf.
    let r = build(
        &events[..2],
        &Options {
            to: Some(to),
            ..Options::default()
        },
    );
    assert_eq!(r.keys.epochs[0].status, KeyStatus::Retained);
    assert!(!r.period.later_leaf);
}

#[test]
fn each_chart_carries_its_figures() {
    let r = build(&mix(), &Options::default());
    let page = html::render(&r);
    for chart in [
        "monthly",
        "denials",
        "refusals",
        "urgent",
        "revocations",
        "keys",
    ] {
        assert!(page.contains(&format!("data-chart=\"{chart}\"")), "{chart}");
        assert!(
            page.contains(&format!("<title id=\"{chart}-title\">")),
            "{chart}"
        );
    }
    assert!(page.contains(
        "<g data-key=\"2026-05 spiffe://police.example/unit-9\" \
         data-row=\"2026-05 · spiffe://police.example/unit-9\" data-total=\"8\">"
    ));
    assert!(page.contains("data-series=\"refused\" data-value=\"4\""));
    assert!(
        !page.contains("http://") || !page.contains("src="),
        "no fetches"
    );
    assert!(!page.contains("<link"));
    assert!(!page.contains("@import"));
    // An empty period still renders every chart.
    let empty = build(&[], &Options::default());
    let page = html::render(&empty);
    assert!(page.contains("None in this period"));
    assert_eq!(empty.urgent.duration_seconds, DurationStats::default());
}

#[test]
fn durations_read_as_words() {
    assert_eq!(html::human_duration(0), "0 s");
    assert_eq!(html::human_duration(45), "45 s");
    assert_eq!(html::human_duration(1830), "30 min 30 s");
    assert_eq!(html::human_duration(5400), "1 h 30 min");
    assert_eq!(html::human_duration(3 * 86_400 + 4 * 3600 + 59), "3 d 4 h");
    assert_eq!(
        DurationStats::of(vec![9, 1, 5, 3]),
        DurationStats {
            min: 1,
            median: 3,
            max: 9
        }
    );
}

/// A quiet log: its newest leaf is long before a key's grace ended. Judged
/// at that leaf the key is retained; judged when the log was seen to hold
/// nothing more (a live fetch, or `--as-of`), it is overdue. Never past
/// `--to`, and a time before the newest leaf changes nothing.
#[test]
fn a_quiet_log_is_judged_when_it_was_seen_complete() {
    let events = vec![
        (datetime!(2026-01-01 00:00 UTC), policy(2)),
        (
            datetime!(2026-01-01 00:01 UTC),
            key("2026-01", datetime!(2026-06-01 00:00 UTC)),
        ),
    ];
    let status = |options: &Options| {
        let r = build(&events, options);
        let key = r.keys.epochs.iter().find(|k| k.kid == "2026-01").unwrap();
        (key.status, r.period.as_of.clone().unwrap())
    };
    assert_eq!(
        status(&Options::default()),
        (KeyStatus::Retained, "2026-01-01T00:01:00Z".to_owned())
    );
    let seen = Options {
        observed: Some(datetime!(2026-06-03 00:00 UTC)),
        ..Options::default()
    };
    assert_eq!(
        status(&seen),
        (KeyStatus::Overdue, "2026-06-03T00:00:00Z".to_owned())
    );
    assert_eq!(
        build(&events, &seen).period.observed.as_deref(),
        Some("2026-06-03T00:00:00Z")
    );
    assert_eq!(build(&events, &seen).period.observed_by, Some("fetch"));
    assert_eq!(build(&events, &Options::default()).period.observed_by, None);
    // Stated (`--as-of`): judged at it all the same, and said to be stated.
    let stated = Options {
        observed_stated: true,
        ..seen.clone()
    };
    assert_eq!(build(&events, &stated).period.observed_by, Some("stated"));
    assert!(html::render(&build(&events, &stated))
        .contains("stated by whoever made this report, not verified: the log held nothing more at 2026-06-03T00:00:00Z"));
    let until = Options {
        to: Some(datetime!(2026-06-01 12:00 UTC)),
        ..seen.clone()
    };
    assert_eq!(
        status(&until),
        (KeyStatus::Retained, "2026-06-01T12:00:00Z".to_owned())
    );
    let early = Options {
        observed: Some(datetime!(2025-12-01 00:00 UTC)),
        ..Options::default()
    };
    assert_eq!(status(&early).1, "2026-01-01T00:01:00Z");
    assert!(html::render(&build(&events, &seen))
        .contains("the server reported no entries past its checkpoint at 2026-06-03T00:00:00Z"));
}

/// Leaves are timed when their request's work starts, so the last leaf is
/// not always the newest: the report is as of the newest.
#[test]
fn as_of_is_the_newest_leaf_not_the_last() {
    let events = vec![
        (datetime!(2026-01-01 00:00 UTC), policy(2)),
        (
            datetime!(2026-01-01 00:00:05 UTC),
            key("2026-01", datetime!(2026-06-01 00:00 UTC)),
        ),
        (
            datetime!(2026-01-01 00:00:04 UTC),
            key("2026-02", datetime!(2026-06-01 00:00 UTC)),
        ),
    ];
    let r = build(&events, &Options::default());
    assert_eq!(r.period.as_of.as_deref(), Some("2026-01-01T00:00:05Z"));
    // The span is the earliest and the latest time too, not the first and
    // the last leaf's (without the policy leaf, those are 00:05 and 00:04).
    let r = build(&events[1..], &Options::default());
    assert_eq!(
        (
            r.period.first_leaf.as_deref(),
            r.period.last_leaf.as_deref()
        ),
        (Some("2026-01-01T00:00:04Z"), Some("2026-01-01T00:00:05Z"))
    );
}

/// An urgent warrant whose leaves are out of time order (replicas' clocks
/// differ) is timed from its earliest leaf to its latest use: no negative
/// duration.
#[test]
fn an_urgent_warrants_duration_is_by_time_not_log_order() {
    let u = warrant("W-U", true);
    let events = vec![
        (datetime!(2026-05-01 00:00 UTC), policy(72)),
        (datetime!(2026-05-01 10:00:05 UTC), opened(A, &u, 1)),
        (datetime!(2026-05-01 10:00:04 UTC), opened(A, &u, 2)),
    ];
    let r = build(&events, &Options::default());
    assert_eq!(
        r.urgent.duration_seconds,
        DurationStats {
            min: 1,
            median: 1,
            max: 1
        }
    );
}

/// A revocation of an id no signatures met the policy for (revoked before
/// any use, or mistyped) makes no warrant row: rows name warrants. The
/// revocation itself is listed.
#[test]
fn a_revocation_alone_makes_no_warrant_row() {
    let events = vec![
        (datetime!(2026-05-01 00:00 UTC), policy(72)),
        (datetime!(2026-05-02 00:00 UTC), revoked("X", None)),
    ];
    let r = detailed(&events);
    let detail = r.detail.as_ref().unwrap();
    assert!(detail.warrants.is_empty(), "{:?}", detail.warrants);
    assert_eq!(detail.revocations.len(), 1);
}

/// Leaves written in place of an open intent (at the next start) or of a
/// failed audit commit (once the store was back) carry the time they were
/// written, not the open's: they do not stretch an urgent warrant's
/// duration past its hours, and the fully signed warrant's such leaves do
/// not replace it.
#[test]
fn a_leaf_written_after_a_crash_is_not_a_use() {
    let u = warrant("W-U", true);
    let full = warrant("W-U", false);
    let mut events = vec![
        (datetime!(2026-05-01 00:00 UTC), policy(72)),
        (datetime!(2026-05-01 01:00 UTC), opened(A, &u, 1)),
        (datetime!(2026-05-01 02:00 UTC), opened(A, &u, 2)),
        (
            datetime!(2026-05-09 09:00 UTC),
            denied(A, &u, DenyReason::OpenInterrupted),
        ),
        (
            datetime!(2026-05-09 09:00 UTC),
            denied(A, &u, DenyReason::AuditCommitFailed),
        ),
    ];
    let r = build(&events, &Options::default());
    assert_eq!(r.urgent.duration_seconds.max, 3600);
    assert_eq!((r.urgent.lapsed, r.urgent.replaced), (1, 0));
    // The fully signed warrant's interrupted open, written after the
    // urgent period ended, is no replacement either.
    events.push((
        datetime!(2026-05-10 00:00 UTC),
        denied(A, &full, DenyReason::OpenInterrupted),
    ));
    let r = build(&events, &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.replaced), (1, 0));
    assert_eq!(r.urgent.duration_seconds.max, 3600);
    // Its use is.
    events.push((datetime!(2026-05-02 00:00 UTC), opened(A, &full, 3)));
    let r = build(&events, &Options::default());
    assert_eq!((r.urgent.lapsed, r.urgent.replaced), (0, 1));
    assert_eq!(r.urgent.duration_seconds.max, 23 * 3600);
}

/// Leaves are not in time order (a leaf's time is when its request began;
/// replicas' clocks differ): a warrant's row spans its earliest to its
/// latest leaf, and an urgent warrant replaced by a leaf that carries an
/// earlier time lasted 0 seconds, not less.
#[test]
fn a_warrant_row_spans_its_earliest_to_its_latest_leaf() {
    let w = warrant("W-1", false);
    let events = vec![
        (datetime!(2026-05-01 10:00:06 UTC), opened(A, &w, 1)),
        (datetime!(2026-05-01 10:00:05 UTC), opened(A, &w, 2)),
        (datetime!(2026-05-01 10:00:07 UTC), opened(A, &w, 3)),
    ];
    let report = detailed(&events);
    let row = &report.detail.as_ref().unwrap().warrants[0];
    assert_eq!(
        (row.first_seen.as_str(), row.last_seen.as_str()),
        ("2026-05-01T10:00:05Z", "2026-05-01T10:00:07Z")
    );
    let u = warrant("W-U", true);
    let full = warrant("W-U", false);
    let events = vec![
        (datetime!(2026-05-01 00:00 UTC), policy(72)),
        (datetime!(2026-05-01 10:00:05 UTC), opened(A, &u, 1)),
        (datetime!(2026-05-01 10:00:03 UTC), opened(A, &full, 2)),
        (datetime!(2026-05-01 10:00:09 UTC), opened(A, &full, 3)),
    ];
    let report = detailed(&events);
    assert_eq!(report.urgent.replaced, 1);
    assert_eq!(report.urgent.duration_seconds.min, 0);
    let row = &report.detail.as_ref().unwrap().warrants[0];
    assert_eq!(row.urgent_seconds, Some(0));
}

//! The report as one self-contained HTML page: inline CSS, inline SVG charts
//! drawn here, a data table beside each chart, no script, no font or image
//! fetched from anywhere. It prints on A4 and reads without colour (every
//! figure is also in a table).
//!
//! # Security
//! Every string that comes from the log (caller identities, warrant ids,
//! revocation reasons, key ids, the checkpoint text) goes through [`escape`],
//! in text and in attributes alike; nothing from the log is ever placed in
//! a tag name, an attribute name, a URL or CSS.
//!
//! Each chart is an `<svg data-chart="NAME">` whose bars carry their figures
//! as `data-row`, `data-series` and `data-value` attributes, so a test (or a
//! reader's tool) can read the numbers back from the rendered page.

use std::fmt::Write as _;

use super::{Form, KeyStatus, Report, UrgentStatus, SCHEMA};

/// Escapes text for HTML text and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Invisible characters that reorder or hide what is displayed
            // (a log written before their refusal, or a caller's name), and
            // those that display as nothing (U+3164, variation selectors:
            // `lea` and `lea\u{3164}` would be two rows that look alike),
            // are shown, not obeyed.
            c if crate::bounds::is_format(c) || crate::bounds::is_ignorable(c) => {
                out.push_str(&format!("[U+{:04X}]", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out
}

/// One series of a chart: a colour in the stacked bars.
struct Series {
    key: &'static str,
    label: &'static str,
    color: &'static str,
}

/// Okabe–Ito colours, distinguishable with the common colour-vision
/// deficiencies.
const BLUE: &str = "#0072B2";
const ORANGE: &str = "#E69F00";
const VERMILLION: &str = "#D55E00";
const GREEN: &str = "#009E73";
const PURPLE: &str = "#CC79A7";
const SKY: &str = "#56B4E9";
const GREY: &str = "#7f7f7f";

const OPENED: Series = Series {
    key: "opened",
    label: "opened",
    color: BLUE,
};
const DENIED: Series = Series {
    key: "denied",
    label: "denied",
    color: ORANGE,
};
const REFUSED: Series = Series {
    key: "refused",
    label: "refused",
    color: VERMILLION,
};

/// One bar: its machine key (a month, code or status, as in the JSON), its
/// label and one value per series.
struct Row {
    key: String,
    label: String,
    values: Vec<u64>,
}

/// A chart and its data table.
struct Chart<'a> {
    id: &'static str,
    title: &'static str,
    desc: String,
    row_header: &'static str,
    series: &'a [Series],
    rows: Vec<Row>,
}

const WIDTH: u32 = 560;
const BAR_MAX: u32 = 470;
const ROW_HEIGHT: u32 = 42;
const LEGEND_HEIGHT: u32 = 30;

impl Chart<'_> {
    fn svg(&self, out: &mut String) {
        let rows = u32::try_from(self.rows.len()).unwrap_or(u32::MAX);
        let height = rows
            .max(1)
            .saturating_mul(ROW_HEIGHT)
            .saturating_add(LEGEND_HEIGHT + 8);
        let max = self
            .rows
            .iter()
            .map(|r| r.values.iter().sum::<u64>())
            .max()
            .unwrap_or(0)
            .max(1);
        let _ = write!(
            out,
            "<svg class=\"chart\" data-chart=\"{id}\" role=\"img\" aria-labelledby=\"{id}-title {id}-desc\" \
             viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" \
             xmlns=\"http://www.w3.org/2000/svg\">\
             <title id=\"{id}-title\">{title}</title><desc id=\"{id}-desc\">{desc}</desc>",
            id = self.id,
            title = escape(self.title),
            desc = escape(&self.desc),
        );
        let mut x = 0u32;
        for s in self.series {
            let _ = write!(
                out,
                "<rect x=\"{x}\" y=\"6\" width=\"12\" height=\"12\" fill=\"{}\"/>\
                 <text x=\"{}\" y=\"16\" class=\"legend\">{}</text>",
                s.color,
                x + 17,
                escape(s.label)
            );
            x += 17 + 9 * u32::try_from(s.label.len()).unwrap_or(20) + 22;
        }
        if self.rows.is_empty() {
            let _ = write!(
                out,
                "<text x=\"0\" y=\"{}\" class=\"empty\">None in this period</text>",
                LEGEND_HEIGHT + 22
            );
        }
        for (i, row) in (0u32..).zip(&self.rows) {
            let y = i.saturating_mul(ROW_HEIGHT).saturating_add(LEGEND_HEIGHT);
            let total: u64 = row.values.iter().sum();
            let label = escape(&row.label);
            let _ = write!(
                out,
                "<g data-key=\"{}\" data-row=\"{label}\" data-total=\"{total}\">\
                 <text x=\"0\" y=\"{}\" class=\"label\">{label}</text>",
                escape(&row.key),
                y + 12
            );
            let mut x = 0.0f64;
            for (s, value) in self.series.iter().zip(&row.values) {
                // Bar lengths are for the eye; the figures are in the
                // attributes and the table.
                let w = f64::from(BAR_MAX) * (*value as f64) / (max as f64);
                let _ = write!(
                    out,
                    "<rect data-series=\"{key}\" data-value=\"{value}\" x=\"{x:.1}\" y=\"{}\" \
                     width=\"{w:.1}\" height=\"18\" fill=\"{color}\">\
                     <title>{label}: {value} {series}</title></rect>",
                    y + 18,
                    key = s.key,
                    color = s.color,
                    series = escape(s.label),
                );
                x += w;
            }
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{}\" class=\"total\">{total}</text></g>",
                x + 6.0,
                y + 32
            );
        }
        out.push_str("</svg>");
    }

    fn table(&self, out: &mut String) {
        let _ = write!(
            out,
            "<table><caption>{}: the figures</caption><thead><tr><th scope=\"col\">{}</th>",
            escape(self.title),
            escape(self.row_header)
        );
        for s in self.series {
            let _ = write!(
                out,
                "<th scope=\"col\" class=\"n\">{}</th>",
                escape(s.label)
            );
        }
        if self.series.len() > 1 {
            out.push_str("<th scope=\"col\" class=\"n\">total</th>");
        }
        out.push_str("</tr></thead><tbody>");
        if self.rows.is_empty() {
            let _ = write!(
                out,
                "<tr><td colspan=\"{}\">none</td></tr>",
                self.series.len() + 2
            );
        }
        for row in &self.rows {
            let _ = write!(out, "<tr><th scope=\"row\">{}</th>", escape(&row.label));
            for v in &row.values {
                let _ = write!(out, "<td class=\"n\">{v}</td>");
            }
            if self.series.len() > 1 {
                let _ = write!(
                    out,
                    "<td class=\"n\">{}</td>",
                    row.values.iter().sum::<u64>()
                );
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table>");
    }

    /// The section: heading, intro, the chart with its table beside it
    /// (then `beside`), and `below` under both (`beside` and `below` are
    /// HTML made here, every log string already escaped).
    fn section(&self, heading: &str, intro: &str, beside: &str, below: &str, out: &mut String) {
        let _ = write!(
            out,
            "<section aria-labelledby=\"{id}-h\"><h2 id=\"{id}-h\">{}</h2><p class=\"intro\">{}</p>\
             <div class=\"pair\"><figure>",
            escape(heading),
            escape(intro),
            id = self.id
        );
        self.svg(out);
        out.push_str("</figure><div>");
        self.table(out);
        out.push_str(beside);
        out.push_str("</div></div>");
        out.push_str(below);
        out.push_str("</section>");
    }
}

/// A duration in words: `3 d 4 h`, `2 h 5 min`, `45 s`.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, m) => format!("{m} min {} s", s % 60),
        (0, h, m) => format!("{h} h {m} min"),
        (d, h, _) => format!("{d} d {h} h"),
    }
}

fn urgent_label(s: UrgentStatus) -> &'static str {
    match s {
        UrgentStatus::Replaced => "replaced by a fully signed warrant",
        UrgentStatus::Lapsed => "lapsed",
        UrgentStatus::Pending => "pending (may still be in its urgent period)",
    }
}

fn key_label(s: KeyStatus) -> &'static str {
    match s {
        KeyStatus::OnTime => "destroyed on time",
        KeyStatus::Late => "destroyed late",
        KeyStatus::Early => "destroyed early (before its due date)",
        KeyStatus::Overdue => "overdue (not destroyed)",
        KeyStatus::Retained => "retained (not yet due)",
    }
}

const STYLE: &str = r#"
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font-family: system-ui, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", Arial, sans-serif;
  color: #1a1a1a; background: #fff; margin: 0 auto; max-width: 1120px; padding: 24px 32px 48px;
  line-height: 1.45; font-size: 15px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 4px; border-bottom: 2px solid #1a1a1a; padding-bottom: 3px; }
.sub { color: #444; margin: 0 0 12px; overflow-wrap: anywhere; }
.form { border-left: 6px solid; padding: 8px 12px; margin: 12px 0 20px; }
.form-aggregate { border-color: #009E73; background: #eef8f4; }
.form-detail { border-color: #D55E00; background: #fdf0e8; }
.cards { display: grid; grid-template-columns: repeat(6, minmax(0, 1fr)); gap: 10px; margin: 0 0 24px; padding: 0; }
.cards div { border: 1px solid #ccc; border-radius: 6px; padding: 8px 10px; }
.cards dt { font-size: 12px; color: #444; text-transform: uppercase; letter-spacing: .04em; }
.cards dd { margin: 0; font-size: 26px; font-weight: 700; }
section { margin: 0 0 26px; break-inside: avoid; }
.intro { color: #333; margin: 4px 0 10px; }
.pair { display: grid; grid-template-columns: minmax(0, 560px) minmax(0, 1fr); gap: 28px; align-items: start; }
figure { margin: 0; }
svg.chart { max-width: 100%; height: auto; font-size: 13px; }
svg .label { fill: #1a1a1a; }
svg .legend { fill: #333; font-size: 12px; }
svg .total { fill: #1a1a1a; font-weight: 700; }
svg .empty { fill: #666; font-style: italic; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 0 0 8px; }
caption { text-align: left; font-weight: 600; padding: 0 0 4px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
tbody th { overflow-wrap: anywhere; font-weight: 600; }
.t { white-space: nowrap; }
table + table { margin-top: 14px; }
thead th { border-bottom: 2px solid #999; }
.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre { background: #f4f4f4; padding: 10px; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0 0 8px; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
footer { color: #555; font-size: 12px; border-top: 1px solid #ccc; padding-top: 8px; }
@media (max-width: 900px) { .pair { grid-template-columns: 1fr; } .cards { grid-template-columns: repeat(3, 1fr); } }
@media print { body { max-width: none; padding: 0; font-size: 11pt; }
  .pair { grid-template-columns: 1fr 1fr; } section { break-inside: avoid; }
  .form, .cards div { -webkit-print-color-adjust: exact; print-color-adjust: exact; } }
"#;

/// Renders the report as one HTML page.
pub fn render(report: &Report) -> String {
    let mut out = String::with_capacity(32 * 1024);
    let origin = escape(&report.verification.origin);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"generator\" content=\"lavd audit report ({SCHEMA})\">\
         <title>Oversight report: {origin}</title><style>{STYLE}</style></head>\n<body>\
         <header><h1>Oversight report</h1><p class=\"sub\">Audit log <strong>{origin}</strong>, \
         {size} entries verified",
        size = report.verification.size,
    );
    match (&report.period.first_leaf, &report.period.last_leaf) {
        (Some(first), Some(last)) => {
            let _ = write!(
                out,
                "; this report covers {} entries from {} to {}",
                report.period.leaves,
                escape(first),
                escape(last)
            );
        }
        _ => out.push_str("; no entries in this period"),
    }
    if report.period.from.is_some() || report.period.to.is_some() {
        let _ = write!(
            out,
            " (period: from {} to {})",
            escape(report.period.from.as_deref().unwrap_or("the start")),
            escape(report.period.to.as_deref().unwrap_or("the end"))
        );
    }
    out.push_str(".</p>");
    match report.form {
        Form::Aggregate => out.push_str(
            "<p class=\"form form-aggregate\" data-form=\"aggregate\"><strong>Aggregate form.</strong> \
             Counts only: no warrant ids, targets, envelope digests or references. \
             Suitable for publication.</p>",
        ),
        Form::Detail => out.push_str(
            "<p class=\"form form-detail\" data-form=\"detail\"><strong>Detail form: internal.</strong> \
             It lists warrant ids, the agencies that used each warrant and revocation reasons. \
             Not for publication; the aggregate form is.</p>",
        ),
    }
    if !report.verification.anchored_by.contains(&"fetch") {
        out.push_str(
            "<p class=\"form form-detail\" data-anchored=\"false\"><strong>Not shown \
             complete.</strong> Nothing here shows that the log held no more entries than \
             these: a copy cut back to an earlier checkpoint, its newest entries left out, \
             would verify the same (unless below a checkpoint or export the reader already \
             held: <code>--checkpoint</code>, <code>--previous</code>). A report made with \
             <code>--url</code> from the log whose newest checkpoint was the one read shows \
             it, as of then.</p>",
        );
    }
    out.push_str("</header><main>");

    let t = &report.totals;
    out.push_str("<dl class=\"cards\" aria-label=\"Totals for the period\">");
    for (label, value) in [
        ("opened", t.opened),
        ("denied", t.denied),
        ("refused", t.refused),
        ("urgent warrants", t.urgent_warrants),
        ("warrants revoked", report.revocations.warrants),
        ("keys destroyed", t.keys_destroyed),
    ] {
        let _ = write!(
            out,
            "<div><dt>{label}</dt><dd data-total=\"{}\">{value}</dd></div>",
            label.replace(' ', "_")
        );
    }
    out.push_str("</dl>");

    Chart {
        id: "monthly",
        title: "Envelopes opened and denied, warrants refused, by month and agency",
        desc: format!(
            "Stacked bars, one per month and agency: {} opened, {} denied, {} refused in total.",
            t.opened, t.denied, t.refused
        ),
        row_header: "month · agency",
        series: &[OPENED, DENIED, REFUSED],
        rows: report
            .monthly
            .iter()
            .map(|m| Row {
                key: format!("{} {}", m.month, m.agency),
                label: format!("{} · {}", m.month, m.agency),
                values: vec![m.opened, m.denied, m.refused],
            })
            .collect(),
    }
    .section(
        "Access by month and agency",
        "Each envelope an agency asked to open is one unwrap entry, opened or denied; a request \
         refused for its warrant is one refusal. Agencies are the identities in their client \
         certificates.",
        "",
        "",
        &mut out,
    );

    let single = |map: &std::collections::BTreeMap<String, u64>| -> Vec<Row> {
        map.iter()
            .map(|(k, v)| Row {
                key: k.clone(),
                label: k.clone(),
                values: vec![*v],
            })
            .collect()
    };
    Chart {
        id: "denials",
        title: "Denied envelopes by reason",
        desc: format!("Bars, one per reason: {} denied in total.", t.denied),
        row_header: "reason",
        series: &[DENIED],
        rows: single(&report.denials_by_reason),
    }
    .section(
        "Denials by reason",
        &format!(
            "An envelope is denied when the warrant was valid but does not reach it (outside \
             the window, another target, budget spent, key destroyed, …). Six reasons are \
             different: audit_commit_failed, warrant_expired, emergency_expired, \
             authority_not_valid, configuration_changed and warrant_revoked mark envelopes \
             the HSM did open, whose request then failed (its audit commit, the warrant's or \
             a signer's end reached, a reload that no longer admitted it, or the warrant \
             revoked, while it ran), so nothing was released: {} in this \
             period. Envelopes denied key_destroyed, budget_exhausted, open_failed or \
             open_interrupted may include some the HSM opened too (a key's retention or a \
             budget lease that ended, or an HSM failure later in the batch, while the request \
             ran; or the process stopped before the request's audit commit); the log does not \
             tell those apart, and nothing of them was released either.",
            t.opened_not_released
        ),
        "",
        "",
        &mut out,
    );
    Chart {
        id: "refusals",
        title: "Refused warrants by code",
        desc: format!(
            "Bars, one per refusal code: {} refused in total.",
            t.refused
        ),
        row_header: "code",
        series: &[REFUSED],
        rows: single(&report.refusals_by_code),
    }
    .section(
        "Refused warrants by code",
        "A whole request is refused when its warrant is not accepted: not signed as the policy \
         requires, expired, revoked, for another agency, …",
        "",
        "",
        &mut out,
    );

    let u = &report.urgent;
    let d = &u.duration_seconds;
    let mut urgent_facts = String::new();
    let _ = write!(
        urgent_facts,
        "<table class=\"urgent-facts\"><caption>Urgent procedure: use and duration</caption><tbody>\
         <tr><th scope=\"row\">urgent warrants</th><td class=\"n\" data-urgent=\"warrants\">{}</td></tr>\
         <tr><th scope=\"row\">envelopes opened under them</th><td class=\"n\" data-urgent=\"opened\">{}</td></tr>\
         <tr><th scope=\"row\">envelopes denied under them</th><td class=\"n\" data-urgent=\"denied\">{}</td></tr>\
         <tr><th scope=\"row\">duration: shortest</th><td class=\"n\" data-seconds=\"{}\">{}</td></tr>\
         <tr><th scope=\"row\">duration: median</th><td class=\"n\" data-seconds=\"{}\">{}</td></tr>\
         <tr><th scope=\"row\">duration: longest</th><td class=\"n\" data-seconds=\"{}\">{}</td></tr>\
         </tbody></table>",
        u.warrants,
        u.opened,
        u.denied,
        d.min,
        human_duration(d.min),
        d.median,
        human_duration(d.median),
        d.max,
        human_duration(d.max),
    );

    const URGENT: Series = Series {
        key: "warrants",
        label: "urgent warrants",
        color: PURPLE,
    };
    Chart {
        id: "urgent",
        title: "Urgent warrants by outcome",
        desc: format!(
            "Bars, one per outcome: {} urgent warrants, {} replaced, {} lapsed, {} pending.",
            u.warrants, u.replaced, u.lapsed, u.pending
        ),
        row_header: "outcome",
        series: &[URGENT],
        rows: [
            (UrgentStatus::Replaced, u.replaced),
            (UrgentStatus::Lapsed, u.lapsed),
            (UrgentStatus::Pending, u.pending),
        ]
        .into_iter()
        .map(|(s, n)| Row {
            key: s.as_str().to_owned(),
            label: urgent_label(s).to_owned(),
            values: vec![n],
        })
        .collect(),
    }
    .section(
        "Urgent procedure",
        "An urgent warrant is signed under the policy's emergency rule and usable only for a \
         few hours; it should be replaced by a fully signed warrant with the same id.",
        &urgent_facts,
        "",
        &mut out,
    );
    let r = &report.revocations;
    Chart {
        id: "revocations",
        title: "Revocations by month",
        desc: format!(
            "Stacked bars, one per month: {} revocations of {} warrants newly revoked, {} by an \
             admin, {} by an authority.",
            r.total, r.warrants, r.by_admin, r.by_authority
        ),
        row_header: "month",
        series: &[
            Series {
                key: "admin",
                label: "by an admin",
                color: SKY,
            },
            Series {
                key: "authority",
                label: "by an authority",
                color: GREEN,
            },
        ],
        rows: r
            .monthly
            .iter()
            .map(|m| Row {
                key: m.month.clone(),
                label: m.month.clone(),
                values: vec![m.admin, m.authority],
            })
            .collect(),
    }
    .section(
        "Revocations",
        "A revoked warrant opens nothing more, ever. Admins revoke with their role; authorities \
         with a signed revocation.",
        "",
        "",
        &mut out,
    );

    let k = &report.keys;
    let mut epochs = String::new();
    epochs.push_str(
        "<table class=\"epochs\"><caption>Key epochs</caption><thead><tr>\
         <th scope=\"col\">key</th><th scope=\"col\">generated</th><th scope=\"col\">valid</th>\
         <th scope=\"col\">retained until</th><th scope=\"col\">destroyed</th>\
         <th scope=\"col\">status</th></tr></thead><tbody>",
    );
    if k.epochs.is_empty() {
        epochs.push_str("<tr><td colspan=\"6\">none</td></tr>");
    }
    for e in &k.epochs {
        let _ = write!(
            epochs,
            "<tr data-kid=\"{kid}\" data-status=\"{status}\"><th scope=\"row\">{kid}</th><td class=\"t\">{}</td>\
             <td class=\"t\">{} –<br>{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td><td>{}</td></tr>",
            escape(&e.generated),
            escape(&e.not_before),
            escape(&e.not_after),
            escape(&e.destroy_after),
            escape(e.destroyed.as_deref().unwrap_or("—")),
            key_label(e.status),
            kid = escape(&e.kid),
            status = e.status.as_str(),
        );
    }
    epochs.push_str("</tbody></table>");

    Chart {
        id: "keys",
        title: "Escrow keys by status",
        desc: format!(
            "Bars, one per status: {} keys, {} generated and {} destroyed in the period.",
            k.keys, k.generated, k.destroyed
        ),
        row_header: "status",
        series: &[Series {
            key: "keys",
            label: "keys",
            color: GREY,
        }],
        rows: KeyStatus::ALL
            .iter()
            .map(|s| Row {
                key: s.as_str().to_owned(),
                label: key_label(*s).to_owned(),
                values: vec![k.by_status.get(s.as_str()).copied().unwrap_or(0)],
            })
            .collect(),
    }
    .section(
        &format!(
            "Key epochs: generated {}, destroyed {}",
            k.generated, k.destroyed
        ),
        &format!(
            "Each escrow key has a retention end (destroy_after). A destruction up to {} hours \
             after it is on time; later is late; before it is early (an operator's forced \
             destruction).",
            k.grace_hours
        ),
        "",
        &epochs,
        &mut out,
    );
    if let Some(detail) = &report.detail {
        out.push_str(
            "<section aria-labelledby=\"detail-h\"><h2 id=\"detail-h\">Per warrant (detail form)</h2>\
             <table class=\"warrants\"><caption>Every warrant in the period</caption><thead><tr>\
             <th scope=\"col\">warrant id</th><th scope=\"col\">agencies</th>\
             <th scope=\"col\" class=\"n\">opened</th><th scope=\"col\" class=\"n\">denied</th>\
             <th scope=\"col\" class=\"n\">refused</th><th scope=\"col\">urgent</th>\
             <th scope=\"col\">revoked</th><th scope=\"col\">first – last seen</th></tr></thead><tbody>",
        );
        for w in &detail.warrants {
            let agencies: Vec<String> = w.agencies.iter().map(|a| escape(a)).collect();
            let urgent = match (w.urgent, w.urgent_seconds) {
                (Some(s), Some(secs)) => format!("{}, {}", urgent_label(s), human_duration(secs)),
                _ => "no".into(),
            };
            let _ = write!(
                out,
                "<tr data-warrant=\"{id}\"><th scope=\"row\">{id}</th><td>{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"t\">{} –<br>{}</td></tr>",
                agencies.join("<br>"),
                w.opened,
                w.denied,
                w.refused,
                urgent,
                if w.revoked { "yes" } else { "no" },
                escape(&w.first_seen),
                escape(&w.last_seen),
                id = escape(&w.id),
            );
        }
        out.push_str(
            "</tbody></table><table class=\"claimed-rows\"><caption>Refused before the warrant's \
             signatures met the policy: the ids are only what each request claimed, and are \
             counted in no warrant's row</caption><thead><tr><th scope=\"col\">time</th>\
             <th scope=\"col\">agency</th><th scope=\"col\">claimed id</th>\
             <th scope=\"col\">code</th></tr></thead><tbody>",
        );
        for c in &detail.claimed {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.time),
                escape(&c.agency),
                c.claimed_id
                    .as_deref()
                    .map_or_else(|| "(none)".into(), escape),
                escape(&c.code),
            );
        }
        out.push_str(
            "</tbody></table><table class=\"revocation-rows\"><caption>Revocations</caption><thead><tr>\
             <th scope=\"col\">time</th><th scope=\"col\">warrant id</th><th scope=\"col\">by</th>\
             <th scope=\"col\">reason</th></tr></thead><tbody>",
        );
        for r in &detail.revocations {
            let _ = write!(
                out,
                "<tr><td>{}</td><th scope=\"row\">{}</th><td>{}</td><td>{}</td></tr>",
                escape(&r.time),
                escape(&r.warrant_id),
                r.by,
                escape(&r.reason)
            );
        }
        out.push_str("</tbody></table></section>");
    }

    let v = &report.verification;
    let consistent = if v.consistent_with.is_empty() {
        "none given".to_owned()
    } else {
        v.consistent_with
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = write!(
        out,
        "<section aria-labelledby=\"verification-h\" data-verification=\"ok\">\
         <h2 id=\"verification-h\">Verification</h2><p class=\"intro\">Every figure above is a \
         count of log entries that were checked, before this page was written, against the \
         checkpoint below: signed by the log's key, and hashing to its root.</p>\
         <dl class=\"facts\"><dt>origin</dt><dd>{origin}</dd><dt>size</dt><dd data-size=\"{size}\">{size}</dd>\
         <dt>root hash</dt><dd><code>{root}</code></dd>\
         <dt>consistent with earlier checkpoints of sizes</dt><dd>{consistent}</dd>\
         <dt>witness cosignatures</dt><dd data-witnesses=\"{count}\">{witnesses}</dd>\
         <dt>witness quorum as of</dt><dd>{witnessed_as_of}</dd>\
         <dt>tied to more than its signature by</dt><dd data-anchored-by=\"{anchors}\">{anchored_by}</dd></dl>\
         <pre aria-label=\"the signed checkpoint\">{checkpoint}</pre></section>",
        size = v.size,
        root = escape(&v.root),
        checkpoint = escape(&v.checkpoint),
        count = v.witnesses.len(),
        anchors = v.anchored_by.join(" "),
        anchored_by = if v.anchored_by.is_empty() {
            "nothing (the log's own signature alone)".to_owned()
        } else {
            v.anchored_by
                .iter()
                .map(|a| match *a {
                    "fetch" => "its newest checkpoint, read from the log (--url): complete then",
                    "checkpoint" => {
                        "extending a checkpoint the reader held (--checkpoint): not cut back below it"
                    }
                    "previous" => "extending an earlier export (--previous): not cut back below it",
                    "witnesses" => "the witness policy's quorum (--policy), at the times it cosigned",
                    other => other,
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
        witnessed_as_of = v.witnessed_as_of.as_deref().map_or_else(
            || "not known (no witness policy, or its quorum asks for none)".to_owned(),
            escape
        ),
        witnesses = if v.witnesses.is_empty() {
            "none (no witness policy was given, or its quorum asks for none)".to_owned()
        } else {
            format!(
                "verified under the witness policy, which they meet: {}",
                escape(&v.witnesses.join(", "))
            )
        },
    );
    let _ = writeln!(
        out,
        "</main><footer>Made by <code>lavd audit report</code> (JSON schema <code>{SCHEMA}</code>) \
         from a log verified as <code>lavd audit verify</code> does. How each figure is derived: \
         docs/audit.md, \"Reports\". As of {}{}.</footer></body></html>",
        escape(report.period.as_of.as_deref().unwrap_or("—")),
        match (&report.period.observed, report.period.later_leaf) {
            (_, true) => " (the end of the period: a verified entry after it shows the log held \
                           nothing more before it)"
                .to_owned(),
            (Some(seen), false) if report.period.observed_by == Some("stated") => format!(
                " (stated by whoever made this report, not verified: the log held nothing more \
                 at {})",
                escape(seen)
            ),
            (Some(seen), false) => {
                format!(" (the server reported no entries past its checkpoint at {})", escape(seen))
            }
            (None, false) => {
                " (its newest entry: nothing shows the log held nothing more after it)".to_owned()
            }
        }
    );
    out
}

//! The oversight report from a real `lavd dev` log (issue 15): a scripted mix
//! of opened, denied and refused unwraps, three urgent warrants (replaced,
//! lapsed, pending), a revocation and three destroyed keys (on time, late,
//! forced), driven with the real CLI and curl over mutual TLS. Then:
//! - `lavd audit report` over the API and from an export give the same
//!   figures, and they equal counts this test computes itself from the
//!   export's leaves (parsed here as plain JSON, not with lavd's types);
//! - headless Chromium renders the page: a screenshot is taken, and the
//!   numbers of every chart, read back from the rendered DOM, equal the JSON;
//! - a tampered export produces no report and exits with the verifier's
//!   code, exactly as `lavd audit verify` does;
//! - a signature line appended to the checkpoint by whoever handed over the
//!   export is not shown as one: only the lines that verified are.
//!
//! Chromium is required (`.ci/setup` installs Debian's `chromium`): without
//! it the test fails, it does not skip.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use softhsm_tests::dev::{chromium, stop, Dev};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const AGENCY: &str = "spiffe://agency.example/lea";
const ALICE: &str = "acct:alice@example.com";
/// A warrant id an attacker chose: the detail page must show it as text.
const HOSTILE_ID: &str = "<script>alert(\"OP-2026-0002\")</script>";

/// The demo's clients and files, on top of the shared `lavd dev` harness.
trait DevExt {
    fn pki(&self, name: &str) -> String;
    fn config(&self) -> String;
    fn curl(&self, who: &str, path: &str, body: Option<&Path>) -> (u16, Value);
}

impl DevExt for Dev {
    fn pki(&self, name: &str) -> String {
        self.dir.join("pki").join(name).to_str().unwrap().to_owned()
    }

    fn config(&self) -> String {
        self.dir.join("lavd.toml").to_str().unwrap().to_owned()
    }

    /// `curl` as one of the demo's clients; the status and the body.
    fn curl(&self, who: &str, path: &str, body: Option<&Path>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--max-time", "60", "-w", "\n%{http_code}", "--cacert"])
            .arg(self.pki("ca.pem"))
            .arg("--cert")
            .arg(self.pki(&format!("{who}.pem")))
            .arg("--key")
            .arg(self.pki(&format!("{who}.key")));
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary"])
                .arg(format!("@{}", body.display()));
        }
        let out = cmd.arg(format!("{}{path}", self.url())).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, status) = text.rsplit_once('\n').unwrap();
        (
            status.parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }
}

fn lavd(args: &[&str]) -> Output {
    Command::new(softhsm_tests::lavd_binary())
        .args(args)
        .env("LAVD_LOG", "warn")
        .output()
        .unwrap()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0).unwrap().format(&Rfc3339).unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

/// The times every warrant of the run shares, so that an urgent warrant and
/// its fully signed replacement have the same claims but `emergency`.
struct Times {
    window_from: String,
    window_to: String,
    expires: String,
}

struct Script<'a> {
    dev: &'a Dev,
    work: &'a Path,
    times: Times,
    jwks: PathBuf,
    kid: String,
    sealed: u32,
}

impl Script<'_> {
    /// A fresh envelope to `target`, sealed with `lavd seal`.
    fn envelope(&mut self, target: &str) -> Value {
        self.sealed += 1;
        let out = lavd(&[
            "seal",
            "--jwks",
            self.jwks.to_str().unwrap(),
            "--kid",
            &self.kid,
            "--provider",
            "spiffe://provider.example/messaging",
            "--target",
            target,
            "--time",
            &rfc3339(now()),
            "--ref",
            &format!("msg-{}", self.sealed),
            "--dek-hex",
            "00112233445566778899aabbccddeeff",
        ]);
        serde_json::from_str(&softhsm_tests::assert_ok(&out)).unwrap()
    }

    /// A warrant for the agency and Alice, signed by `signers`.
    fn warrant(
        &self,
        id: &str,
        not_before: OffsetDateTime,
        max_unwraps: u32,
        emergency: bool,
        signers: &[&str],
    ) -> Value {
        // Ids may hold anything (see the hostile one below): number the files.
        let n = std::fs::read_dir(self.work).unwrap().count();
        let file = self.work.join(format!("warrant-{n}.json"));
        let file = file.to_str().unwrap();
        let recipient = self.dev.dir.join("agency-recipient.pub.jwk");
        let max = max_unwraps.to_string();
        let nb = rfc3339(not_before);
        let mut args = vec![
            "warrant",
            "new",
            "--id",
            id,
            "--legal-basis",
            "Investigatory Powers Act 2016 s.19",
            "--agency",
            AGENCY,
            "--recipient",
            recipient.to_str().unwrap(),
            "--target",
            ALICE,
            "--window-from",
            &self.times.window_from,
            "--window-to",
            &self.times.window_to,
            "--not-before",
            &nb,
            "--expires",
            &self.times.expires,
            "--max-unwraps",
            &max,
            "--out",
            file,
        ];
        if emergency {
            args.push("--emergency");
        }
        softhsm_tests::assert_ok(&lavd(&args));
        for signer in signers {
            let key = self.dev.dir.join(format!("authorities/{signer}.jwk"));
            softhsm_tests::assert_ok(&lavd(&[
                "warrant",
                "sign",
                "--key",
                key.to_str().unwrap(),
                "--in",
                file,
                "--out",
                file,
            ]));
        }
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
    }

    /// `POST /v1/unwrap` as the agency.
    fn unwrap(&self, warrant: &Value, envelopes: Vec<Value>) -> (u16, Value) {
        let request = self.work.join("request.json");
        std::fs::write(
            &request,
            json!({"warrant": warrant, "envelopes": envelopes}).to_string(),
        )
        .unwrap();
        self.dev.curl("agency", "/v1/unwrap", Some(&request))
    }

    /// Unwraps and returns each envelope's outcome (`ok` or the denial reason).
    fn outcomes(&self, warrant: &Value, envelopes: Vec<Value>) -> Vec<String> {
        let (status, reply) = self.unwrap(warrant, envelopes);
        assert_eq!(status, 200, "{reply}");
        reply["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| match r["reason"].as_str() {
                Some(code) => code.to_owned(),
                None => r["status"].as_str().unwrap().to_owned(),
            })
            .collect()
    }

    /// Unwraps and expects the whole request refused with `code`.
    fn refused(&self, warrant: &Value, envelopes: Vec<Value>, code: &str) {
        let (status, reply) = self.unwrap(warrant, envelopes);
        assert_eq!(status / 100, 4, "{reply}");
        assert_eq!(reply["error"]["code"], code, "{reply}");
    }
}

/// Counts computed here from the leaves, independently of lavd's report.
#[derive(Debug, Default)]
struct Expected {
    monthly: BTreeMap<(String, String), [u64; 3]>,
    denials: BTreeMap<String, u64>,
    refusals: BTreeMap<String, u64>,
    revocations: BTreeMap<String, u64>,
    revoked: BTreeSet<String>,
    generated: u64,
    destroyed: u64,
    urgent: BTreeMap<String, &'static str>,
    keys: BTreeMap<String, &'static str>,
}

fn leaves(export: &Value) -> Vec<Value> {
    export["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let bytes = URL_SAFE_NO_PAD.decode(e["leaf"].as_str().unwrap()).unwrap();
            serde_json::from_slice(&bytes).unwrap()
        })
        .collect()
}

fn time_of(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().unwrap(), &Rfc3339).unwrap()
}

fn expected(leaves: &[Value]) -> Expected {
    let mut e = Expected::default();
    let mut urgent_ids = BTreeSet::new();
    let mut replaced = BTreeSet::new();
    let mut expired = BTreeSet::new();
    let mut generated = BTreeMap::new();
    for leaf in leaves {
        let s = |k: &str| leaf[k].as_str().unwrap_or_default().to_owned();
        let month = s("time")[..7].to_owned();
        match s("event").as_str() {
            "unwrap" => {
                let cell = e.monthly.entry((month, s("caller"))).or_default();
                if s("outcome") == "opened" {
                    cell[0] += 1;
                } else {
                    cell[1] += 1;
                    *e.denials.entry(s("reason")).or_default() += 1;
                }
                if leaf["emergency"] == true {
                    urgent_ids.insert(s("warrant_id"));
                } else if urgent_ids.contains(&s("warrant_id")) {
                    replaced.insert(s("warrant_id"));
                }
            }
            "warrant_refused" => {
                e.monthly.entry((month, s("caller"))).or_default()[2] += 1;
                *e.refusals.entry(s("reason")).or_default() += 1;
                match s("reason").as_str() {
                    "emergency_expired" => {
                        urgent_ids.insert(s("warrant_id"));
                        expired.insert(s("warrant_id"));
                    }
                    "emergency_superseded" if urgent_ids.contains(&s("warrant_id")) => {
                        replaced.insert(s("warrant_id"));
                    }
                    _ => {}
                }
            }
            "revocation" => {
                *e.revocations.entry(s("by")).or_default() += 1;
                e.revoked.insert(s("warrant_id"));
            }
            "key_generated" => {
                e.generated += 1;
                generated.insert(s("kid"), time_of(&leaf["destroy_after"]));
            }
            "key_destroyed" => {
                e.destroyed += 1;
                let due = generated[&s("kid")];
                let status = if leaf["forced"] == true {
                    "early"
                } else if time_of(&leaf["time"]) <= due + time::Duration::days(1) {
                    "on_time"
                } else {
                    "late"
                };
                e.keys.insert(s("kid"), status);
            }
            _ => {}
        }
    }
    for kid in generated.keys() {
        e.keys.entry(kid.clone()).or_insert("retained");
    }
    for id in urgent_ids {
        let status = if replaced.contains(&id) {
            "replaced"
        } else if expired.contains(&id) {
            "lapsed"
        } else {
            "pending"
        };
        e.urgent.insert(id, status);
    }
    e
}

fn count(map: &BTreeMap<String, &'static str>, status: &str) -> u64 {
    map.values().filter(|s| **s == status).count() as u64
}

fn assert_figures(report: &Value, e: &Expected) {
    let monthly: BTreeMap<(String, String), [u64; 3]> = report["monthly"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                (
                    m["month"].as_str().unwrap().to_owned(),
                    m["agency"].as_str().unwrap().to_owned(),
                ),
                [
                    m["opened"].as_u64().unwrap(),
                    m["denied"].as_u64().unwrap(),
                    m["refused"].as_u64().unwrap(),
                ],
            )
        })
        .collect();
    assert_eq!(monthly, e.monthly);
    assert_eq!(report["denials_by_reason"], json!(e.denials));
    assert_eq!(report["refusals_by_code"], json!(e.refusals));
    let t = &report["totals"];
    assert_eq!(t["opened"], e.monthly.values().map(|c| c[0]).sum::<u64>());
    assert_eq!(t["denied"], e.monthly.values().map(|c| c[1]).sum::<u64>());
    assert_eq!(t["refused"], e.monthly.values().map(|c| c[2]).sum::<u64>());
    let r = &report["revocations"];
    assert_eq!(
        r["by_admin"],
        e.revocations.get("admin").copied().unwrap_or(0)
    );
    assert_eq!(
        r["by_authority"],
        e.revocations.get("authority").copied().unwrap_or(0)
    );
    assert_eq!(r["warrants"], e.revoked.len() as u64);
    assert_eq!(t["keys_generated"], e.generated);
    assert_eq!(t["keys_destroyed"], e.destroyed);
    let u = &report["urgent"];
    assert_eq!(u["warrants"], e.urgent.len() as u64);
    for status in ["replaced", "lapsed", "pending"] {
        assert_eq!(u[status], count(&e.urgent, status), "urgent {status}");
    }
    let keys: BTreeMap<String, &str> = report["keys"]["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["kid"].as_str().unwrap().to_owned(),
                k["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        e.keys.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        "key epochs"
    );
}

/// The figures of every chart in a rendered DOM: chart → row key → series →
/// value, read from the `data-*` attributes of the SVG elements.
type Charts = BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>;

fn attr(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = tag[start..].find('"')? + start;
    Some(
        tag[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&"),
    )
}

fn charts(dom: &str) -> Charts {
    let mut charts = Charts::new();
    let mut rest = dom;
    while let Some(at) = rest.find("<svg ") {
        let end = rest[at..].find("</svg>").unwrap() + at;
        let svg = &rest[at..end];
        let open = &svg[..svg.find('>').unwrap()];
        let chart = charts.entry(attr(open, "data-chart").unwrap()).or_default();
        let mut row = String::new();
        for tag in svg.split('<').skip(1) {
            let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
            if tag.starts_with("g ") {
                row = attr(tag, "data-key").unwrap();
                chart.entry(row.clone()).or_default();
            } else if tag.starts_with("rect ") {
                if let (Some(series), Some(value)) =
                    (attr(tag, "data-series"), attr(tag, "data-value"))
                {
                    chart
                        .get_mut(&row)
                        .unwrap()
                        .insert(series, value.parse().unwrap());
                }
            }
        }
        rest = &rest[end..];
    }
    charts
}

/// What each chart must show, from the JSON report.
fn charts_from_json(report: &Value) -> Charts {
    let mut charts = Charts::new();
    let one = |map: &Value, series: &str| -> BTreeMap<String, BTreeMap<String, u64>> {
        map.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    BTreeMap::from([(series.to_owned(), v.as_u64().unwrap())]),
                )
            })
            .collect()
    };
    charts.insert(
        "monthly".into(),
        report["monthly"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    format!(
                        "{} {}",
                        m["month"].as_str().unwrap(),
                        m["agency"].as_str().unwrap()
                    ),
                    ["opened", "denied", "refused"]
                        .iter()
                        .map(|s| ((*s).to_owned(), m[*s].as_u64().unwrap()))
                        .collect(),
                )
            })
            .collect(),
    );
    charts.insert(
        "denials".into(),
        one(&report["denials_by_reason"], "denied"),
    );
    charts.insert(
        "refusals".into(),
        one(&report["refusals_by_code"], "refused"),
    );
    let u = &report["urgent"];
    charts.insert(
        "urgent".into(),
        one(
            &json!({"replaced": u["replaced"], "lapsed": u["lapsed"], "pending": u["pending"]}),
            "warrants",
        ),
    );
    charts.insert(
        "revocations".into(),
        report["revocations"]["monthly"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["month"].as_str().unwrap().to_owned(),
                    ["admin", "authority"]
                        .iter()
                        .map(|s| ((*s).to_owned(), m[*s].as_u64().unwrap()))
                        .collect(),
                )
            })
            .collect(),
    );
    charts.insert("keys".into(), one(&report["keys"]["by_status"], "keys"));
    charts
}

#[test]
fn a_report_from_a_dev_log_matches_the_leaves_and_renders_in_chromium() {
    // Under a umask that lets group write through (002, as many user
    // accounts have), so that the modes checked below are the ones lavd
    // asked for, not the umask's: before, the aggregate report was made
    // 0666 less the umask, group-writable here.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o002));
    // Chromium is part of the test environment: fail, never skip.
    let version = Command::new("chromium").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "chromium is missing: run .ci/setup --tests (it installs Debian's chromium)"
    );

    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let dev = Dev::new(w.join("lavd-dev"));
    // First start: the token, certificates, authorities and this month's key.
    stop(dev.start(&w.join("dev1.log")));

    // The urgent procedure: one executive signature, usable for one hour.
    let mut config = std::fs::read_to_string(dev.config()).unwrap();
    config.push_str(
        "\n[policy.emergency]\nmax_hours = 1\n\n[[policy.emergency.require]]\nrole = \"executive\"\ncount = 1\n",
    );
    std::fs::write(dev.config(), config).unwrap();

    // Key epochs: two past retention (one just, one three days ago), one
    // destroyed early by an operator.
    let t0 = now();
    let day = time::Duration::days(1);
    for (kid, destroy_after) in [
        ("old-on-time", t0 - time::Duration::hours(1)),
        ("old-late", t0 - 3 * day),
        ("spare", t0 + 400 * day),
    ] {
        let (nb, na) = if kid == "spare" {
            (t0 + 40 * day, t0 + 70 * day)
        } else {
            (t0 - 20 * day, t0 - 10 * day)
        };
        softhsm_tests::assert_ok(&lavd(&[
            "keys",
            "generate",
            "--config",
            &dev.config(),
            "--kid",
            kid,
            "--not-before",
            &rfc3339(nb),
            "--not-after",
            &rfc3339(na),
            "--destroy-after",
            &rfc3339(destroy_after),
        ]));
    }
    softhsm_tests::assert_ok(&lavd(&[
        "keys",
        "destroy",
        "--config",
        &dev.config(),
        "--expired",
    ]));
    softhsm_tests::assert_ok(&lavd(&[
        "keys",
        "destroy",
        "--config",
        &dev.config(),
        "--kid",
        "spare",
        "--force",
        "--reason",
        "test: key material suspected exposed",
    ]));

    let child = dev.start(&w.join("dev2.log"));
    let (status, jwks) = dev.curl("provider", "/v1/keys", None);
    assert_eq!(status, 200);
    let jwks_file = w.join("keys.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let kid = format!("{:04}-{:02}", t0.year(), u8::from(t0.month()));
    let mut s = Script {
        dev: &dev,
        work: w,
        times: Times {
            window_from: rfc3339(t0 - day),
            window_to: rfc3339(t0 + day),
            expires: rfc3339(t0 + 7 * day),
        },
        jwks: jwks_file,
        kid,
        sealed: 0,
    };
    let both = ["executive", "judicial"];

    // A double-lock warrant for two envelopes: two opened, one denied for
    // another target, then one denied for its spent budget.
    let w1 = s.warrant(
        "OP-2026-0001",
        t0 - time::Duration::hours(1),
        2,
        false,
        &both,
    );
    let envs = vec![
        s.envelope(ALICE),
        s.envelope(ALICE),
        s.envelope("acct:bob@example.com"),
    ];
    assert_eq!(s.outcomes(&w1, envs), ["ok", "ok", "target_not_in_warrant"]);
    let envs = vec![s.envelope(ALICE)];
    assert_eq!(s.outcomes(&w1, envs), ["budget_exhausted"]);

    // Refused: one signature where the policy needs two, on a warrant whose
    // id is markup.
    let half = s.warrant(
        HOSTILE_ID,
        t0 - time::Duration::hours(1),
        5,
        false,
        &["executive"],
    );
    let envs = vec![s.envelope(ALICE)];
    s.refused(&half, envs, "policy_not_met");

    // Urgent 1: used, then replaced by the fully signed warrant.
    let nb = t0 - time::Duration::minutes(5);
    let u1 = s.warrant("URG-2026-0001", nb, 5, true, &["executive"]);
    let envs = vec![s.envelope(ALICE)];
    assert_eq!(s.outcomes(&u1, envs), ["ok"]);
    let u1_full = s.warrant("URG-2026-0001", nb, 5, false, &both);
    let envs = vec![s.envelope(ALICE)];
    assert_eq!(s.outcomes(&u1_full, envs), ["ok"]);

    // Urgent 2: its hour ends 20 s from now; used, then refused as expired.
    let u2_nb = now() - time::Duration::hours(1) + time::Duration::seconds(20);
    let u2 = s.warrant("URG-2026-0002", u2_nb, 5, true, &["executive"]);
    let envs = vec![s.envelope(ALICE)];
    assert_eq!(s.outcomes(&u2, envs), ["ok"]);
    let lapse = u2_nb + time::Duration::hours(1) + time::Duration::seconds(2);
    while now() < lapse {
        std::thread::sleep(Duration::from_millis(500));
    }
    let envs = vec![s.envelope(ALICE)];
    s.refused(&u2, envs, "emergency_expired");

    // Urgent 3: used, not (yet) replaced.
    let u3 = s.warrant(
        "URG-2026-0003",
        now() - time::Duration::minutes(1),
        5,
        true,
        &["executive"],
    );
    let envs = vec![s.envelope(ALICE)];
    assert_eq!(s.outcomes(&u3, envs), ["ok"]);

    // A revocation by the admin, then the revoked warrant is refused.
    let revoke = w.join("revoke.json");
    std::fs::write(
        &revoke,
        json!({"id": "OP-2026-0001", "reason": "the investigation closed"}).to_string(),
    )
    .unwrap();
    let (status, reply) = dev.curl("admin", "/v1/warrants/revocations", Some(&revoke));
    assert_eq!(status, 200, "{reply}");
    let envs = vec![s.envelope(ALICE)];
    s.refused(&w1, envs, "warrant_revoked");

    // The report over the API, as an auditor.
    let vkey = dev.dir.join("audit.vkey");
    let vkey = vkey.to_str().unwrap();
    let by_url = (w.join("url.html"), w.join("url.json"));
    let before_fetch = now();
    softhsm_tests::assert_ok(&lavd(&[
        "audit",
        "report",
        "--key",
        vkey,
        "--url",
        &dev.url(),
        "--ca",
        &dev.pki("ca.pem"),
        "--cert",
        &dev.pki("auditor.pem"),
        "--client-key",
        &dev.pki("auditor.key"),
        "--out",
        by_url.0.to_str().unwrap(),
        "--json",
        by_url.1.to_str().unwrap(),
    ]));
    stop(child);

    // The same log exported by the operator.
    let export = w.join("export.json");
    softhsm_tests::assert_ok(&lavd(&[
        "audit",
        "export",
        "--config",
        &dev.config(),
        "--out",
        export.to_str().unwrap(),
    ]));
    softhsm_tests::assert_private(&export);
    let (html, json_file) = (w.join("report.html"), w.join("report.json"));
    let report_args = |out: &Path, json_out: &Path, export: &Path| -> Vec<String> {
        [
            "audit",
            "report",
            "--key",
            vkey,
            "--export",
            export.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
            json_out.to_str().unwrap(),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
    };
    // A link where the page goes is replaced, not written through (the
    // report is written through a rename).
    let victim = w.join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, &html).unwrap();
    let args = report_args(&html, &json_file, &export);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    softhsm_tests::assert_ok(&lavd(&args));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(std::fs::symlink_metadata(&html).unwrap().is_file());
    // The aggregate form is for publication: others may read it.
    {
        use std::os::unix::fs::PermissionsExt as _;
        for file in [&html, &json_file] {
            let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{}", file.display());
        }
    }

    let read_json =
        |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let report = read_json(&json_file);
    let mut from_url = read_json(&by_url.1);
    assert_eq!(report["schema"], "lavd.oversight-report/1");
    assert_eq!(report["form"], "aggregate");
    // A live log is judged when it was fetched (it held nothing more
    // then); an export, at its newest leaf, unless the reader says more.
    let observed = time_of(&from_url["period"]["observed"]);
    assert!(observed >= before_fetch, "{observed} < {before_fetch}");
    assert_eq!(from_url["period"]["as_of"], from_url["period"]["observed"]);
    assert_eq!(from_url["period"]["observed_by"], "fetch");
    assert_eq!(report["period"]["observed"], Value::Null);
    assert_eq!(report["period"]["observed_by"], Value::Null);
    // A moment yet to come cannot be stated: it would make keys overdue
    // and urgent warrants lapsed that are neither. Nothing is written.
    let (later_html, later_json) = (w.join("later.html"), w.join("later.json"));
    let mut args = report_args(&later_html, &later_json, &export);
    args.extend(["--as-of".to_owned(), "2100-01-01T00:00:00Z".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stderr = softhsm_tests::assert_fails_with(&lavd(&args), 1, "invalid_period");
    assert!(
        stderr.contains("--as-of 2100-01-01T00:00:00Z is later than now"),
        "{stderr}"
    );
    assert!(!later_html.exists() && !later_json.exists());
    // A file checked against the log's key alone is not shown complete (a
    // copy cut back to an earlier checkpoint would verify the same), and
    // its page says so at the top; the log read over the API is.
    assert_eq!(report["verification"]["anchored_by"], json!([]));
    assert_eq!(from_url["verification"]["anchored_by"], json!(["fetch"]));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("data-anchored=\"false\"><strong>Not shown complete.</strong>"),
        "{page}"
    );
    assert!(!std::fs::read_to_string(&by_url.0)
        .unwrap()
        .contains("data-anchored=\"false\""));
    // A checkpoint the reader held only bounds how far back a copy could
    // be cut: named, and the banner stays.
    let held = w.join("held-checkpoint.txt");
    std::fs::write(
        &held,
        read_json(&export)["checkpoint"]
            .as_str()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let (anchored_html, anchored_json) = (w.join("held.html"), w.join("held.json"));
    let mut args = report_args(&anchored_html, &anchored_json, &export);
    args.extend(["--checkpoint".to_owned(), held.to_str().unwrap().to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    softhsm_tests::assert_ok(&lavd(&args));
    assert_eq!(
        read_json(&anchored_json)["verification"]["anchored_by"],
        json!(["checkpoint"])
    );
    assert!(std::fs::read_to_string(&anchored_html)
        .unwrap()
        .contains("data-anchored=\"false\"><strong>Not shown complete.</strong>"));
    // Over the API or from the export: the same leaves, the same figures.
    from_url["verification"] = report["verification"].clone();
    from_url["period"] = report["period"].clone();
    assert_eq!(from_url, report);

    // The figures equal counts made here from the leaves...
    let export_json = read_json(&export);
    let leaves = leaves(&export_json);
    let newest = leaves.iter().map(|l| time_of(&l["time"])).max().unwrap();
    assert_eq!(time_of(&report["period"]["as_of"]), newest);
    assert_eq!(report["verification"]["size"], leaves.len() as u64);
    assert_eq!(
        report["verification"]["checkpoint"],
        export_json["checkpoint"]
    );
    let e = expected(&leaves);
    assert_figures(&report, &e);
    // ...and what the script did.
    let t = &report["totals"];
    assert_eq!(
        (
            t["opened"].as_u64(),
            t["denied"].as_u64(),
            t["refused"].as_u64()
        ),
        (Some(6), Some(2), Some(3))
    );
    assert_eq!(
        report["denials_by_reason"],
        json!({"budget_exhausted": 1, "target_not_in_warrant": 1})
    );
    assert_eq!(
        report["refusals_by_code"],
        json!({"emergency_expired": 1, "policy_not_met": 1, "warrant_revoked": 1})
    );
    let u = &report["urgent"];
    assert_eq!(
        [
            &u["warrants"],
            &u["replaced"],
            &u["lapsed"],
            &u["pending"],
            &u["opened"]
        ],
        [3, 1, 1, 1, 3]
    );
    assert_eq!(report["revocations"]["by_admin"], 1);
    assert_eq!(
        report["keys"]["by_status"],
        json!({"on_time": 1, "late": 1, "early": 1, "overdue": 0, "retained": 1})
    );
    // The aggregate form names no warrant.
    let page = std::fs::read_to_string(&html).unwrap();
    for id in [
        "OP-2026-0001",
        "OP-2026-0002",
        "URG-2026-000",
        "investigation closed",
        "alert(",
    ] {
        assert!(
            !page.contains(id) && !report.to_string().contains(id),
            "{id}"
        );
    }

    // Chromium: a screenshot, and every chart's numbers read from the DOM.
    let profile = w.join("chromium-profile");
    let shot_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oversight-report");
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("report.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,2800",
        ],
        &html,
        &profile,
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (width, height) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert!(width >= 1200 && height >= 2800, "{width}x{height}");
    std::fs::copy(&html, shot_dir.join("report.html")).unwrap();

    let dom = chromium(&["--dump-dom"], &html, &profile);
    let dom = String::from_utf8(dom.stdout).unwrap();
    assert!(dom.contains("data-form=\"aggregate\""), "{dom}");
    assert!(!dom.contains("<script"), "the page runs no script");
    let rendered = charts(&dom);
    assert_eq!(rendered.len(), 6, "{rendered:?}");
    assert_eq!(rendered, charts_from_json(&report));
    assert!(dom.contains(&format!("data-size=\"{}\"", report["verification"]["size"])));

    // A period: one around the whole log gives the same figures; one after
    // it counts nothing; an empty one is refused before anything is read.
    let period = |from: &str, to: Option<&str>| -> Output {
        let mut args = report_args(&w.join("period.html"), &w.join("period.json"), &export);
        args.extend(["--from".to_owned(), from.to_owned()]);
        if let Some(to) = to {
            args.extend(["--to".to_owned(), to.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lavd(&args)
    };
    softhsm_tests::assert_ok(&period(
        "2000-01-01T00:00:00Z",
        Some("2100-01-01T00:00:00Z"),
    ));
    let mut around = read_json(&w.join("period.json"));
    assert_eq!(around["period"]["from"], "2000-01-01T00:00:00Z");
    around["period"] = report["period"].clone();
    assert_eq!(around, report);
    softhsm_tests::assert_ok(&period("2100-01-01T00:00:00Z", None));
    let after = read_json(&w.join("period.json"));
    assert_eq!(after["period"]["leaves"], 0);
    assert_eq!(
        after["totals"],
        json!({"opened": 0, "denied": 0, "opened_not_released": 0, "refused": 0,
               "revocations": 0, "urgent_warrants": 0, "keys_generated": 0,
               "keys_destroyed": 0})
    );
    let empty = period("2026-01-02T00:00:00Z", Some("2026-01-01T00:00:00Z"));
    let stderr = softhsm_tests::assert_fails_with(&empty, 1, "invalid_period");
    assert!(stderr.contains("--from must be before --to"), "{stderr}");

    // The detail form, from the same export.
    let detail = w.join("detail.html");
    let mut args = report_args(&detail, &w.join("detail.json"), &export);
    args.push("--detail".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    softhsm_tests::assert_ok(&lavd(&args));
    // Not for publication: its owner's alone, as the export.
    softhsm_tests::assert_private(&detail);
    softhsm_tests::assert_private(&w.join("detail.json"));
    let detail_json = read_json(&w.join("detail.json"));
    assert_eq!(detail_json["form"], "detail");
    let rows: BTreeMap<&str, &Value> = detail_json["detail"]["warrants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(rows["URG-2026-0001"]["urgent"], "replaced");
    assert_eq!(rows["URG-2026-0002"]["urgent"], "lapsed");
    assert_eq!(rows["URG-2026-0003"]["urgent"], "pending");
    assert_eq!(rows["OP-2026-0001"]["revoked"], true);
    // The one-signature warrant never met the policy: its id is listed as
    // claimed, apart from the warrants' rows.
    assert!(!rows.contains_key(HOSTILE_ID), "{detail_json}");
    assert_eq!(
        detail_json["detail"]["claimed"],
        json!([{
            "time": detail_json["detail"]["claimed"][0]["time"],
            "agency": AGENCY,
            "claimed_id": HOSTILE_ID,
            "code": "policy_not_met"
        }]),
        "{detail_json}"
    );
    // Rendered, the hostile id is text, not an element.
    let dom = chromium(&["--dump-dom"], &detail, &profile);
    let dom = String::from_utf8(dom.stdout).unwrap();
    assert!(dom.contains("data-form=\"detail\""));
    std::fs::copy(&detail, shot_dir.join("detail.html")).unwrap();
    assert!(!dom.contains("<script"), "{dom}");
    assert!(
        dom.contains("&lt;script&gt;alert(\"OP-2026-0002\")&lt;/script&gt;"),
        "{dom}"
    );

    // A tampered log: no report, and the verifier's own code.
    let mut tampered = export_json.clone();
    let i = leaves.iter().position(|l| l["event"] == "unwrap").unwrap();
    let text = serde_json::to_string(&leaves[i]).unwrap();
    let forged = text.replace(AGENCY, "spiffe://agency.example/lex");
    assert_ne!(forged, text);
    tampered["entries"][i]["leaf"] = Value::String(URL_SAFE_NO_PAD.encode(forged));
    let tampered_file = w.join("tampered.json");
    std::fs::write(&tampered_file, tampered.to_string()).unwrap();
    let (bad_html, bad_json) = (w.join("bad.html"), w.join("bad.json"));
    let args = report_args(&bad_html, &bad_json, &tampered_file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = lavd(&args);
    let verify = lavd(&[
        "audit",
        "verify",
        "--key",
        vkey,
        "--export",
        tampered_file.to_str().unwrap(),
    ]);
    let stderr = softhsm_tests::assert_fails_with(&refused, 1, "root_mismatch");
    softhsm_tests::assert_fails_with(&verify, 1, "root_mismatch");
    assert_eq!(stderr, String::from_utf8_lossy(&verify.stderr));
    assert!(
        !bad_html.exists() && !bad_json.exists(),
        "a report was written"
    );

    // A line anyone appended to the checkpoint, claiming a witness: the log
    // still verifies (lines by unknown keys are ignored, as C2SP requires),
    // but the page and the JSON show only the lines that were checked.
    let mut dressed = export_json.clone();
    let fake = format!(
        "\u{2014} witness.example.org {}\n",
        base64::engine::general_purpose::STANDARD.encode([7u8; 76])
    );
    dressed["checkpoint"] = Value::String(format!(
        "{}{fake}",
        export_json["checkpoint"].as_str().unwrap()
    ));
    let dressed_file = w.join("dressed.json");
    std::fs::write(&dressed_file, dressed.to_string()).unwrap();
    let (dressed_html, dressed_json) = (w.join("dressed.html"), w.join("dressed-report.json"));
    let args = report_args(&dressed_html, &dressed_json, &dressed_file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    softhsm_tests::assert_ok(&lavd(&args));
    let shown = read_json(&dressed_json);
    assert_eq!(
        shown["verification"]["checkpoint"],
        export_json["checkpoint"]
    );
    let page = std::fs::read_to_string(&dressed_html).unwrap();
    assert!(!page.contains("witness.example.org"), "{page}");
}

//! A witnessed log, with real processes: `lavd serve` with a `lavd witness
//! serve` and the independent Python witness (`interop/witness.py`) under a
//! quorum of both, and a third witness (`lavd witness serve`) that does not
//! trust the log's key (it answers 403) and is not in the quorum.
//!
//! - unwraps under `release_after_witness` get a reply whose checkpoint both
//!   quorum witnesses cosigned and that covers their leaves;
//!   `/v1/log/checkpoint` carries both cosignatures and `lavd audit verify
//!   --tiles URL --policy FILE` accepts the log;
//! - the 403 witness is logged (ERROR naming it, metric) and holds up
//!   nothing;
//! - with one quorum witness stopped (SIGSTOP: its requests time out), an
//!   unwrap is 503 `witness_unavailable`, nothing is released, and its
//!   leaf is logged as opened with the budget spent; once the witness runs
//!   again the service resumes;
//! - a restarted daemon whose store lacks a witness's cosignatures (it sends
//!   `old 0`) learns the witness's size from its 409 and recovers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use softhsm_tests::eventually;
use std::time::Duration;

use lavd::audit::witness::Policy;
use softhsm_tests::assert_ok;
use softhsm_tests::server::{path_str, serve_config, Daemon};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::witness::{PyWitness, Witness};
use softhsm_tests::witnessed::{Entry, LogWithWitnesses};
use time::OffsetDateTime;

/// How long [`eventually`] waits here.
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long an unwrap waits for the quorum. Long enough that two local
/// witnesses answer well within it on a loaded 2-core machine (they answer
/// in milliseconds), short enough to keep the timeout case quick.
const WITNESS_TIMEOUT_SECS: u64 = 8;

#[test]
fn unwraps_wait_for_the_witness_quorum_and_the_log_verifies_under_the_policy() {
    let log = LogWithWitnesses::new(&serve_config(&vault::roles_toml()));
    // A `lavd witness serve` and the independent Python witness make the
    // quorum.
    let w1 = log.witness("w1.example");
    let w2 = PyWitness::start(
        "w2.example",
        &[7; 32],
        &log.t.path("py-witness.json"),
        &log.origin,
        &log.vkey,
    );
    // Trusts another key for this origin: every submission is 403.
    let other = lavd::audit::note::verifier_key(&log.origin, &[5; 32]).unwrap();
    let w3 = Witness::start("w3.example", &log.origin, &other, "");
    let policy_file = log.configure(
        &[
            Entry::from(&w1),
            Entry::python(&w2, "w2.example"),
            Entry::from(&w3),
        ],
        &format!(
            "witness A {}\nwitness B {}\nwitness C {}\ngroup both all A B\nquorum both\n",
            w1.vkey, w2.vkey, w3.vkey
        ),
        &format!(
            "release_after_witness = true\nwitness_timeout_secs = {WITNESS_TIMEOUT_SECS}\n\
             witness_request_timeout_secs = 2"
        ),
    );
    let policy = Policy::parse(&std::fs::read(&policy_file).unwrap()).unwrap();
    let (t, pki, log_vkey, escrow) = (&log.t, &log.pki, log.vkey.clone(), log.escrow.clone());
    // Keys to destroy while an unwrap waits (4c), one a try.
    let doomed_keys: Vec<(String, lavd::jwk::P256PublicKey)> = (0..3)
        .map(|i| {
            let kid = format!("E-DOOMED-{i}");
            let key = vault::generate_escrow_key(t, &kid);
            (kid, key)
        })
        .collect();

    let mut daemon = Daemon::start(t);
    daemon.wait_readyz(200);
    let parties = Parties::new(pki);
    let c = parties.clients(pki, daemon.api);
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-WITNESSED", recipient.public(), 100));
    let seal = |n: u32| {
        vault::seal(
            &escrow,
            "E-1",
            TARGET,
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            &format!("m{n}"),
            &[n as u8; 16],
        )
    };
    let unwrap_envelope = |envelope: &serde_json::Value| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
        )
    };
    let unwrap = |n: u32| unwrap_envelope(&seal(n));

    // 1. Released only with a checkpoint the quorum cosigned, covering the
    //    request's leaves.
    for n in 0..3 {
        let r = unwrap(n);
        assert_eq!(r.status, 200, "{}", r.text());
        let reply = r.json();
        assert_eq!(vault::statuses(&reply), ["ok"]);
        let note = reply["audit"]["checkpoint"].as_str().unwrap();
        let (checkpoint, valid) = policy
            .verify(note)
            .expect("the reply's checkpoint has the quorum");
        let names: Vec<&str> = valid.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["A", "B"]);
        let end = reply["audit"]["first_index"].as_u64().unwrap()
            + reply["audit"]["count"].as_u64().unwrap();
        assert!(checkpoint.size >= end, "{} < {end}", checkpoint.size);
    }

    // 2. The served checkpoints carry both cosignatures.
    for path in ["/v1/log/checkpoint", "/v1/audit/checkpoint"] {
        let r = c.auditor.get(path);
        assert_eq!(r.status, 200, "{}", r.text());
        let note = if path.contains("/log/") {
            r.text()
        } else {
            r.json()["checkpoint"].as_str().unwrap().to_string()
        };
        let (_, valid) = policy
            .verify(&note)
            .unwrap_or_else(|e| panic!("{path}: {e}\n{note}"));
        let names: Vec<&str> = valid.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["A", "B"], "{path}");
    }
    // The real verifier, from the tiles, under the policy.
    let (ca, cert, client_key) = pki.cli_files(&parties.auditor, "auditor");
    let tiles = format!("https://{}/v1/log", daemon.api);
    let verify = |policy: &str| {
        t.lavd(&[
            "audit",
            "verify",
            "--key",
            &log_vkey,
            "--tiles",
            &tiles,
            "--policy",
            policy,
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--client-key",
            &client_key,
        ])
    };
    assert_ok(&verify(&path_str(&policy_file)));
    // The oversight report made under the policy names the witnesses whose
    // cosignatures it verified; without a policy it names none.
    let report = |policy: Option<&str>| {
        let json = t.path("report.json");
        let mut args = vec![
            "audit",
            "report",
            "--key",
            &log_vkey,
            "--tiles",
            &tiles,
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--client-key",
            &client_key,
        ];
        let out_html = path_str(&t.path("report.html"));
        let out_json = path_str(&json);
        args.extend(["--out", &out_html, "--json", &out_json]);
        if let Some(p) = policy {
            args.extend(["--policy", p]);
        }
        assert_ok(&t.lavd(&args));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let html = std::fs::read_to_string(t.path("report.html")).unwrap();
        // Signature lines shown: only those that were verified.
        let lines = v["verification"]["checkpoint"]
            .as_str()
            .unwrap()
            .matches("\u{2014} ")
            .count();
        (v["verification"].clone(), html, lines)
    };
    let (verification, html, lines) = report(Some(&path_str(&policy_file)));
    assert_eq!(verification["witnesses"], serde_json::json!(["A", "B"]));
    assert!(html.contains("data-witnesses=\"2\""), "{html}");
    assert_eq!(lines, 3, "the log's line and the two witnesses'");
    // The quorum's time: the witnesses here cosigned within the test.
    let as_of = verification["witnessed_as_of"].as_str().unwrap();
    let as_of =
        time::OffsetDateTime::parse(as_of, &time::format_description::well_known::Rfc3339).unwrap();
    let age = time::OffsetDateTime::now_utc() - as_of;
    assert!(
        age > -time::Duration::seconds(5) && age < time::Duration::minutes(10),
        "{verification}"
    );
    assert!(html.contains("witness quorum as of"), "{html}");
    let (verification, html, lines) = report(None);
    assert_eq!(verification["witnesses"], serde_json::json!([]));
    assert_eq!(verification["witnessed_as_of"], serde_json::Value::Null);
    assert!(html.contains("data-witnesses=\"0\""), "{html}");
    assert_eq!(lines, 1, "the log's line alone");
    // A policy that also needs the 403 witness rejects it.
    let strict = log.t.path("strict.policy");
    std::fs::write(
        &strict,
        format!(
            "log {log_vkey}\nwitness A {}\nwitness B {}\nwitness C {}\ngroup all3 all A B C\nquorum all3\n",
            w1.vkey, w2.vkey, w3.vkey
        ),
    )
    .unwrap();
    let out = verify(&path_str(&strict));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("quorum_not_met"),
        "{out:?}"
    );

    // 3. The 403 witness is logged by name and counted; it held up nothing.
    assert!(
        daemon.metric("lavd_witness_requests_total{outcome=\"forbidden\",witness=\"w3.example\"}")
            >= 1.0
    );
    assert!(
        daemon.metric("lavd_witness_requests_total{outcome=\"cosigned\",witness=\"w1.example\"}")
            >= 1.0
    );
    let stderr = daemon.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("w3.example") && l.contains("403")),
        "{stderr}"
    );

    // 4. One quorum witness stopped: 503 witness_unavailable, no key, the
    //    leaf logged as opened and the budget spent.
    let leaves = || {
        let r = c.auditor.get("/v1/audit/entries?start=0");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["entries"].as_array().unwrap().clone()
    };
    let before = leaves().len() as u64;
    w1.daemon.signal(rustix::process::Signal::STOP);
    let withheld = seal(10);
    let r = unwrap_envelope(&withheld);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "witness_unavailable");
    assert!(r.json().get("results").is_none());
    let after = leaves();
    assert_eq!(after.len() as u64, before + 1);
    let bytes = lavd::codec::b64_decode(after.last().unwrap()["leaf"].as_str().unwrap()).unwrap();
    let leaf: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(leaf["event"], "unwrap", "{leaf}");
    assert_eq!(leaf["outcome"], "opened", "{leaf}");
    assert_eq!(leaf["envelope_digest"], vault::envelope_digest(&withheld));
    // The served checkpoint (the quorum's newest) is now older than the log:
    // a report read from the daemon does not take the time of the read as
    // a moment the log held nothing more (`period.observed` stays null).
    let stale = t.path("stale.json");
    let api = format!("https://{}", daemon.api);
    assert_ok(&t.lavd(&[
        "audit",
        "report",
        "--key",
        &log_vkey,
        "--url",
        &api,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--client-key",
        &client_key,
        "--out",
        &path_str(&t.path("stale.html")),
        "--json",
        &path_str(&stale),
    ]));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&stale).unwrap()).unwrap();
    assert_eq!(v["period"]["observed"], serde_json::Value::Null, "{v}");
    let served = v["verification"]["size"].as_u64().unwrap();
    assert!(served < after.len() as u64);
    // No tile beyond the checkpoint served, though the log signed one:
    // the leaves past it are published only with a checkpoint covering
    // them. Before, the log's own newest checkpoint bounded the tiles.
    let bundle = |width: u64| {
        c.auditor
            .get(&format!("/v1/log/tile/entries/000.p/{width}"))
    };
    let r = bundle(after.len() as u64);
    let message = r.assert_error(404, "not_found");
    assert!(
        message.contains(&format!("the newest checkpoint served has {served}")),
        "{message}"
    );
    assert_eq!(bundle(served).status, 200);

    // Steps 4b-4e: an unwrap of `body` held at its witness wait (w1
    // stopped: its requests time out) until `during` has run, once the
    // request's `count` leaves are durable; then w1 runs again. The reply
    // and the request's first leaf.
    let held_at_the_wait = |body: &serde_json::Value, count: usize, during: &dyn Fn()| {
        w1.daemon.signal(rustix::process::Signal::STOP);
        let size_before = leaves().len();
        let (r, leaf) = std::thread::scope(|s| {
            let waiting = s.spawn(|| vault::post(&c.agency, "/v1/unwrap", body));
            eventually("the waiting unwrap's leaves", WAIT, || {
                leaves().len() >= size_before + count
            });
            let leaf = leaves()[size_before]["leaf"].as_str().unwrap().to_string();
            during();
            w1.daemon.signal(rustix::process::Signal::CONT);
            (waiting.join().unwrap(), leaf)
        });
        let leaf: serde_json::Value =
            serde_json::from_slice(&lavd::codec::b64_decode(&leaf).unwrap()).unwrap();
        (r, leaf)
    };
    // A try's reply, or `None` when the try showed nothing and is made
    // again: its wait timed out instead (503 `witness_unavailable`: w1's
    // submitter backs off up to 5 s), or, where a deadline was to pass
    // during the wait (`too_slow`, the reason its leaf then says), the
    // machine was too slow to commit before it. Otherwise the leaf says
    // opened.
    let shown =
        |r: softhsm_tests::server::Response, leaf: &serde_json::Value, too_slow: Option<&str>| {
            if let Some(reason) = too_slow.filter(|_| leaf["outcome"] != "opened") {
                assert_eq!(leaf["reason"], reason, "{leaf}");
                return None;
            }
            assert_eq!(leaf["outcome"], "opened", "{leaf}");
            if r.status == 503 {
                r.assert_error(503, "witness_unavailable");
                return None;
            }
            Some(r)
        };
    // Sleeps until `at` (by this machine's clock, the daemon's too) is past
    // by 1.5 s.
    let past = |at: OffsetDateTime| {
        let left = at + time::Duration::milliseconds(1500) - OffsetDateTime::now_utc();
        if left.is_positive() {
            std::thread::sleep(left.unsigned_abs());
        }
    };

    // 4b. A revocation while an unwrap waits for the quorum: once the
    //     quorum comes, nothing is released (403 `warrant_revoked`) and its
    //     leaf says opened.
    (0..3u32)
        .find_map(|attempt| {
            let id = format!("W-REVOKED-WHILE-WITNESSED-{attempt}");
            let revocable = vault::double_lock(&vault::claims(&id, recipient.public(), 10));
            let body = serde_json::json!({"warrant": revocable, "envelopes": [seal(20 + attempt)]});
            let (r, leaf) = held_at_the_wait(&body, 1, &|| {
                let revoked = vault::post(
                    &c.admin,
                    "/v1/warrants/revocations",
                    &serde_json::json!({"id": id, "reason": "quashed while witnessed"}),
                );
                assert_eq!(revoked.status, 200, "{}", revoked.text());
            });
            assert_eq!(leaf["warrant_id"], id, "{leaf}");
            shown(r, &leaf, None)
        })
        .expect("every try's wait for the quorum timed out")
        .assert_error(403, "warrant_revoked");

    // 4c. A key destroyed (`lavd keys destroy --force`, committed and
    //     reported done) while an unwrap of it waits for the quorum: once
    //     the quorum comes, its envelope is not released (`key_destroyed`,
    //     its leaf saying opened); the other key's in the batch is.
    let r = doomed_keys
        .iter()
        .enumerate()
        .find_map(|(attempt, (kid, key))| {
            let id = format!("W-DESTROYED-WHILE-WITNESSED-{attempt}");
            let doomed_warrant = vault::double_lock(&vault::claims(&id, recipient.public(), 10));
            let doomed = vault::seal(
                key,
                kid,
                TARGET,
                OffsetDateTime::now_utc() - time::Duration::hours(1),
                &format!("doomed{attempt}"),
                &[0xd0; 16],
            );
            let body = serde_json::json!({
                "warrant": doomed_warrant,
                "envelopes": [doomed, seal(30 + attempt as u32)],
            });
            let (r, leaf) = held_at_the_wait(&body, 2, &|| {
                assert_ok(&t.lavd_with_config(&[
                    "keys",
                    "destroy",
                    "--kid",
                    kid,
                    "--force",
                    "--reason",
                    "seized while witnessed",
                ]));
            });
            assert_eq!(leaf["kid"], kid.as_str(), "{leaf}");
            shown(r, &leaf, None)
        })
        .expect("every try's wait for the quorum timed out");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["key_destroyed", "ok"]);

    // 4d. A key whose retention ends (its `destroy_after` passes, nobody
    //     destroying it) while an unwrap of it waits for the quorum: once
    //     the quorum comes, its envelope is not released either.
    let r = (0..3u32)
        .find_map(|attempt| {
            let kid = format!("E-RETAINED-{attempt}");
            let now = OffsetDateTime::now_utc();
            let at = |s: i64| lavd::codec::format_time(now + time::Duration::seconds(s));
            let destroy_after = lavd::codec::parse_time(&at(4)).unwrap();
            let printed = assert_ok(&softhsm_tests::generate_key_for(
                t,
                &kid,
                [&at(-3600), &at(3), &at(4)],
            ));
            let key = lavd::jwk::P256PublicKey::from_jwk(
                &lavd::jwk::Jwk::from_json(printed.as_bytes()).unwrap(),
            )
            .unwrap();
            let id = format!("W-RETENTION-WHILE-WITNESSED-{attempt}");
            let retained_warrant = vault::double_lock(&vault::claims(&id, recipient.public(), 10));
            let retained = vault::seal(
                &key,
                &kid,
                TARGET,
                now - time::Duration::minutes(1),
                &format!("retained{attempt}"),
                &[0xd1; 16],
            );
            let body = serde_json::json!({
                "warrant": retained_warrant,
                "envelopes": [retained, seal(40 + attempt)],
            });
            let (r, leaf) = held_at_the_wait(&body, 2, &|| past(destroy_after));
            assert_eq!(leaf["kid"], kid.as_str(), "{leaf}");
            shown(r, &leaf, Some("key_destroyed"))
        })
        .expect("every try was too slow or its wait for the quorum timed out");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["key_destroyed", "ok"]);

    // 4e. A warrant that expires while its unwrap waits for the quorum:
    //     once the quorum comes, nothing is released (403
    //     `warrant_expired`), its leaf saying opened.
    (0..3u32)
        .find_map(|attempt| {
            let id = format!("W-EXPIRES-WHILE-WITNESSED-{attempt}");
            let mut lapsing = vault::claims(&id, recipient.public(), 10);
            let expires_text =
                lavd::codec::format_time(OffsetDateTime::now_utc() + time::Duration::seconds(4));
            let expires = lavd::codec::parse_time(&expires_text).unwrap();
            lapsing["expires"] = expires_text.into();
            let lapsing = vault::double_lock(&lapsing);
            let body = serde_json::json!({"warrant": lapsing, "envelopes": [seal(50 + attempt)]});
            let (r, leaf) = held_at_the_wait(&body, 1, &|| past(expires));
            assert_eq!(leaf["warrant_id"], id, "{leaf}");
            shown(r, &leaf, Some("warrant_expired"))
        })
        .expect("every try was too slow or its wait for the quorum timed out")
        .assert_error(403, "warrant_expired");

    // 5. The witness runs again: the service resumes.
    w1.daemon.signal(rustix::process::Signal::CONT);
    eventually("w1 to cosign the newest checkpoint", WAIT, || {
        daemon.metric("lavd_witness_cosigned_size{witness=\"w1.example\"}") >= (before + 1) as f64
    });
    let r = unwrap(11);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(policy
        .verify(r.json()["audit"]["checkpoint"].as_str().unwrap())
        .is_ok());

    // 6. A store that lacks w1's cosignatures: the restarted daemon sends
    //    `old 0`, learns w1's size from its 409, and recovers from it.
    daemon.signal(rustix::process::Signal::TERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    // The withheld envelope's unit is spent: 3 + 1 withheld + 1.
    let spent: i64 = db
        .query_row(
            "SELECT spent FROM warrants WHERE id = 'W-WITNESSED'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(spent, 5);
    let removed = db
        .execute(
            "DELETE FROM audit_cosignatures WHERE witness = 'w1.example'",
            [],
        )
        .unwrap();
    assert!(removed > 0);
    drop(db);
    let daemon = Daemon::start(t);
    daemon.wait_readyz(200);
    let c = parties.clients(pki, daemon.api);
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": [seal(12)]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(policy
        .verify(r.json()["audit"]["checkpoint"].as_str().unwrap())
        .is_ok());
    assert!(
        daemon.metric("lavd_witness_requests_total{outcome=\"conflict\",witness=\"w1.example\"}")
            >= 1.0
    );
}

/// A cosigned checkpoint is served only if it carries the log's own valid
/// signature: with the newest signed checkpoint intact and the older one
/// the witness cosigned edited in the store behind lavd's back, the public
/// listener and the auditor get 503 `log_inconsistent`, not the edited
/// note with its cosignature. Before, the cosigned row was served as read.
#[test]
fn a_cosigned_checkpoint_edited_in_the_store_is_not_served() {
    let log = LogWithWitnesses::new(&serve_config(&format!(
        "{}\n[audit.public]\nlisten = \"127.0.0.1:0\"\n",
        vault::roles_toml()
    )));
    let w1 = log.witness("w1.example");
    log.configure(
        &[Entry::from(&w1)],
        &format!("witness A {}\nquorum A\n", w1.vkey),
        "",
    );
    let daemon = Daemon::start(&log.t);
    daemon.wait_readyz(200);
    let c = Parties::new(&log.pki).clients(&log.pki, daemon.api);
    let warrant = vault::double_lock(&vault::claims("W-EDITED", vault::recipient().public(), 10));
    let unwrap = |n: u8| {
        let envelope = vault::seal(
            &log.escrow,
            "E-1",
            TARGET,
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            &format!("e{n}"),
            &[n; 16],
        );
        let r = vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["audit"]["first_index"].as_u64().unwrap() + 1
    };
    let cosigned = unwrap(1);
    eventually("w1 to cosign", WAIT, || {
        daemon.metric("lavd_witness_cosigned_size{witness=\"w1.example\"}") >= cosigned as f64
    });
    // The witness stops; the log signs a newer checkpoint it does not
    // cosign, and that one stays intact.
    w1.daemon.signal(rustix::process::Signal::STOP);
    let newer = unwrap(2);
    let public = softhsm_tests::server::Client::new(
        daemon.public_log.expect("public listener"),
        &log.pki.servers,
        None,
        &[&rustls::version::TLS13],
    );
    let served = public.get("/v1/log/checkpoint");
    assert_eq!(served.status, 200, "{}", served.text());
    assert!(
        served.text().contains("\u{2014} w1.example "),
        "{}",
        served.text()
    );
    let size: u64 = served.text().lines().nth(1).unwrap().parse().unwrap();
    assert!(size < newer, "the served checkpoint is the cosigned one");

    // Its row edited: the log's signature line no longer verifies.
    let db = rusqlite::Connection::open(log.t.path("lavd.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let edited = db
        .execute(
            "UPDATE audit_checkpoints SET note = replace(note, '\u{2014} ' || ?2 || ' ', \
             '\u{2014} ' || ?2 || ' AAAA') WHERE size = ?1",
            rusqlite::params![size as i64, log.origin],
        )
        .unwrap();
    assert_eq!(edited, 1);
    drop(db);
    public
        .get("/v1/log/checkpoint")
        .assert_error(503, "log_inconsistent");
    c.auditor
        .get("/v1/log/checkpoint")
        .assert_error(503, "log_inconsistent");
    w1.daemon.signal(rustix::process::Signal::CONT);
}

/// Two replicas on one PostgreSQL store under `release_after_witness`,
/// where only replica 0 can reach the witness (replica 1 started on a
/// config whose URL for it is a closed port): replica 1 releases only once
/// the cosignature that replica 0's submitter stored covers its leaves, so
/// the wait reads the store, not the replica's own submitter.
#[test]
fn a_replica_releases_on_a_cosignature_another_replica_stored() {
    let log = LogWithWitnesses::on_postgres(&serve_config(&format!(
        "{}[limits]\nrate_limit_per_second = 100000.0\nrate_limit_burst = 100000\n",
        vault::roles_toml()
    )));
    let w1 = log.witness("w1.example");
    let policy_text = format!("witness A {}\nquorum A\n", w1.vkey);
    let audit = "release_after_witness = true\nwitness_timeout_secs = 30";
    let policy_file = log.configure(&[Entry::from(&w1)], &policy_text, audit);
    let policy = Policy::parse(&std::fs::read(&policy_file).unwrap()).unwrap();
    let reaches = Daemon::start_replica(&log.t, "replica-0");
    let mut unreachable = Entry::from(&w1);
    unreachable.url = "http://127.0.0.1:1".into();
    unreachable.ca_pem = None;
    log.configure(&[unreachable], &policy_text, audit);
    let blind = Daemon::start_replica(&log.t, "replica-1");
    for d in [&reaches, &blind] {
        d.wait_readyz(200);
    }
    let parties = Parties::new(&log.pki);
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-REPLICAS", recipient.public(), 100));
    for (n, d) in [&blind, &reaches, &blind].into_iter().enumerate() {
        let agency = parties.clients(&log.pki, d.api).agency;
        let envelope = vault::seal(
            &log.escrow,
            "E-1",
            TARGET,
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            &format!("r{n}"),
            &[3; 16],
        );
        let r = vault::post(
            &agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let reply = r.json();
        assert_eq!(vault::statuses(&reply), ["ok"]);
        let (checkpoint, _) = policy
            .verify(reply["audit"]["checkpoint"].as_str().unwrap())
            .expect("cosigned by the quorum");
        let end = reply["audit"]["first_index"].as_u64().unwrap()
            + reply["audit"]["count"].as_u64().unwrap();
        assert!(checkpoint.size >= end);
    }
    // Every cosignature came through replica 0; replica 1 never reached
    // the witness.
    let cosigned = "lavd_witness_requests_total{outcome=\"cosigned\",witness=\"w1.example\"}";
    assert_eq!(blind.metric(cosigned), 0.0);
    assert!(reaches.metric(cosigned) >= 1.0);
    assert!(
        blind.metric("lavd_witness_requests_total{outcome=\"unavailable\",witness=\"w1.example\"}")
            >= 1.0
    );
}

/// A witness named by a host name (`localhost`, looked up, not an IP
/// address) under `release_after_witness`, with `blocking_threads = 4`:
/// four unwraps wait for the quorum, holding every blocking thread, while
/// the witness is stopped (SIGSTOP: each submission times out and is tried
/// again). Once it runs again, the next submission reaches it and all four
/// are released. Before, the name was looked up on the blocking pool,
/// behind the waiting requests, until their wait ran out: 503
/// `witness_unavailable`, their budget spent.
#[test]
fn a_witness_named_by_host_is_reached_while_waiting_unwraps_hold_every_blocking_thread() {
    let base = serve_config(&vault::roles_toml()).replace(
        "shutdown_grace_secs = 10\n",
        "shutdown_grace_secs = 10\nblocking_threads = 4\n",
    );
    assert!(base.contains("blocking_threads = 4"), "{base}");
    let log = LogWithWitnesses::new(&base);
    let w = PyWitness::start(
        "w.example",
        &[7; 32],
        &log.t.path("py-witness.json"),
        &log.origin,
        &log.vkey,
    );
    let mut entry = Entry::python(&w, "w.example");
    entry.url = format!("http://localhost:{}", w.addr.port());
    log.configure(
        &[entry],
        &format!("witness A {}\nquorum A\n", w.vkey),
        "release_after_witness = true\nwitness_timeout_secs = 20\n\
         witness_request_timeout_secs = 1",
    );
    let daemon = Daemon::start(&log.t);
    daemon.wait_readyz(200);
    let c = Parties::new(&log.pki).clients(&log.pki, daemon.api);
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-BY-NAME", recipient.public(), 10));
    let leaves = || {
        rusqlite::Connection::open(log.t.path("lavd.db"))
            .unwrap()
            .query_row("SELECT count(*) FROM audit_leaves", [], |row| {
                row.get::<_, i64>(0)
            })
            .unwrap()
    };
    let before = leaves();
    let failed = || {
        daemon.metric("lavd_witness_requests_total{outcome=\"unavailable\",witness=\"w.example\"}")
    };
    w.pause();
    let answers = std::thread::scope(|s| {
        let unwraps: Vec<_> = (0..4u8)
            .map(|n| {
                let envelope = vault::seal(
                    &log.escrow,
                    "E-1",
                    TARGET,
                    OffsetDateTime::now_utc() - time::Duration::hours(1),
                    &format!("m{n}"),
                    &[n; 16],
                );
                let body = serde_json::json!({"warrant": warrant, "envelopes": [envelope]});
                let agency = &c.agency;
                s.spawn(move || vault::post(agency, "/v1/unwrap", &body))
            })
            .collect();
        // All four committed, so waiting for the quorum; then one more
        // submission timed out after that.
        eventually("the four unwraps' leaves", Duration::from_secs(20), || {
            leaves() >= before + 4
        });
        let seen = failed();
        eventually("a submission after them", Duration::from_secs(20), || {
            failed() > seen
        });
        w.resume();
        unwraps
            .into_iter()
            .map(|u| u.join().unwrap())
            .collect::<Vec<_>>()
    });
    for r in answers {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"]);
    }
}

//! Refusals of `POST /v1/unwrap` over mutual TLS against a real `lavd
//! serve` on SoftHSM, each with its exact status and code: the wrong role,
//! the wrong agency, a warrant short of the double lock, an expired or a
//! revoked warrant, a batch too large or empty; then every per-envelope
//! denial reason in one request, and the budget. Every refused warrant is a
//! `warrant_refused` leaf the auditor can read; requests refused before the
//! warrant is looked at (role, batch size, shape) leave none. The daemon
//! keeps the warrants it verified (`lavd::warrant::cache`): a kept warrant
//! is still refused with its exact code when it is revoked, when it
//! expires, when another agency sends it, and when a reload removes an
//! authority that signed it.

use lavd::envelope::reply::{open_reply, Outcome};
use rustix::process::Signal;
use softhsm_tests::server::{authorities, serve_config, Authorities, Daemon, Pki};
use softhsm_tests::vault::{self, Clients, Parties, AGENCY, TARGET};
use softhsm_tests::{assert_ok, TestToken};
use time::{Duration, OffsetDateTime};

/// A second agency: it holds the role, but the warrants name `AGENCY`.
const OTHER_AGENCY: &str = "spiffe://agency.example/other-unit";

struct Setup {
    t: TestToken,
    pki: Pki,
    daemon: Daemon,
    c: Clients,
}

/// A daemon with the four parties and `OTHER_AGENCY`, `limits` appended
/// to the config, after `before_start` has prepared the token.
fn setup(limits: &str, before_start: impl FnOnce(&TestToken)) -> Setup {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "{}\"{OTHER_AGENCY}\" = [\"agency\"]\n{limits}",
        vault::roles_toml()
    )));
    before_start(&t);
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    Setup { t, pki, daemon, c }
}

fn digest_of_payload(warrant: &serde_json::Value) -> String {
    let payload = lavd::codec::b64_decode(warrant["payload"].as_str().unwrap()).unwrap();
    lavd::codec::b64_encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &payload,
    ))
}

/// `(caller, warrant_id, warrant_digest, reason)` of every
/// `warrant_refused` leaf, read by the auditor.
fn refused_leaves(c: &Clients) -> Vec<(String, String, String, String)> {
    let size = vault::tree_size(&c.auditor);
    vault::entries(&c.auditor, 0, size)
        .into_iter()
        .filter(|e| e.leaf["event"] == "warrant_refused")
        .map(|e| {
            let s = |k: &str| e.leaf[k].as_str().unwrap_or("<null>").to_string();
            (
                s("caller"),
                s("warrant_id"),
                s("warrant_digest"),
                s("reason"),
            )
        })
        .collect()
}

fn body(warrant: &serde_json::Value, envelopes: &[serde_json::Value]) -> serde_json::Value {
    serde_json::json!({"warrant": warrant, "envelopes": envelopes})
}

#[test]
fn whole_request_refusals_have_their_status_and_code() {
    let s = setup("[limits]\nmax_batch = 4\n", |t| {
        vault::generate_escrow_key(t, "E-1");
    });
    let c = &s.c;
    let escrow = vault::published_key(&c.provider, "E-1");
    let now = OffsetDateTime::now_utc();
    let envelope = |r: &str| {
        vault::seal(
            &escrow,
            "E-1",
            TARGET,
            now - Duration::hours(1),
            r,
            &[7; 32],
        )
    };
    let recipient = vault::recipient();
    let good = vault::double_lock(&vault::claims("W-GOOD", recipient.public(), 100));

    // Role first: a provider may not unwrap, whatever it sends.
    let r = vault::post(&c.provider, "/v1/unwrap", &body(&good, &[envelope("a")]));
    let message = r.assert_error(403, "forbidden");
    assert!(message.contains("agency"), "{message}");

    // Another agency than the one the warrant names.
    let other = s
        .pki
        .client(s.daemon.api, Some(&s.pki.clients.identity(OTHER_AGENCY)));
    vault::post(&other, "/v1/unwrap", &body(&good, &[envelope("a")]))
        .assert_error(403, "agency_mismatch");

    // Only the executive signed: the double lock is not met.
    let a = softhsm_tests::server::authorities();
    let one_sig = softhsm_tests::server::Authorities::sign(
        &vault::claims("W-ONE-SIG", recipient.public(), 100),
        &[&a.executive],
    );
    vault::post(&c.agency, "/v1/unwrap", &body(&one_sig, &[envelope("a")]))
        .assert_error(403, "policy_not_met");

    // Expired an hour ago.
    let mut claims = vault::claims("W-EXPIRED", recipient.public(), 100);
    claims["not_before"] = vault::at(now, -Duration::days(2)).into();
    claims["expires"] = vault::at(now, -Duration::hours(1)).into();
    let expired = vault::double_lock(&claims);
    vault::post(&c.agency, "/v1/unwrap", &body(&expired, &[envelope("a")]))
        .assert_error(403, "warrant_expired");

    // The batch limit is 4; none is not a batch. Both are refused before
    // the warrant is checked.
    let five: Vec<_> = (0..5).map(|i| envelope(&format!("m{i}"))).collect();
    let message = vault::post(&c.agency, "/v1/unwrap", &body(&good, &five))
        .assert_error(413, "batch_too_large");
    assert!(message.contains('4') && message.contains('5'), "{message}");
    vault::post(&c.agency, "/v1/unwrap", &body(&good, &[])).assert_error(400, "malformed_request");

    // The good warrant still works: none of the above spent or spoiled it.
    let four: Vec<_> = (0..4).map(|i| envelope(&format!("m{i}"))).collect();
    let r = vault::post(&c.agency, "/v1/unwrap", &body(&good, &four));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"; 4]);

    // Each warrant refusal is in the log, naming who presented what; the
    // role, batch and shape refusals are not warrant refusals.
    assert_eq!(
        refused_leaves(c),
        [
            (
                OTHER_AGENCY,
                "W-GOOD",
                digest_of_payload(&good),
                "agency_mismatch"
            ),
            (
                AGENCY,
                "W-ONE-SIG",
                digest_of_payload(&one_sig),
                "policy_not_met"
            ),
            (
                AGENCY,
                "W-EXPIRED",
                digest_of_payload(&expired),
                "warrant_expired"
            ),
        ]
        .map(|(c, id, d, r)| (c.to_string(), id.to_string(), d, r.to_string()))
    );
}

#[test]
fn a_revoked_warrant_is_refused_and_only_an_admin_revokes_without_an_authority() {
    let s = setup("", |t| {
        vault::generate_escrow_key(t, "E-1");
    });
    let c = &s.c;
    let escrow = vault::published_key(&c.provider, "E-1");
    let now = OffsetDateTime::now_utc();
    let envelopes = [vault::seal(
        &escrow,
        "E-1",
        TARGET,
        now - Duration::hours(1),
        "a",
        &[7; 32],
    )];
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-REVOKED", recipient.public(), 100));
    let kept = vault::double_lock(&vault::claims("W-KEPT", recipient.public(), 100));

    // Usable before the revocation.
    let r = vault::post(&c.agency, "/v1/unwrap", &body(&warrant, &envelopes));
    assert_eq!(r.status, 200, "{}", r.text());

    // The agency is not an admin and brings no authority JWS.
    let revoke_kept = serde_json::json!({"id": "W-KEPT", "reason": "the agency wants it gone"});
    let message = vault::post(&c.agency, "/v1/warrants/revocations", &revoke_kept)
        .assert_error(403, "forbidden");
    assert!(message.contains("admin"), "{message}");
    let r = vault::post(&c.agency, "/v1/unwrap", &body(&kept, &envelopes));
    assert_eq!(r.status, 200, "W-KEPT must not be revoked: {}", r.text());

    // The admin revokes.
    let r = vault::post(
        &c.admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": "W-REVOKED", "reason": "quashed on review"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["id"], "W-REVOKED");
    assert_eq!(v["revoked"], true);
    assert_eq!(v["already_revoked"], false);
    assert_eq!(v["warrant_seen"], true);
    let key = vault::verifier_key(&c.auditor);
    let checkpoint =
        lavd::audit::note::verify_note(v["audit"]["checkpoint"].as_str().unwrap(), &key).unwrap();
    let index = v["audit"]["first_index"].as_u64().unwrap();
    assert_eq!(v["audit"]["count"], 1);
    assert!(index < checkpoint.size);
    let leaf = &vault::entries(&c.auditor, index, index + 1)[0].leaf;
    assert_eq!(leaf["event"], "revocation");
    assert_eq!(leaf["warrant_id"], "W-REVOKED");
    assert_eq!(leaf["caller"], vault::ADMIN);

    let message = vault::post(&c.agency, "/v1/unwrap", &body(&warrant, &envelopes))
        .assert_error(403, "warrant_revoked");
    assert!(message.contains("W-REVOKED"), "{message}");

    // Final: a second revocation changes nothing.
    let r = vault::post(
        &c.admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": "W-REVOKED", "reason": "again"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["already_revoked"], true);
    vault::post(&c.agency, "/v1/unwrap", &body(&warrant, &envelopes))
        .assert_error(403, "warrant_revoked");

    assert_eq!(
        refused_leaves(c),
        [
            (
                AGENCY,
                "W-REVOKED",
                digest_of_payload(&warrant),
                "warrant_revoked"
            ),
            (
                AGENCY,
                "W-REVOKED",
                digest_of_payload(&warrant),
                "warrant_revoked"
            ),
        ]
        .map(|(c, id, d, r)| (c.to_string(), id.to_string(), d, r.to_string()))
    );
}

#[test]
fn each_envelope_is_denied_for_its_own_reason_and_only_opened_ones_spend() {
    let mut destroyed = None;
    let s = setup("", |t| {
        vault::generate_escrow_key(t, "E-1");
        vault::generate_escrow_key(t, "E-2");
        // Sealed to before it was destroyed.
        destroyed = Some(vault::generate_escrow_key(t, "E-3"));
        assert_ok(&t.lavd_with_config(&[
            "keys", "destroy", "--kid", "E-3", "--force", "--reason", "test",
        ]));
    });
    let destroyed = destroyed.unwrap();
    let c = &s.c;
    let e1 = vault::published_key(&c.provider, "E-1");
    let e2 = vault::published_key(&c.provider, "E-2");
    let now = OffsetDateTime::now_utc();
    let in_window = now - Duration::hours(1);
    let seal = |key, kid: &str, target: &str, time, r: &str| {
        vault::seal(key, kid, target, time, r, &[r.as_bytes()[0]; 32])
    };
    // The header still parses and is in scope, but it is not what was
    // sealed: HPKE authentication fails.
    let mut tampered = seal(&e1, "E-1", TARGET, in_window, "tampered");
    let header = vault::headers(std::slice::from_ref(&tampered)).remove(0);
    let header = String::from_utf8(header)
        .unwrap()
        .replace("\"tampered\"", "\"tampereD\"");
    tampered["header"] = lavd::codec::b64_encode(header.as_bytes()).into();

    let envelopes = vec![
        seal(&e1, "E-1", TARGET, in_window, "a"),
        seal(&e1, "E-1", "acct:bob@example.com", in_window, "b"),
        seal(&e1, "E-1", TARGET, now - Duration::days(60), "c"),
        // Sealed to E-1's key but naming a key the vault never had.
        seal(&e1, "E-9", TARGET, in_window, "d"),
        seal(&e2, "E-2", TARGET, in_window, "e"),
        seal(&destroyed, "E-3", TARGET, in_window, "f"),
        tampered,
        serde_json::json!({"v": 1, "header": "!!"}),
        seal(&e1, "E-1", TARGET, in_window, "g"),
        seal(&e1, "E-1", TARGET, in_window, "h"),
    ];
    let recipient = vault::recipient();
    let mut claims = vault::claims("W-SCOPE", recipient.public(), 3);
    claims["kids"] = serde_json::json!(["E-1", "E-3"]);
    let warrant = vault::double_lock(&claims);

    let r = vault::post(&c.agency, "/v1/unwrap", &body(&warrant, &envelopes));
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    // Four candidates reach the budget (a, tampered, g, h) and three units
    // are granted: a, tampered and g are tried, h is refused. The tampered
    // one fails to open, so only a and g spend.
    assert_eq!(
        vault::statuses(&reply),
        [
            "ok",
            "target_not_in_warrant",
            "out_of_window",
            "unknown_key",
            "key_not_allowed",
            "key_destroyed",
            "open_failed",
            "malformed_envelope",
            "ok",
            "budget_exhausted",
        ]
    );
    let opened = open_reply(&recipient, &vault::headers(&envelopes), &r.body).unwrap();
    for i in [0, 8] {
        match &opened.results[i].outcome {
            Outcome::Ok(dek) => assert_eq!(
                dek.as_slice(),
                &[opened.results[i].reference.as_ref().unwrap().as_bytes()[0]; 32]
            ),
            other => panic!("{i}: {other:?}"),
        }
    }

    // One leaf per envelope, at the indices the reply gives, saying what the
    // reply said.
    let (first, count) = (
        reply["audit"]["first_index"].as_u64().unwrap(),
        reply["audit"]["count"].as_u64().unwrap(),
    );
    assert_eq!(count, 10);
    let leaves = vault::entries(&c.auditor, first, first + count);
    for ((entry, status), envelope) in leaves.iter().zip(vault::statuses(&reply)).zip(&envelopes) {
        let leaf = &entry.leaf;
        assert_eq!(leaf["event"], "unwrap");
        assert_eq!(leaf["warrant_id"], "W-SCOPE");
        if status == "ok" {
            assert_eq!(leaf["outcome"], "opened");
            assert_eq!(leaf["reason"], serde_json::Value::Null);
        } else {
            assert_eq!(leaf["outcome"], "denied");
            assert_eq!(leaf["reason"], status.as_str());
        }
        if status == "malformed_envelope" {
            assert_eq!(leaf["kid"], serde_json::Value::Null);
            assert_eq!(leaf["envelope_digest"], serde_json::Value::Null);
        } else {
            assert_eq!(leaf["kid"], envelope_kid(envelope));
            assert_eq!(leaf["envelope_digest"], vault::envelope_digest(envelope));
        }
    }

    // The failed open gave its unit back: one more opens, then none.
    let more = |r: &str| body(&warrant, &[seal(&e1, "E-1", TARGET, in_window, r)]);
    let r = vault::post(&c.agency, "/v1/unwrap", &more("i"));
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    let r = vault::post(&c.agency, "/v1/unwrap", &more("j"));
    assert_eq!(
        vault::statuses(&r.json()),
        ["budget_exhausted"],
        "{}",
        r.text()
    );
    let spent: u64 = rusqlite::Connection::open(s.t.path("lavd.db"))
        .unwrap()
        .query_row(
            "SELECT spent FROM warrants WHERE id = 'W-SCOPE'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(spent, 3);

    // Denied envelopes are not refused warrants.
    let refused = refused_leaves(c);
    assert!(refused.is_empty(), "{refused:?}");
}

/// A key the store lists as retained whose private half the token lost
/// (removed by another PKCS#11 application, a vendor tool, an HSM policy):
/// its envelopes are denied `key_destroyed`, the others of the batch open,
/// and the daemon says so in an ERROR line naming the key, not only in the
/// leaves: once a request, and at most once a second however many requests
/// send them.
#[test]
fn a_retained_key_the_token_lost_is_denied_and_named_once() {
    let s = setup("", |t| {
        vault::generate_escrow_key(t, "E-1");
        vault::generate_escrow_key(t, "E-4");
    });
    let e1 = vault::published_key(&s.c.provider, "E-1");
    let e4 = vault::published_key(&s.c.provider, "E-4");
    let session = s.t.session();
    let private = session
        .find_objects(&[
            cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::PRIVATE_KEY),
            cryptoki::object::Attribute::Label(b"lav-escrow:E-4".to_vec()),
        ])
        .unwrap();
    assert_eq!(private.len(), 1);
    session.destroy_object(private[0]).unwrap();
    drop(session);

    let warrant = vault::double_lock(&vault::claims("LOST-1", vault::recipient().public(), 10));
    let in_window = OffsetDateTime::now_utc() - Duration::hours(1);
    let envelopes: Vec<_> = [(&e4, "E-4", "x"), (&e1, "E-1", "y"), (&e4, "E-4", "z")]
        .into_iter()
        .map(|(key, kid, r)| vault::seal(key, kid, TARGET, in_window, r, &[9; 32]))
        .collect();
    let started = std::time::Instant::now();
    let r = vault::post(&s.c.agency, "/v1/unwrap", &body(&warrant, &envelopes));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        vault::statuses(&r.json()),
        ["key_destroyed", "ok", "key_destroyed"],
        "{}",
        r.text()
    );
    for again in ["p", "q"] {
        let envelope = vault::seal(&e4, "E-4", TARGET, in_window, again, &[9; 32]);
        let r = vault::post(&s.c.agency, "/v1/unwrap", &body(&warrant, &[envelope]));
        assert_eq!(
            vault::statuses(&r.json()),
            ["key_destroyed"],
            "{}",
            r.text()
        );
    }
    let seconds = started.elapsed().as_secs() as usize;
    let stderr = s.daemon.stderr();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("holds no private key for it"))
        .collect();
    // One line a second at most: three requests in well under a second
    // write one.
    assert!(
        (1..=1 + seconds).contains(&lines.len()),
        "{} lines in {seconds} s: {stderr}",
        lines.len()
    );
    assert!(
        lines[0].contains("E-4") && lines[0].contains("ERROR"),
        "{}",
        lines[0]
    );
}

/// One fresh envelope for `TARGET` under `E-1` with `warrant`.
fn one(s: &Setup, warrant: &serde_json::Value) -> serde_json::Value {
    let escrow = vault::published_key(&s.c.provider, "E-1");
    let envelope = vault::seal(
        &escrow,
        "E-1",
        TARGET,
        OffsetDateTime::now_utc() - Duration::hours(1),
        "m",
        &[7; 32],
    );
    body(warrant, &[envelope])
}

fn opens(s: &Setup, warrant: &serde_json::Value) {
    let r = vault::post(&s.c.agency, "/v1/unwrap", &one(s, warrant));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
}

#[test]
fn a_kept_warrant_is_refused_when_revoked_expired_or_sent_by_another_agency() {
    let s = setup("", |t| {
        vault::generate_escrow_key(t, "E-1");
    });
    let recipient = vault::recipient();
    let other = s
        .pki
        .client(s.daemon.api, Some(&s.pki.clients.identity(OTHER_AGENCY)));

    // Another agency, before and after the warrant is kept: one code.
    let warrant = vault::double_lock(&vault::claims("W-KEPT", recipient.public(), 100));
    vault::post(&other, "/v1/unwrap", &one(&s, &warrant)).assert_error(403, "agency_mismatch");
    opens(&s, &warrant);
    opens(&s, &warrant);
    vault::post(&other, "/v1/unwrap", &one(&s, &warrant)).assert_error(403, "agency_mismatch");
    opens(&s, &warrant);

    // Revoked after being kept.
    let r = vault::post(
        &s.c.admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": "W-KEPT", "reason": "quashed on review"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let message = vault::post(&s.c.agency, "/v1/unwrap", &one(&s, &warrant))
        .assert_error(403, "warrant_revoked");
    assert!(message.contains("W-KEPT"), "{message}");
    // Another agency presenting it: revocation is part of the warrant's
    // validity, which PROTOCOL §5 checks before the agency.
    let message =
        vault::post(&other, "/v1/unwrap", &one(&s, &warrant)).assert_error(403, "warrant_revoked");
    assert!(message.contains("W-KEPT"), "{message}");

    // Expires while kept. Eight seconds leave room for two requests on a
    // loaded machine; RFC 3339 times here have whole seconds.
    let now = OffsetDateTime::now_utc();
    let expires = now + Duration::seconds(8);
    let mut claims = vault::claims("W-SHORT", recipient.public(), 100);
    claims["expires"] = vault::at(now, Duration::seconds(8)).into();
    let short = vault::double_lock(&claims);
    opens(&s, &short);
    opens(&s, &short);
    let left = expires + Duration::seconds(2) - OffsetDateTime::now_utc();
    if left.is_positive() {
        std::thread::sleep(left.unsigned_abs());
    }
    vault::post(&s.c.agency, "/v1/unwrap", &one(&s, &short)).assert_error(403, "warrant_expired");
}

#[test]
fn a_reload_that_removes_a_signer_refuses_a_kept_warrant() {
    let s = setup("", |t| {
        vault::generate_escrow_key(t, "E-1");
    });
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-RELOAD", recipient.public(), 100));
    opens(&s, &warrant);
    opens(&s, &warrant);

    // The judicial authority that signed is removed, and the policy needs
    // only an executive: were the kept warrant trusted, it would pass.
    let config = std::fs::read_to_string(s.t.config()).unwrap();
    let judicial = authorities().judicial.kid().to_string();
    let start = config
        .find(&format!("kid = \"{judicial}\""))
        .and_then(|at| config[..at].rfind("[[authorities]]"))
        .unwrap();
    let end = start + config[start..].find("\n\n").unwrap() + 2;
    let changed = format!("{}{}", &config[..start], &config[end..])
        .replace("[[policy.require]]\nrole = \"judicial\"\ncount = 1\n", "");
    assert!(!changed.contains(&judicial), "{changed}");
    std::fs::write(s.t.config(), changed).unwrap();
    s.daemon.signal(Signal::HUP);
    s.daemon.expect_notify("RELOADING=1");
    s.daemon.expect_notify("READY=1");

    let message = vault::post(&s.c.agency, "/v1/unwrap", &one(&s, &warrant))
        .assert_error(403, "unknown_authority");
    assert!(message.contains(&judicial), "{message}");
    // A warrant the executive alone signed is what opens now.
    let single = Authorities::sign(
        &vault::claims("W-ONE", recipient.public(), 100),
        &[&authorities().executive],
    );
    opens(&s, &single);
}

fn envelope_kid(envelope: &serde_json::Value) -> String {
    let header = vault::headers(std::slice::from_ref(envelope)).remove(0);
    serde_json::from_slice::<serde_json::Value>(&header).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every size has a configured bound (PROTOCOL, "Conventions"): the
/// warrant's bytes and signatures and each envelope's bytes come from
/// `[limits]`, not from constants. A warrant over either of its bounds is
/// 413 `warrant_too_large`. The envelope bound can only be raised (below
/// its default it would deny envelopes PROTOCOL allows): raised to 16000,
/// an envelope of 15000 bytes (whitespace inside its JSON) opens, which the
/// default 13312 would deny, and one of 16500 is denied
/// `malformed_envelope`.
#[test]
fn warrant_and_envelope_bounds_come_from_the_configuration() {
    let v = vault::Vault::start(
        "max_warrant_bytes = 3072\nmax_warrant_signatures = 2\nmax_envelope_bytes = 16000\n",
    );
    let c = v.parties.clients(&v.pki, v.daemon.api);
    let recipient = vault::recipient();
    let now = OffsetDateTime::now_utc();
    let padded = |reference: &str, size: usize| {
        let sealed = vault::seal(
            &v.escrow,
            "E-1",
            TARGET,
            now - Duration::hours(1),
            reference,
            &[9; 32],
        )
        .to_string();
        let text = format!("{{{}{}", " ".repeat(size - sealed.len()), &sealed[1..]);
        assert_eq!(text.len(), size);
        text
    };
    let envelopes = [padded("near", 15000), padded("over", 16500)];
    let unwrap = |warrant: &serde_json::Value| {
        let body = format!(
            r#"{{"warrant":{warrant},"envelopes":[{},{}]}}"#,
            envelopes[0], envelopes[1]
        );
        c.agency
            .request("POST", "/v1/unwrap", Some(body.as_bytes()))
            .expect("request")
    };

    // 80 targets: well under the default 256 KiB, over 3 KiB.
    let mut claims = vault::claims("BOUNDS-BIG", recipient.public(), 5);
    claims["targets"] = (0..80)
        .map(|i| format!("acct:target-{i:04}@example.com"))
        .chain([TARGET.to_string()])
        .collect();
    let big = vault::double_lock(&claims);
    assert!(big.to_string().len() > 3072);
    let message = unwrap(&big).assert_error(413, "warrant_too_large");
    assert!(message.contains("3072"), "{message}");

    // A third signature (a copy of the first: counted before any is
    // verified).
    let mut three = vault::double_lock(&vault::claims("BOUNDS-THREE", recipient.public(), 5));
    let first = three["signatures"][0].clone();
    three["signatures"].as_array_mut().unwrap().push(first);
    let message = unwrap(&three).assert_error(413, "warrant_too_large");
    assert!(message.contains("signatures"), "{message}");

    let ok = vault::double_lock(&vault::claims("BOUNDS-OK", recipient.public(), 5));
    let r = unwrap(&ok);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok", "malformed_envelope"]);
}

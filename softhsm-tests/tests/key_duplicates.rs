//! Two key pairs under one escrow key's label, on a real SoftHSM token,
//! checked from this test process: two generations of one kid at once,
//! through the real `lavd keys generate` (the fault module holds one at the
//! HSM while the other runs), and a pair a PIN holder adds by hand. And two
//! tokens under one label, one of them unreadable at first.

use cryptoki::object::{Attribute, ObjectClass};
use softhsm_tests::{assert_fails_with, assert_ok, TestToken};

const KID: &str = "2026-12";

/// Two generations of one kid at once (two hosts running `lavd keys
/// generate --kid K` together on one token): each checks that the store and
/// the token have no K, then makes its pair. Played here by holding one
/// generation in `C_GenerateKeyPair`, past its checks, while another runs
/// to completion. Before, the held one's pair stayed when the store refused
/// its record: two pairs under one label, so every lookup of K failed as
/// ambiguous, and `lavd keys destroy` stopped at the ambiguity, leaving both
/// private keys on the token after the log said K was destroyed. Now it
/// deletes its own pair, by its handles, and fails `duplicate_kid`; the
/// recorded pair is untouched and is the one served.
#[test]
fn a_generation_that_loses_the_race_deletes_its_own_pair() {
    let t = TestToken::new();
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with_module(&softhsm_tests::shim_module_path(), &shim.hsm_env());
    shim.set("fault = hang\nfault_calls = C_GenerateKeyPair");
    let (held, winner) = std::thread::scope(|s| {
        let held = s.spawn(|| softhsm_tests::generate_key(&t, KID, "2030-01-01T00:00:00Z"));
        // Released however this closure ends, so that `held` can end.
        let _release = shim.releasing();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while shim.faults() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the generation never reached the HSM"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // The other generation, on the plain module, from start to end.
        t.write_config("");
        let winner = assert_ok(&softhsm_tests::generate_key(
            &t,
            KID,
            "2030-01-01T00:00:00Z",
        ));
        shim.set("");
        (held.join().unwrap(), winner)
    });
    assert_fails_with(&held, 1, "duplicate_kid");
    let session = t.session();
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let found = session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(format!("lav-escrow:{KID}").into_bytes()),
            ])
            .unwrap();
        assert_eq!(found.len(), 1, "{class}: one pair under the label");
    }
    // The pair left is the recorded one: what the store and the token hold
    // agree (a key whose halves disagree is never published), and it can
    // be destroyed whole.
    let winner: serde_json::Value = serde_json::from_str(&winner).unwrap();
    let listed = assert_ok(&t.lavd_with_config(&["keys", "list"]));
    assert!(listed.contains(winner["x"].as_str().unwrap()), "{listed}");
    assert_ok(&t.lavd_with_config(&[
        "keys", "destroy", "--kid", KID, "--force", "--reason", "test",
    ]));
    assert_nothing_under_the_label(&session);
}

/// A second pair under one key's label (a PIN holder's, or one left by a
/// build without the fix above) makes that key ambiguous: it is withheld
/// from the published set and logged, and the other keys are still
/// published. Before, the whole set failed (`GET /v1/keys` answered 503 for
/// every key).
#[test]
fn an_ambiguous_key_is_withheld_and_the_others_are_published() {
    let t = two_keys();
    let session = t.session();
    softhsm_tests::foreign_pair(&session, &format!("lav-escrow:{KID}"), true);
    let stderr = only_the_other_key_is_published(&t);
    assert!(
        stderr.contains("unusable; not publishing it") && stderr.contains(KID),
        "{stderr}"
    );
    // Its destruction removes both pairs under the label: none outlives
    // the key the log says is destroyed. Before, it stopped at the
    // ambiguity and left both private keys.
    assert_ok(&t.lavd_with_config(&[
        "keys", "destroy", "--kid", KID, "--force", "--reason", "test",
    ]));
    assert_nothing_under_the_label(&session);
}

/// An unwrap meets the ambiguous key at its first open: that kid's
/// envelope is `open_failed`, not a 503 for the whole request, and the
/// other key's envelope in the same request opens.
#[test]
fn an_ambiguous_key_fails_its_own_envelopes_only() {
    let setup = softhsm_tests::vault::Held::new(&["E-1", "E-2"]);
    let t = &setup.t;
    let (ambiguous, other) = (
        sealed_from_the_cli(&setup, "E-2", "ambiguous"),
        sealed_from_the_cli(&setup, "E-1", "other"),
    );
    softhsm_tests::foreign_pair(&t.session(), "lav-escrow:E-2", true);
    let r = unwrap_both(&setup, "W-AMBIGUOUS", ambiguous, other);
    assert_eq!(
        softhsm_tests::vault::statuses(&r.json()),
        ["open_failed", "ok"]
    );
    let log = setup.daemon.stderr();
    assert!(
        log.contains("more than one private key under this escrow key's label"),
        "{log}"
    );
}

/// A private key replaced under its label (a PIN holder deletes lavd's and
/// makes another there): its public half still agrees with the store, but
/// nothing sealed to it can open. Before it publishes a key, the daemon
/// checks its halves against each other (a derive on P-256's generator,
/// compared with the public half's x): `GET /v1/keys` withholds it, with
/// the reason logged.
/// Before, it stayed published. Its envelopes fail to open
/// (`open_failed`), as before, and the other key's open.
#[test]
fn a_private_key_replaced_under_its_label_is_withheld_and_opens_nothing() {
    let setup = softhsm_tests::vault::Held::new(&["E-1", "E-2"]);
    let (t, c) = (&setup.t, &setup.c);
    let (replaced, other) = (
        sealed_from_the_cli(&setup, "E-2", "replaced"),
        sealed_from_the_cli(&setup, "E-1", "other"),
    );
    let published = || -> Vec<String> {
        let keys = c.provider.get("/v1/keys");
        assert_eq!(keys.status, 200, "{}", keys.text());
        keys.json()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    };
    // Checked and kept for this pool generation: the replacement below is
    // a new object under the label, checked again.
    assert_eq!(published(), ["E-1", "E-2"]);
    let session = t.session();
    let label = "lav-escrow:E-2";
    let of_class = |class: ObjectClass| {
        session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap()
    };
    let lavds_public = of_class(ObjectClass::PUBLIC_KEY);
    for private in of_class(ObjectClass::PRIVATE_KEY) {
        session.destroy_object(private).unwrap();
    }
    softhsm_tests::foreign_pair(&session, label, true);
    for public in of_class(ObjectClass::PUBLIC_KEY) {
        if !lavds_public.contains(&public) {
            session.destroy_object(public).unwrap();
        }
    }
    assert_eq!(of_class(ObjectClass::PUBLIC_KEY), lavds_public);

    let r = unwrap_both(&setup, "W-REPLACED", replaced, other);
    assert_eq!(
        softhsm_tests::vault::statuses(&r.json()),
        ["open_failed", "ok"]
    );
    assert_eq!(published(), ["E-1"]);
    // The verdict is kept: asked again, withheld again (without another
    // derive, not visible here).
    assert_eq!(published(), ["E-1"]);
    let log = setup.daemon.stderr();
    assert!(
        log.contains("does not match its public half on the token"),
        "{log}"
    );
    // `lavd keys list` (the same check, in another process) withholds it
    // too.
    let listed = assert_ok(&t.lavd_with_config(&["keys", "list"]));
    assert!(!listed.contains("\"E-2\""), "{listed}");
}

/// An envelope sealed to `kid` as `lavd keys list` (another process)
/// publishes it: the daemon's first look at the key's objects is then the
/// test's to place.
fn sealed_from_the_cli(
    setup: &softhsm_tests::vault::Held,
    kid: &str,
    tag: &str,
) -> serde_json::Value {
    let out = setup.t.lavd_with_config(&["keys", "list"]);
    let set: lavd::jwk::JwkSet = serde_json::from_str(&assert_ok(&out)).unwrap();
    let jwk = set
        .keys
        .iter()
        .find(|k| k.kid.as_deref() == Some(kid))
        .unwrap_or_else(|| panic!("{kid} not listed"));
    setup.seal(&lavd::jwk::P256PublicKey::from_jwk(jwk).unwrap(), kid, tag)
}

/// Both envelopes in one unwrap, under a new warrant `id`; the reply, 200.
fn unwrap_both(
    setup: &softhsm_tests::vault::Held,
    id: &str,
    first: serde_json::Value,
    second: serde_json::Value,
) -> softhsm_tests::server::Response {
    let warrant = softhsm_tests::vault::double_lock(&softhsm_tests::vault::claims(
        id,
        softhsm_tests::vault::recipient().public(),
        5,
    ));
    let r = softhsm_tests::vault::post(
        &setup.c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": [first, second]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// A key whose private half is gone from the token (a vendor tool, an HSM
/// policy) is not published, though its public half and the store's record
/// still agree: providers would seal to a key that can never open. The
/// other keys still are.
#[test]
fn a_key_without_its_private_half_is_not_published() {
    let t = two_keys();
    let session = t.session();
    let private = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(format!("lav-escrow:{KID}").into_bytes()),
        ])
        .unwrap();
    assert_eq!(private.len(), 1);
    session.destroy_object(private[0]).unwrap();
    let stderr = only_the_other_key_is_published(&t);
    assert!(
        stderr.contains("does not hold") && stderr.contains(KID),
        "{stderr}"
    );
}

/// A token with escrow keys `2026-11` and [`KID`], generated by the CLI.
fn two_keys() -> TestToken {
    let t = TestToken::new();
    t.write_config("");
    // The key that signs the log, as on every lavd token (a destruction
    // finished later is proved in the log).
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    for kid in ["2026-11", KID] {
        assert_ok(&softhsm_tests::generate_key(
            &t,
            kid,
            "2030-01-01T00:00:00Z",
        ));
    }
    t
}

/// `lavd keys list` publishes `2026-11` alone; returns its stderr.
fn only_the_other_key_is_published(t: &TestToken) -> String {
    let out = t.lavd_with_config(&["keys", "list"]);
    let set: serde_json::Value = serde_json::from_str(&assert_ok(&out)).unwrap();
    assert_eq!(softhsm_tests::vault::kids(&set), ["2026-11"]);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A key the store already records destroyed while the token still holds
/// two pairs under its label (what an older build could leave): the daily
/// job finishes the destruction, both pairs. Before, it looked for the key
/// first, met the ambiguity and failed on every run.
#[test]
fn the_daily_job_finishes_a_destruction_that_left_two_pairs() {
    let t = two_keys();
    let session = t.session();
    softhsm_tests::foreign_pair(&session, &format!("lav-escrow:{KID}"), true);
    t.interrupt_destruction(KID);
    let out = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("finished an interrupted destruction") && stderr.contains(KID),
        "{stderr}"
    );
    assert_nothing_under_the_label(&session);
}

/// No object at all is left under [`KID`]'s label.
fn assert_nothing_under_the_label(session: &cryptoki::session::Session) {
    let left = session
        .find_objects(&[Attribute::Label(format!("lav-escrow:{KID}").into_bytes())])
        .unwrap();
    assert!(left.is_empty(), "{} objects left", left.len());
}

/// A generation killed between the HSM and its commit (held in the module
/// while it reads the new pair's public key, then SIGKILL) leaves a pair
/// the store does not record. Before, the next generation of that kid
/// failed `duplicate_kid` though `lavd keys list` had no such key, and
/// nothing lavd offered removed the pair: its private key stayed on the
/// token for ever, never destroyed at any retention. Now the generation
/// names it (`orphan_key_pair`, with the command to run), `lavd keys
/// discard-orphan` removes that pair and nothing else (a recorded kid is
/// refused, `key_recorded`, its pair kept), and the kid can be generated.
/// It acts only on a store shown to be the token's: one whose newest
/// checkpoint the token's audit key signed (`store_unproven` for a missing
/// store, which it does not create, and for one that never served).
#[test]
fn a_pair_a_killed_generation_left_is_named_and_can_be_discarded() {
    let t = TestToken::new();
    let _pki = softhsm_tests::server::Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with_module(
        &softhsm_tests::shim_module_path(),
        &format!("{}\n{}", shim.hsm_env(), softhsm_tests::faults::limits()),
    );
    const OTHER: &str = "2026-11";
    assert_ok(&softhsm_tests::generate_key(
        &t,
        OTHER,
        "2030-01-01T00:00:00Z",
    ));
    shim.set("fault = hang\nfault_calls = C_GetAttributeValue");
    let config = t.config();
    let [not_before, not_after] = softhsm_tests::key_window();
    let mut child = softhsm_tests::lavd_command(&[
        "keys",
        "generate",
        "--kid",
        KID,
        "--not-before",
        &not_before,
        "--not-after",
        &not_after,
        "--destroy-after",
        "2030-01-01T00:00:00Z",
        "--config",
        config.to_str().unwrap(),
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let killed = {
        let _release = shim.releasing();
        assert!(
            softhsm_tests::faults::wait_until(std::time::Duration::from_secs(30), || shim.faults()
                > 0),
            "the generation never read its public key"
        );
        child.kill().unwrap();
        child.wait().unwrap()
    };
    assert!(!killed.success(), "{killed:?}");
    shim.set("");
    let session = t.session();
    let label = format!("lav-escrow:{KID}").into_bytes();
    let privates = |session: &cryptoki::session::Session, label: &[u8]| {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.to_vec()),
            ])
            .unwrap()
            .len()
    };
    assert_eq!(
        privates(&session, &label),
        1,
        "the killed generation's pair"
    );
    let listed = assert_ok(&t.lavd_with_config(&["keys", "list", "--all"]));
    assert!(
        !listed.lines().any(|l| l.starts_with(&format!("{KID}\t"))),
        "{listed}"
    );

    let stderr = assert_fails_with(
        &softhsm_tests::generate_key(&t, KID, "2030-01-01T00:00:00Z"),
        1,
        "orphan_key_pair",
    );
    assert!(
        stderr.contains(&format!("lavd keys discard-orphan --kid {KID}")),
        "{stderr}"
    );
    // Not on a store that is not shown to be the token's. (The audit key
    // first, as `Daemon::start` would make it: a token without one is
    // refused `no_audit_key`.)
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    std::fs::write(t.path("audit-key-made"), "").unwrap();
    let stderr = assert_fails_with(
        &t.lavd_with_config(&["keys", "discard-orphan", "--kid", KID]),
        1,
        "store_unproven",
    );
    assert!(stderr.contains("it holds no checkpoint"), "{stderr}");
    let config = std::fs::read_to_string(t.config()).unwrap();
    std::fs::write(
        t.config(),
        config.replace("path = \"lavd.db\"", "path = \"elsewhere.db\""),
    )
    .unwrap();
    let stderr = assert_fails_with(
        &t.lavd_with_config(&["keys", "discard-orphan", "--kid", KID]),
        1,
        "store_unproven",
    );
    assert!(stderr.contains("elsewhere.db does not exist"), "{stderr}");
    assert!(!t.path("elsewhere.db").exists());
    // Another application's SQLite file: refused, and left as it was.
    let other = rusqlite::Connection::open(t.path("elsewhere.db")).unwrap();
    other.execute("CREATE TABLE notes (body TEXT)", []).unwrap();
    drop(other);
    let before = std::fs::read(t.path("elsewhere.db")).unwrap();
    let stderr = assert_fails_with(
        &t.lavd_with_config(&["keys", "discard-orphan", "--kid", KID]),
        1,
        "store_unproven",
    );
    assert!(
        stderr.contains("elsewhere.db is not a lavd store"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(t.path("elsewhere.db")).unwrap(), before);
    std::fs::write(t.config(), config).unwrap();
    assert_eq!(privates(&session, &label), 1, "refused: the pair stays");
    // A start signs the store's first checkpoint with the token's key.
    drop(softhsm_tests::server::Daemon::start(&t));

    assert_fails_with(
        &t.lavd_with_config(&["keys", "discard-orphan", "--kid", OTHER]),
        1,
        "key_recorded",
    );
    assert_eq!(
        privates(&session, format!("lav-escrow:{OTHER}").as_bytes()),
        1,
        "a recorded key's pair stays"
    );
    // The session is lost after the private key went, at the public
    // half's deletion: the run again on a new session finds no private key,
    // but one was there, and its removal is still said and recorded.
    shim.set(
        "fault = session_handle_invalid\nfault_calls = C_DestroyObject\nfault_after = 1\n\
         fault_limit = 1",
    );
    let out = t.lavd_with_config(&["keys", "discard-orphan", "--kid", KID]);
    shim.set("");
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("HSM session lost; reconnecting error=C_DestroyObject"),
        "the session was not lost: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "removed the key pair under lav-escrow:{KID} that the store does not record; its \
             public key: {{\"kty\":\"EC\""
        )),
        "{out:?}"
    );
    assert_nothing_under_the_label(&session);
    // Again: nothing to discard, and no error.
    let out = t.lavd_with_config(&["keys", "discard-orphan", "--kid", KID]);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the token held no private key under"),
        "{out:?}"
    );
    let generated: serde_json::Value = serde_json::from_str(&assert_ok(
        &softhsm_tests::generate_key(&t, KID, "2030-01-01T00:00:00Z"),
    ))
    .unwrap();
    let listed = assert_ok(&t.lavd_with_config(&["keys", "list"]));
    assert!(
        listed.contains(generated["x"].as_str().unwrap()) && listed.contains(OTHER),
        "{listed}"
    );
}

/// Two tokens with the label lavd is configured for, and the first read of
/// one of them fails (`C_GetTokenInfo`, once, through the fault module):
/// lavd looks again and refuses the ambiguity, naming it. Before, the one
/// token it could read was taken as the only match, and the PIN sent to
/// whichever it was. The two tokens are alone in a SoftHSM directory of the
/// test's own, so that the failed read is one of theirs. (A token still
/// unreadable after the retries is skipped with a warning, once per set of
/// such slots: the module cannot fault one slot only, so that branch has no
/// test.)
#[test]
fn a_second_token_with_the_label_is_found_though_unreadable_at_first() {
    let t = TestToken::new();
    let tokens = t.path("two-tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = t.path("two-tokens.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    for _ in 0..2 {
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", &t.label])
            .args(["--pin", softhsm_tests::PIN, "--so-pin", "5678"])
            .output()
            .unwrap();
        assert!(out.status.success(), "softhsm2-util: {out:?}");
    }
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with_module(&softhsm_tests::shim_module_path(), &shim.hsm_env());
    // An empty store of lavd's (`keys list` makes none: `store_missing`).
    drop(lavd::store::Store::open(&t.path("lavd.db")).unwrap());
    let list = || {
        softhsm_tests::lavd_command(&["keys", "list", "--config", t.config().to_str().unwrap()])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap()
    };
    let stderr = assert_fails_with(&list(), 1, "hsm_unavailable");
    assert!(
        stderr.contains(&format!("2 tokens have label {:?}", t.label)),
        "{stderr}"
    );
    shim.set(
        "fault = device_error\nfault_calls = C_GetTokenInfo\nfault_after = 1\nfault_limit = 1",
    );
    let stderr = assert_fails_with(&list(), 1, "hsm_unavailable");
    assert!(
        stderr.contains(&format!("2 tokens have label {:?}", t.label)),
        "{stderr}"
    );
    assert_eq!(shim.faults(), 1, "the first read of one token failed");
}

//! Escrow key lifecycle through the real `lavd` binary on a real SoftHSM token,
//! checked from a separate PKCS#11 application (this test process).

use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use softhsm_tests::{assert_fails_with, assert_ok, module_path, TestToken, PIN};

const KID: &str = "2026-12";

/// Looks the key up in `session` (handles are only valid while a session of
/// this application is open).
fn find_private_key(
    session: &cryptoki::session::Session,
    kid: &str,
) -> Option<cryptoki::object::ObjectHandle> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(format!("lav-escrow:{kid}").into_bytes()),
        ])
        .unwrap();
    assert!(found.len() <= 1);
    found.first().copied()
}

/// Deletes escrow key `kid`'s private half from the token behind lavd's
/// back, as a vendor tool or an HSM policy could.
fn lose_private_key(t: &TestToken, kid: &str) {
    let session = t.session();
    session
        .destroy_object(find_private_key(&session, kid).unwrap())
        .unwrap();
}

#[test]
fn generated_escrow_key_is_sensitive_non_extractable_and_derive_only() {
    let t = TestToken::new();
    let jwk: serde_json::Value = serde_json::from_str(&assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    )))
    .unwrap();
    assert_eq!(jwk["kid"], KID);
    assert_eq!(jwk["crv"], "P-256");

    // A new session of another application on the same token.
    let session = t.session();
    let key = find_private_key(&session, KID).expect("private key on the token");
    // get_attribute_info does not drop sensitive attributes silently.
    let info = session
        .get_attribute_info(key, &[AttributeType::Value])
        .unwrap();
    assert!(matches!(info[0], AttributeInfo::Sensitive), "{info:?}");

    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Derive,
                AttributeType::Sign,
                AttributeType::SignRecover,
                AttributeType::Decrypt,
                AttributeType::Unwrap,
                AttributeType::Copyable,
                AttributeType::Modifiable,
                AttributeType::Id,
            ],
        )
        .unwrap();
    let expected = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::AlwaysSensitive(true),
        Attribute::Extractable(false),
        Attribute::NeverExtractable(true),
        Attribute::Derive(true),
        Attribute::Sign(false),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Copyable(false),
        Attribute::Modifiable(false),
        // None set: the device's own (a kid-derived id collides where a
        // device keeps only its prefix: hsm-config/yubihsm2.toml).
        Attribute::Id(Vec::new()),
    ];
    assert_eq!(attrs.len(), expected.len(), "{attrs:?}");
    for (got, want) in attrs.iter().zip(expected.iter()) {
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
    }
    // Making it extractable afterwards is refused by the token.
    assert!(session
        .update_attributes(key, &[Attribute::Extractable(true)])
        .is_err());
    // So is a copy, which would outlive the key's destruction.
    assert!(session.copy_object(key, &[]).is_err());

    // The same facts as pkcs11-tool (OpenSC) reports them.
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", softhsm_tests::harness().conf())
        .arg("--module")
        .arg(module_path())
        .args(["--token-label", &t.label, "--login", "--pin", PIN])
        .args(["--list-objects", "--type", "privkey"])
        .output()
        .expect("pkcs11-tool (apt-get install opensc)");
    let listing = assert_ok(&out);
    assert!(
        listing.contains(&format!("lav-escrow:{KID}"))
            && listing.contains("Usage:      derive")
            && listing
                .contains("Access:     sensitive, always sensitive, never extractable, local"),
        "{listing}"
    );
}

#[test]
fn keys_are_listed_after_restart_and_kids_are_never_reused() {
    let t = TestToken::new();
    assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    ));
    assert_ok(&softhsm_tests::generate_key(
        &t,
        "2027-01",
        "2030-01-01T00:00:00Z",
    ));

    // A new process reads the JWK Set from the store.
    let jwks: serde_json::Value =
        serde_json::from_str(&assert_ok(&t.lavd_with_config(&["keys", "list"]))).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    for k in keys {
        assert_eq!(k["use"], "enc");
        assert_eq!(k["lav_suite"], "16-1-2");
        assert_eq!(k["kty"], "EC");
        let mut members: Vec<&str> = k.as_object().unwrap().keys().map(|s| s.as_str()).collect();
        members.sort_unstable();
        assert_eq!(
            members,
            [
                "crv",
                "kid",
                "kty",
                "lav_suite",
                "not_after",
                "not_before",
                "use",
                "x",
                "y"
            ]
        );
    }

    let stderr = assert_fails_with(
        &softhsm_tests::generate_key(&t, KID, "2030-01-01T00:00:00Z"),
        1,
        "duplicate_kid",
    );
    assert!(stderr.contains(KID));
    assert_fails_with(
        &softhsm_tests::generate_key(&t, "bad kid", "2030-01-01T00:00:00Z"),
        1,
        "invalid_kid",
    );
    // destroy_after before not_after: the message names the pair.
    let [not_before, not_after] = softhsm_tests::key_window();
    let stderr = assert_fails_with(
        &softhsm_tests::generate_key(&t, "x", &not_before),
        1,
        "invalid_dates",
    );
    assert!(
        stderr.contains(&format!(
            "not_after {not_after} is after destroy_after {not_before}"
        )),
        "{stderr}"
    );
    // Dates apart only by a fraction of a second are one second as the log
    // keeps them: refused, not written as a leaf that would no longer parse.
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    let fraction = |nb: &str, na: &str| {
        t.lavd_with_config(&[
            "keys",
            "generate",
            "--kid",
            "y",
            "--not-before",
            nb,
            "--not-after",
            na,
            "--destroy-after",
            "2100-01-01T00:00:00Z",
        ])
    };
    let stderr = assert_fails_with(
        &fraction("2099-01-01T00:00:00.2Z", "2099-01-01T00:00:00.7Z"),
        1,
        "invalid_dates",
    );
    assert!(
        stderr.contains(
            "not_before 2099-01-01T00:00:00Z is not before not_after 2099-01-01T00:00:00Z"
        ),
        "{stderr}"
    );
    // A fraction with whole seconds between is kept to the second.
    assert_ok(&fraction(
        "2099-01-01T00:00:00.2Z",
        "2099-01-01T00:00:01.7Z",
    ));
    let vkey = assert_ok(&t.lavd_with_config(&["audit", "key"]));
    let export = t.path("export.json");
    assert_ok(&t.lavd_with_config(&["audit", "export", "--out", export.to_str().unwrap()]));
    let out = assert_ok(&t.lavd(&[
        "audit",
        "verify",
        "--key",
        vkey.trim(),
        "--export",
        export.to_str().unwrap(),
    ]));
    assert!(out.contains("verdict: the log verifies"), "{out}");
    let jwks: serde_json::Value =
        serde_json::from_str(&assert_ok(&t.lavd_with_config(&["keys", "list"]))).unwrap();
    let y = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == "y")
        .unwrap();
    assert_eq!(y["not_before"], "2099-01-01T00:00:00Z");
    assert_eq!(y["not_after"], "2099-01-01T00:00:01Z");
}

#[test]
fn destroy_is_refused_before_retention_and_final_after() {
    let t = TestToken::new();
    // As on any token a daemon serves: a destruction run again finds
    // nothing to destroy, and believes it only from a session that sees
    // some private key.
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    ));

    let stderr = assert_fails_with(
        &t.lavd_with_config(&["keys", "destroy", "--kid", KID]),
        1,
        "retention_not_reached",
    );
    assert!(stderr.contains("2030-01-01T00:00:00Z"), "{stderr}");
    assert!(
        t.holds_escrow_key(KID),
        "a refused destroy must not destroy"
    );

    // --force needs --reason (clap refuses it: usage error, exit 2).
    let out = t.lavd_with_config(&["keys", "destroy", "--kid", KID, "--force"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(t.holds_escrow_key(KID));
    // A reason that would forge a line where `keys list --all` prints it
    // (or reorder its text) is refused by the rule of revocation reasons.
    for reason in ["seized\n2099-01-01  E-9  active", "court \u{202e}order"] {
        let out = t.lavd_with_config(&[
            "keys", "destroy", "--kid", KID, "--force", "--reason", reason,
        ]);
        assert_fails_with(&out, 1, "invalid_reason");
        assert!(t.holds_escrow_key(KID));
    }

    assert_ok(&t.lavd_with_config(&[
        "keys",
        "destroy",
        "--kid",
        KID,
        "--force",
        "--reason",
        "court order 42",
    ]));
    // Gone from the token, seen from another application's fresh session.
    assert!(!t.holds_escrow_key(KID));
    // Gone from the published set, and a destroyed kid is never generated again.
    let jwks = assert_ok(&t.lavd_with_config(&["keys", "list"]));
    assert!(!jwks.contains(KID), "{jwks}");
    assert_fails_with(
        &softhsm_tests::generate_key(&t, KID, "2030-01-01T00:00:00Z"),
        1,
        "duplicate_kid",
    );
    // Destroying again is harmless and the first record stays; the run
    // says so (before, it printed the first destruction as its own).
    let again = t.lavd_with_config(&[
        "keys", "destroy", "--kid", KID, "--force", "--reason", "again",
    ]);
    assert_ok(&again);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains(&format!("escrow key {KID} was already destroyed at "))
            && stderr.contains("court order 42")
            && stderr.contains("this run recorded nothing"),
        "{stderr}"
    );
    assert_fails_with(
        &t.lavd_with_config(&[
            "keys", "destroy", "--kid", "nope", "--force", "--reason", "x",
        ]),
        1,
        "unknown_key",
    );
}

#[test]
fn retention_destroy_succeeds_once_the_date_has_passed() {
    let t = TestToken::new();
    generate_past_retention(&t);
    assert!(t.holds_escrow_key("2020-01"));
    assert_ok(&t.lavd_with_config(&["keys", "destroy", "--kid", "2020-01"]));
    assert!(!t.holds_escrow_key("2020-01"));

    // A retained key whose private half the token lost (a vendor tool, an
    // HSM policy, a cluster member without it) while the store listed it:
    // the retention job destroys and logs it, and fails naming the loss,
    // instead of reporting an ordinary destruction.
    generate_past_retention_as(&t, "2020-02");
    lose_private_key(&t, "2020-02");
    // A session that sees no private key at all, not even the audit key,
    // cannot tell a lost key from an unreadable token: nothing is recorded.
    let out = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    let stderr = assert_fails_with(&out, 1, "hsm_unavailable");
    assert!(stderr.contains("not even the audit key"), "{stderr}");
    // With the audit key on the token, as on any token a daemon serves:
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    let out = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    let stderr = assert_fails_with(&out, 1, "key_missing_before_destruction");
    assert!(
        stderr.contains("escrow key 2020-02 destroyed (retention)"),
        "{stderr}"
    );
    assert!(stderr.contains("held no private key for it"), "{stderr}");
    // The job's last line names it as destroyed, not as a failure.
    assert!(
        stderr.trim_end().ends_with(
            "lavd: key_missing_before_destruction: destroyed, but missing from the token \
             before their destruction: 2020-02"
        ),
        "{stderr}"
    );
    // Recorded: the next run has nothing left to do, and says nothing.
    let again = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    assert_ok(&again);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(!said.contains("2020-02"), "{said}");

    // Destroyed by its kid: the same refusal, once recorded.
    generate_past_retention_as(&t, "2020-03");
    lose_private_key(&t, "2020-03");
    let out = t.lavd_with_config(&["keys", "destroy", "--kid", "2020-03"]);
    let stderr = assert_fails_with(&out, 1, "key_missing_before_destruction");
    assert!(
        stderr.contains("escrow key 2020-03 destroyed (retention)"),
        "{stderr}"
    );
    let listing = assert_ok(&t.lavd_with_config(&["keys", "list", "--all"]));
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("2020-03\t") && l.contains("\tdestroyed ")),
        "{listing}"
    );
}

/// Two retention jobs at once (OPERATIONS allows it: a racing second
/// destruction only finishes on the token). Job A finds the private key,
/// then its `C_DestroyObject` is held (the fault module's `hang`) while job
/// B destroys the pair; released, A's call meets an object that is gone
/// (`CKR_OBJECT_HANDLE_INVALID`). Both jobs succeed: the key is gone, which
/// is all either was asked. Before, A failed `hsm_unavailable` (exit 1).
#[test]
fn two_retention_jobs_at_once_both_succeed() {
    let t = TestToken::new();
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with_module(&softhsm_tests::shim_module_path(), &shim.hsm_env());
    let through_shim = t.path("lavd-shim.toml");
    std::fs::copy(t.config(), &through_shim).unwrap();
    t.write_config("");
    // The key that signs the log, as on every lavd token: the job that
    // finds the destruction recorded proves its leaf in the log.
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    generate_past_retention(&t);

    shim.set("fault = hang\nfault_calls = C_DestroyObject\n");
    let a = softhsm_tests::lavd_command(&[
        "keys",
        "destroy",
        "--kid",
        "2020-01",
        "--config",
        through_shim.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    assert!(
        softhsm_tests::faults::wait_until(std::time::Duration::from_secs(30), || shim.faults()
            >= 1),
        "job A never reached C_DestroyObject"
    );
    assert_ok(&t.lavd_with_config(&["keys", "destroy", "--kid", "2020-01"]));
    assert!(!t.holds_escrow_key("2020-01"));

    shim.set("");
    let a = a.wait_with_output().unwrap();
    assert_ok(&a);
    assert!(!t.holds_escrow_key("2020-01"));
}

#[test]
fn audit_key_is_ed25519_sign_only_and_non_extractable() {
    let t = TestToken::new();
    let jwk: serde_json::Value =
        serde_json::from_str(&assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]))).unwrap();
    assert_eq!(jwk["kty"], "OKP");
    assert_eq!(jwk["crv"], "Ed25519");
    let session = t.session();
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"lav-audit".to_vec()),
        ])
        .unwrap()[0];
    let info = session
        .get_attribute_info(key, &[AttributeType::Value])
        .unwrap();
    assert!(matches!(info[0], AttributeInfo::Sensitive), "{info:?}");
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Sign,
                AttributeType::SignRecover,
                AttributeType::Derive,
                AttributeType::Decrypt,
                AttributeType::NeverExtractable,
                AttributeType::Copyable,
                AttributeType::Modifiable,
            ],
        )
        .unwrap();
    assert_eq!(
        format!("{attrs:?}"),
        format!(
            "{:?}",
            [
                Attribute::Sign(true),
                Attribute::SignRecover(false),
                Attribute::Derive(false),
                Attribute::Decrypt(false),
                Attribute::NeverExtractable(true),
                Attribute::Copyable(false),
                Attribute::Modifiable(false)
            ]
        )
    );
    assert!(session.copy_object(key, &[]).is_err());
    // A second one under the taken label: the operator's matter, not an
    // outage (it was `hsm_unavailable`, which invites a retry).
    let stderr = assert_fails_with(
        &t.lavd_with_config(&["keys", "generate-audit"]),
        1,
        "key_label_taken",
    );
    assert!(stderr.contains("already exists on the token"), "{stderr}");
}

#[test]
fn a_bad_config_exits_64_naming_file_and_field() {
    let t = TestToken::new();
    t.write_config("[bogus]\nx = 1\n");
    let out = t.lavd_with_config(&["keys", "list"]);
    let stderr = assert_fails_with(&out, 64, "bad_config");
    assert!(
        stderr.contains("lavd.toml") && stderr.contains("bogus"),
        "{stderr}"
    );

    let t = TestToken::new();
    std::fs::write(
        t.config(),
        std::fs::read_to_string(t.config())
            .unwrap()
            .replace("token_label", "slot = 0\n#"),
    )
    .unwrap();
    let stderr = assert_fails_with(&t.lavd_with_config(&["keys", "list"]), 64, "bad_config");
    assert!(
        stderr.contains("hsm.slot") && stderr.contains("slot numbers change"),
        "{stderr}"
    );
}

#[test]
fn expired_keys_are_destroyed_by_the_daily_job_and_listed_with_their_state() {
    let t = TestToken::new();
    let gen = |kid: &str, nb: &str, na: &str, da: &str| {
        assert_ok(&softhsm_tests::generate_key_for(&t, kid, [nb, na, da]))
    };
    // Printed with its PROTOCOL §2 members though it is never published.
    let printed: serde_json::Value = serde_json::from_str(&gen(
        "2020-01",
        "2020-01-01T00:00:00Z",
        "2020-02-01T00:00:00Z",
        "2021-01-01T00:00:00Z",
    ))
    .unwrap();
    assert_eq!(
        (&printed["kid"], &printed["use"], &printed["not_after"]),
        (
            &serde_json::json!("2020-01"),
            &serde_json::json!("enc"),
            &serde_json::json!("2020-02-01T00:00:00Z")
        ),
        "{printed}"
    );
    gen(
        "2020-02",
        "2020-02-01T00:00:00Z",
        "2020-03-01T00:00:00Z",
        "2021-02-01T00:00:00Z",
    );
    gen(
        "2099-01",
        "2099-01-01T00:00:00Z",
        "2099-02-01T00:00:00Z",
        "2100-01-01T00:00:00Z",
    );
    let listing = assert_ok(&t.lavd_with_config(&["keys", "list", "--all"]));
    assert_eq!(
        listing.matches("due for destruction").count(),
        2,
        "{listing}"
    );
    assert!(listing.contains("not yet valid"), "{listing}");

    // The retention job and the listing on a store path that holds no
    // store (here the empty mount point of a volume not mounted) fail
    // `store_missing`, naming it, and make nothing there. Before, they made
    // and migrated an empty store, found nothing due, and exited 0.
    std::fs::create_dir(t.path("unmounted")).unwrap();
    let config = std::fs::read_to_string(t.config()).unwrap();
    assert!(config.contains("\"lavd.db\""), "{config}");
    let unmounted = config.replace("\"lavd.db\"", "\"unmounted/lavd.db\"");
    std::fs::write(t.config(), unmounted).unwrap();
    // A kid no generation could have made: `invalid_kid`, not looked up.
    let stderr = assert_fails_with(
        &t.lavd_with_config(&[
            "keys", "destroy", "--kid", "2020 01", "--force", "--reason", "x",
        ]),
        1,
        "invalid_kid",
    );
    assert!(stderr.contains("2020 01"), "{stderr}");
    for command in [
        &["keys", "destroy", "--expired"][..],
        &["keys", "list"],
        &["keys", "list", "--all"],
        &["keys", "destroy", "--kid", "2020-01"],
    ] {
        let stderr = assert_fails_with(&t.lavd_with_config(command), 1, "store_missing");
        assert!(
            stderr.contains("unmounted/lavd.db does not exist"),
            "{command:?}: {stderr}"
        );
    }
    assert_eq!(
        std::fs::read_dir(t.path("unmounted")).unwrap().count(),
        0,
        "something was made in the mount point"
    );
    std::fs::write(t.config(), &config).unwrap();

    // A forced destruction needs a reason that says something.
    assert_fails_with(
        &t.lavd_with_config(&[
            "keys", "destroy", "--kid", "2099-01", "--force", "--reason", "  ",
        ]),
        1,
        "reason_required",
    );

    assert_ok(&t.lavd_with_config(&["keys", "destroy", "--expired"]));
    assert!(!t.holds_escrow_key("2020-01"));
    assert!(!t.holds_escrow_key("2020-02"));
    assert!(t.holds_escrow_key("2099-01"));
    let listing = assert_ok(&t.lavd_with_config(&["keys", "list", "--all"]));
    assert_eq!(listing.matches("destroyed ").count(), 2, "{listing}");
    // Nothing left to do: the job is idempotent.
    assert_ok(&t.lavd_with_config(&["keys", "destroy", "--expired"]));
}

#[test]
fn an_interrupted_destruction_is_finished_by_running_it_again() {
    let t = TestToken::new();
    // The key that signs the log, in which the destruction's leaf is proved.
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    ));
    assert_ok(&softhsm_tests::generate_key(
        &t,
        "2027-02",
        "2030-01-01T00:00:00Z",
    ));
    // The store already says destroyed and the log holds its leaf (the
    // first step), the token still holds the key (the crash came before
    // the second).
    let interrupt = |kid: &str| t.interrupt_destruction(kid);
    // The daily job finishes it on the token.
    interrupt("2027-02");
    assert!(t.holds_escrow_key("2027-02"));
    let out = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    assert_ok(&out);
    assert!(!t.holds_escrow_key("2027-02"));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("escrow key 2027-02: finished an interrupted destruction"),
        "{out:?}"
    );
    assert!(t.holds_escrow_key(KID));
    // So does `--kid`, run again.
    interrupt(KID);
    assert!(t.holds_escrow_key(KID));
    // Not published while the store says destroyed.
    let jwks = assert_ok(&t.lavd_with_config(&["keys", "list"]));
    assert!(!jwks.contains(KID), "{jwks}");
    assert_ok(&t.lavd_with_config(&[
        "keys", "destroy", "--kid", KID, "--force", "--reason", "finish",
    ]));
    assert!(!t.holds_escrow_key(KID));
}

#[test]
fn a_public_key_swapped_in_the_store_is_never_published() {
    let t = TestToken::new();
    assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    ));
    assert_ok(&softhsm_tests::generate_key(
        &t,
        "2027-01",
        "2030-01-01T00:00:00Z",
    ));
    // An attacker with write access to the database swaps in their own key.
    let attacker = lavd::jwk::P256PrivateKey::generate().unwrap();
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    db.execute(
        "UPDATE escrow_keys SET public_sec1 = ?1 WHERE kid = ?2",
        rusqlite::params![attacker.public().sec1().as_slice(), KID],
    )
    .unwrap();
    drop(db);
    let jwks: serde_json::Value =
        serde_json::from_str(&assert_ok(&t.lavd_with_config(&["keys", "list"]))).unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["2027-01"]);
}

/// A generation that fails after the HSM made the pair leaves nothing on
/// the token, so the same kid can be generated once the fault is gone:
/// through the fault module, reading the new public key fails (the device
/// error counts as a lost session, and is not retried, which would meet
/// the pair just made); and, on plain SoftHSM, the store refuses the record.
#[test]
fn a_failed_generation_leaves_no_key_pair_behind() {
    let t = TestToken::new();
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with_module(&softhsm_tests::shim_module_path(), &shim.hsm_env());
    shim.set("fault = device_error\nfault_calls = C_GetAttributeValue");
    let out = softhsm_tests::generate_key(&t, KID, "2030-01-01T00:00:00Z");
    assert_fails_with(&out, 1, "hsm_unavailable");
    assert!(shim.faults() > 0);
    assert!(!t.holds_escrow_key(KID), "a pair was left on the token");
    shim.set("");
    assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    ));
    assert!(t.holds_escrow_key(KID));

    // The store refuses the record (a trigger stands in for a failing
    // database): the pair the HSM made is deleted again.
    t.write_config("");
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON escrow_keys BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .unwrap();
    let out = softhsm_tests::generate_key(&t, "2027-03", "2030-01-01T00:00:00Z");
    let stderr = assert_fails_with(&out, 1, "store_unavailable");
    assert!(stderr.contains("refused by the test"), "{stderr}");
    assert!(!t.holds_escrow_key("2027-03"), "an orphan pair was left");
    db.execute_batch("DROP TRIGGER refuse").unwrap();
    assert_ok(&softhsm_tests::generate_key(
        &t,
        "2027-03",
        "2030-01-01T00:00:00Z",
    ));
}

/// Generates escrow key `2020-01`, whose retention ended in 2021, with the
/// CLI of `t`'s `lavd.toml`.
fn generate_past_retention(t: &TestToken) {
    generate_past_retention_as(t, "2020-01");
}

/// [`generate_past_retention`] under another kid.
fn generate_past_retention_as(t: &TestToken, kid: &str) {
    assert_ok(&t.lavd_with_config(&[
        "keys",
        "generate",
        "--kid",
        kid,
        "--not-before",
        "2020-01-01T00:00:00Z",
        "--not-after",
        "2020-02-01T00:00:00Z",
        "--destroy-after",
        "2021-01-01T00:00:00Z",
    ]));
}

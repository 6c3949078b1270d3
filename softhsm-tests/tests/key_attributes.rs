//! A private key under an escrow key's label that could leave the token
//! (`CKA_EXTRACTABLE`, not `CKA_SENSITIVE`: made or imported outside lavd,
//! e.g. by a vendor tool's defaults or an unwrap from a backup), whose
//! public half and store row agree with it, on a real SoftHSM token with
//! the real daemon: the daemon checks what the token says of the key
//! before it uses it, so the key is not published and its envelopes are
//! denied `open_failed`; the batch's other key still opens. Before, the
//! pair check passed and the key was published and opened with. An audit
//! key that could be read off the token stops the daemon.

use cryptoki::object::{Attribute, KeyType, ObjectClass};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::TestToken;
use time::OffsetDateTime;

/// One envelope sealed a minute ago to each `(key, kid)`, unwrapped by
/// the agency under a fresh warrant `id` for all of them: the reply's
/// statuses, in order.
fn unwrapped(
    c: &vault::Clients,
    id: &str,
    sealed: &[(&lavd::jwk::P256PublicKey, &str)],
) -> Vec<String> {
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), sealed.len() as u64));
    let sealed_at = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let envelopes: Vec<serde_json::Value> = sealed
        .iter()
        .zip(1u8..)
        .map(|((key, kid), n)| vault::seal(key, kid, TARGET, sealed_at, &n.to_string(), &[n; 32]))
        .collect();
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let reply: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    vault::statuses(&reply)
}

/// Replaces escrow key E-1's pair on `t`'s token, with the PIN, by one
/// made outside lavd from the scalar 5: derive only, as lavd's own, with
/// `odd` added to its private half and `odd_public` to its public half;
/// the store row made to agree. Returns the new public key.
fn replace_e1<const N: usize, const M: usize>(
    t: &TestToken,
    odd: [Attribute; N],
    odd_public: [Attribute; M],
) -> lavd::jwk::P256PublicKey {
    let label = "lav-escrow:E-1";
    let session = t.session();
    for handle in session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
    {
        session.destroy_object(handle).unwrap();
    }
    let (mut public, mut private) = softhsm_tests::p256_key_objects(label, &[5; 32], true);
    public.extend(odd_public);
    session.create_object(&public).unwrap();
    private.extend(softhsm_tests::only_usage(false));
    private.extend(odd);
    session.create_object(&private).unwrap();
    drop(session);
    let point = p256::SecretKey::from_slice(&[5; 32])
        .unwrap()
        .public_key()
        .to_encoded_point(false);
    rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .execute(
            "UPDATE escrow_keys SET public_sec1 = ?1 WHERE kid = 'E-1'",
            [point.as_bytes()],
        )
        .unwrap();
    lavd::jwk::P256PublicKey::from_sec1(point.as_bytes()).unwrap()
}

#[test]
fn an_exportable_private_key_under_a_label_is_neither_published_nor_used() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let sound = vault::generate_escrow_key(&t, "E-2");

    // E-1's pair replaced, with the PIN, by one whose private half can be
    // read off the token (derive only, as lavd's own: what is wrong is only
    // that); the store row made to agree.
    let replaced = replace_e1(
        &t,
        [Attribute::Sensitive(false), Attribute::Extractable(true)],
        [],
    );

    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    // Not published; the other key is.
    let r = c.provider.get("/v1/keys");
    assert_eq!(r.status, 200, "{}", r.text());
    let set: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(vault::kids(&set), ["E-2"], "{}", r.text());
    assert_eq!(vault::published_key(&c.provider, "E-2"), sound);

    // An envelope sealed to the replaced key (a provider that kept it from
    // before, or one told of it otherwise) is not opened; E-2's is.
    let sealed = [(&replaced, "E-1"), (&sound, "E-2")];
    assert_eq!(
        unwrapped(&c, "ATTRIBUTES-1", &sealed),
        ["open_failed", "ok"]
    );
    let log = daemon.stderr();
    assert!(
        log.contains("lav-escrow:E-1")
            && log.contains("its CKA_VALUE can be read")
            && log.contains("CKA_SENSITIVE is false")
            && log.contains("CKA_EXTRACTABLE is true"),
        "{log}"
    );
}

/// An audit signing key that could be read off the token stops `lavd
/// serve` before it signs anything, with the code and what is wrong.
#[test]
fn an_exportable_audit_key_stops_the_daemon() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let session = t.session();
    let seed = [9u8; 32];
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    let mut ec_point = vec![0x04, 0x20];
    ec_point.extend_from_slice(&public);
    let common = |class| {
        vec![
            Attribute::Class(class),
            Attribute::KeyType(KeyType::EC_EDWARDS),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(b"lav-audit".to_vec()),
            // DER of the OID id-Ed25519 (RFC 8410).
            Attribute::EcParams(vec![0x06, 0x03, 0x2b, 0x65, 0x70]),
        ]
    };
    let mut public_half = common(ObjectClass::PUBLIC_KEY);
    public_half.push(Attribute::EcPoint(ec_point));
    session.create_object(&public_half).unwrap();
    let mut private = common(ObjectClass::PRIVATE_KEY);
    private.extend([
        Attribute::Value(seed.to_vec()),
        Attribute::Sign(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(false),
    ]);
    session.create_object(&private).unwrap();
    drop(session);
    // The harness makes an audit key unless told one is there.
    std::fs::write(t.path("audit-key-made"), "").unwrap();
    let (status, stderr) = Daemon::try_start(&t).expect_err("a start with an exportable audit key");
    assert_eq!(status.and_then(|st| st.code()), Some(1), "{stderr}");
    assert!(
        stderr.contains("lavd: key_attributes_unsafe: ")
            && stderr.contains("lav-audit")
            && stderr.contains("CKA_SENSITIVE is false"),
        "{stderr}"
    );
}

/// Private keys under escrow labels that lavd would not make: one on
/// another curve (P-384, derive-only, sensitive), one that may also sign,
/// one that could never be destroyed. Each is withheld from the published
/// set and its envelopes are denied `open_failed`, while the sound key is
/// published and opens. Before, the P-384 key passed the attribute check;
/// the pair check withheld it from `GET /v1/keys`, but the unwrap path
/// (which makes no pair check) derived with it, failed as an HSM error, and
/// answered the whole batch 503 `hsm_unavailable`; the two others were
/// published and used (the signing one with a warning).
#[test]
fn keys_of_another_curve_usage_or_lifetime_are_neither_published_nor_used() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let original = vault::generate_escrow_key(&t, "E-1");
    vault::generate_escrow_key(&t, "E-2");
    vault::generate_escrow_key(&t, "E-3");
    let sound = vault::generate_escrow_key(&t, "E-4");
    let session = t.session();
    let clear = |kid: &str| {
        let label = format!("lav-escrow:{kid}");
        for handle in session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .unwrap()
        {
            session.destroy_object(handle).unwrap();
        }
        label
    };
    let mut derive_only = vec![Attribute::Sensitive(true), Attribute::Extractable(false)];
    derive_only.extend(softhsm_tests::only_usage(false));
    // E-1: P-384 (RFC 5480's OID secp384r1).
    let label = clear("E-1");
    let p384 = vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    private.extend(derive_only.iter().cloned());
    session
        .generate_key_pair(
            &cryptoki::mechanism::Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::EcParams(p384),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
            &private,
        )
        .unwrap();
    // E-2 may sign too; E-3 can never be destroyed. Their store rows made
    // to agree with them.
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let mut replaced = Vec::new();
    for (kid, scalar, odd) in [
        ("E-2", [6u8; 32], Attribute::Sign(true)),
        ("E-3", [7u8; 32], Attribute::Destroyable(false)),
    ] {
        let label = clear(kid);
        let (public, mut private) = softhsm_tests::p256_key_objects(&label, &scalar, true);
        session.create_object(&public).unwrap();
        private.extend(derive_only.iter().cloned());
        private.retain(|a| a.attribute_type() != odd.attribute_type());
        private.push(odd);
        session.create_object(&private).unwrap();
        let point = p256::SecretKey::from_slice(&scalar)
            .unwrap()
            .public_key()
            .to_encoded_point(false);
        db.execute(
            "UPDATE escrow_keys SET public_sec1 = ?1 WHERE kid = ?2",
            rusqlite::params![point.as_bytes(), kid],
        )
        .unwrap();
        replaced.push(lavd::jwk::P256PublicKey::from_sec1(point.as_bytes()).unwrap());
    }
    drop(session);

    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let r = c.provider.get("/v1/keys");
    assert_eq!(r.status, 200, "{}", r.text());
    let set: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(vault::kids(&set), ["E-4"], "{}", r.text());

    let sealed = [
        (&original, "E-1"),
        (&replaced[0], "E-2"),
        (&replaced[1], "E-3"),
        (&sound, "E-4"),
    ];
    assert_eq!(
        unwrapped(&c, "ATTRIBUTES-2", &sealed),
        ["open_failed", "open_failed", "open_failed", "ok"]
    );
    let log = daemon.stderr();
    for said in [
        "it is not an EC key on P-256",
        "CKA_SIGN is true: it could serve another operation",
        "CKA_DESTROYABLE is false",
    ] {
        assert!(log.contains(said), "{said}: {log}");
    }
}

/// An audit key of another type (a P-256 signing key under the audit
/// label, sensitive and sign-only) stops `lavd serve` before it signs
/// anything, saying it is not an EdDSA key on Ed25519.
#[test]
fn an_audit_key_of_another_type_stops_the_daemon() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let session = t.session();
    let (public, mut private) = softhsm_tests::p256_key_objects("lav-audit", &[8; 32], true);
    session.create_object(&public).unwrap();
    private.extend(softhsm_tests::only_usage(true));
    private.extend([Attribute::Sensitive(true), Attribute::Extractable(false)]);
    session.create_object(&private).unwrap();
    drop(session);
    // The harness makes an audit key unless told one is there.
    std::fs::write(t.path("audit-key-made"), "").unwrap();
    let (status, stderr) =
        Daemon::try_start(&t).expect_err("a start with an audit key of another type");
    assert_eq!(status.and_then(|st| st.code()), Some(1), "{stderr}");
    assert!(
        stderr.contains("lavd: key_attributes_unsafe: ")
            && stderr.contains("lav-audit")
            && stderr.contains("it is not an EdDSA key on Ed25519"),
        "{stderr}"
    );
}

/// A key pair the token made otherwise than its template asked (through
/// the fault module, which puts other values in a template, as a token
/// that ignores part of one would): a private key not private (lavd finds
/// and destroys only private objects, so it would never be destroyed at
/// its retention's end), a session object (gone with the CLI's session,
/// its kid recorded), or able to sign with recovery; a public half that is
/// a session object (the key withheld for good once the CLI ends) or not
/// private (destroyable without the PIN). `lavd keys generate` refuses
/// each with `key_attributes_unsafe` naming the attribute, discards the
/// pair (the kid can be generated again) and records nothing. Before, the
/// private key's first two and the public half's were recorded, and the
/// third was only warned of.
#[test]
fn a_new_key_the_token_made_otherwise_than_asked_is_refused_and_discarded() {
    let t = TestToken::new();
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with_module(&softhsm_tests::shim_module_path(), &shim.hsm_env());
    // Made as asked: the audit key and a first escrow key.
    vault::generate_escrow_key(&t, "E-0");
    for (i, (made, named)) in [
        (
            "keypair_private = CKA_PRIVATE:false",
            "CKA_PRIVATE is not true",
        ),
        ("keypair_private = CKA_TOKEN:false", "CKA_TOKEN is not true"),
        (
            "keypair_private = CKA_SIGN_RECOVER:true",
            "CKA_SIGN_RECOVER is true",
        ),
        (
            "keypair_public = CKA_TOKEN:false",
            "its public half's CKA_TOKEN is not true",
        ),
        (
            "keypair_public = CKA_PRIVATE:false",
            "its public half's CKA_PRIVATE is not true",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let kid = format!("E-{}", i + 1);
        shim.set(made);
        let now = OffsetDateTime::now_utc();
        let at = |d: time::Duration| lavd::codec::format_time(now + d);
        let out = t.lavd_with_config(&[
            "keys",
            "generate",
            "--kid",
            &kid,
            "--not-before",
            &at(-time::Duration::days(1)),
            "--not-after",
            &at(time::Duration::days(30)),
            "--destroy-after",
            &at(time::Duration::days(365)),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{made}: generated\n{stderr}");
        assert!(
            stderr.contains("lavd: key_attributes_unsafe: ") && stderr.contains(named),
            "{made}: {stderr}"
        );
        let listed = softhsm_tests::assert_ok(&t.lavd_with_config(&["keys", "list"]));
        assert!(!listed.contains(&kid), "{made}: recorded\n{listed}");
        // Discarded: the same kid is made again, as asked, once the token
        // keeps its templates.
        shim.set("");
        vault::generate_escrow_key(&t, &kid);
    }
}

/// A key whose private half on the token says `CKA_DESTROYABLE` false
/// (made or restored outside lavd) cannot be destroyed by the token:
/// `lavd keys destroy` refuses it `key_not_destroyable` before it records
/// anything, and the key stays on the token, live in the store, with no
/// `key_destroyed` leaf. Before, the mark and its leaf were committed, then
/// the token refused (`CKR_ACTION_PROHIBITED`, answered as a retryable
/// `hsm_unavailable`): the log said destroyed a key that stayed.
#[test]
fn a_key_the_token_cannot_destroy_is_refused_before_anything_is_recorded() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    replace_e1(&t, [Attribute::Destroyable(false)], []);
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let leaves = |db: &rusqlite::Connection| -> i64 {
        db.query_row("SELECT count(*) FROM audit_leaves", [], |r| r.get(0))
            .unwrap()
    };
    let before = leaves(&db);

    let out = t.lavd_with_config(&[
        "keys", "destroy", "--kid", "E-1", "--force", "--reason", "seized",
    ]);
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "key_not_destroyable");
    assert!(
        stderr.contains(
            "escrow key \"E-1\": 1 of its private key objects on the token say CKA_DESTROYABLE \
             false"
        ),
        "{stderr}"
    );
    assert!(t.holds_escrow_key("E-1"));
    let destroyed: Option<String> = db
        .query_row(
            "SELECT destroyed_at FROM escrow_keys WHERE kid = 'E-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(destroyed, None);
    assert_eq!(leaves(&db), before, "a refused destruction logged a leaf");
}

/// A public half that says `CKA_DESTROYABLE` false does not stop a
/// destruction: a public key opens nothing, and refusing for it would keep
/// in use a key an operator is destroying. The private half goes, the
/// destruction is recorded, and the public half left is said in a warning.
#[test]
fn a_public_half_the_token_cannot_destroy_does_not_stop_a_destruction() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    replace_e1(&t, [], [Attribute::Destroyable(false)]);
    let out = t.lavd_with_config(&[
        "keys", "destroy", "--kid", "E-1", "--force", "--reason", "seized",
    ]);
    softhsm_tests::assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the token refuses to destroy a public key object under the label"),
        "{stderr}"
    );
    assert!(!t.holds_escrow_key("E-1"));
    let destroyed: Option<String> = rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .query_row(
            "SELECT destroyed_at FROM escrow_keys WHERE kid = 'E-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(destroyed.is_some());
}

/// A token whose policy alone refuses `C_DestroyObject`
/// (`CKR_ACTION_PROHIBITED`, the fault module standing in for it: no
/// attribute says so beforehand) fails the destruction `key_not_destroyable`,
/// not a retryable `hsm_unavailable`; the store's mark and its leaf were
/// already committed (the store, then the HSM), so lavd uses the key no
/// more, and a run once the token allows it finishes the destruction.
#[test]
fn a_destruction_the_tokens_policy_refuses_is_key_not_destroyable() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with(
        &softhsm_tests::shim_module_path(),
        2,
        &format!("{}{}", serve_config(&vault::roles_toml()), shim.hsm_env()),
    );
    // The key that signs the log, in which the second run proves the
    // destruction's leaf before finishing it.
    softhsm_tests::assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    vault::generate_escrow_key(&t, "E-1");
    shim.set("fault = action_prohibited\nfault_calls = C_DestroyObject");
    let destroy = || {
        t.lavd_with_config(&[
            "keys", "destroy", "--kid", "E-1", "--force", "--reason", "seized",
        ])
    };
    let stderr = softhsm_tests::assert_fails_with(&destroy(), 1, "key_not_destroyable");
    assert!(
        stderr.contains("the token refuses to destroy the key object under \"lav-escrow:E-1\""),
        "{stderr}"
    );
    assert!(shim.faults() >= 1);
    assert!(t.holds_escrow_key("E-1"));
    let destroyed = || -> Option<String> {
        rusqlite::Connection::open(t.path("lavd.db"))
            .unwrap()
            .query_row(
                "SELECT destroyed_at FROM escrow_keys WHERE kid = 'E-1'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert!(destroyed().is_some(), "the mark goes first");

    shim.set("");
    softhsm_tests::assert_ok(&destroy());
    assert!(!t.holds_escrow_key("E-1"));
}

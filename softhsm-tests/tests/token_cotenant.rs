//! Another tenant of the token: a process that can open sessions on it but
//! does not hold the user PIN (on a shared network HSM partition, another
//! application; here, this test's own process, which never logs in, and
//! OpenSC's `pkcs11-tool` without `--login`).
//!
//! PKCS#11 lets such a process read, create and destroy every object that
//! is not `CKA_PRIVATE`. So every object `lavd` makes is private, and
//! `lavd` looks only at private objects under its labels:
//!
//! - the escrow key's public half is invisible to the tenant, so it can
//!   neither be read nor deleted (before, `pkcs11-tool --delete-object`
//!   without the PIN removed it, and `/v1/keys` stopped publishing the key);
//! - decoys the tenant writes under the key's label, a public key and a
//!   non-private "private key" holding the tenant's own key, change
//!   nothing: the daemon still publishes the real key and opens an envelope
//!   sealed to it (before, the lookups found two objects and refused).

use cryptoki::object::{Attribute, ObjectClass};
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{assert_ok, harness, module_path, TestToken};
use time::OffsetDateTime;

const LABEL: &str = "lav-escrow:E-1";

/// `pkcs11-tool` on the token without the PIN.
fn pkcs11_tool(t: &TestToken, args: &[&str]) -> std::process::Output {
    std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", harness().conf())
        .arg("--module")
        .arg(module_path())
        .args(["--token-label", &t.label])
        .args(args)
        .output()
        .expect("pkcs11-tool (apt-get install opensc)")
}

#[test]
fn a_tenant_without_the_pin_can_neither_remove_nor_shadow_the_escrow_key() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let generated = vault::generate_escrow_key(&t, "E-1");

    // Unseen without the PIN, so not deletable either.
    let listing = assert_ok(&pkcs11_tool(&t, &["--list-objects"]));
    assert!(!listing.contains(LABEL), "{listing}");
    let out = pkcs11_tool(
        &t,
        &["--delete-object", "--type", "pubkey", "--label", LABEL],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("object not found"),
        "{stderr}"
    );

    // Decoys under the same label, made in a session that never logged in.
    let session = harness()
        .pkcs11()
        .open_rw_session(t.slot())
        .expect("a session without the PIN");
    let (mut public, mut private) = softhsm_tests::p256_key_objects(LABEL, &[7; 32], false);
    public.push(Attribute::Id(b"E-1".to_vec()));
    session.create_object(&public).expect("a public decoy");
    private.extend([Attribute::Id(b"E-1".to_vec()), Attribute::Derive(true)]);
    session
        .create_object(&private)
        .expect("a non-private decoy");
    let seen = session
        .find_objects(&[Attribute::Label(LABEL.as_bytes().to_vec())])
        .expect("find");
    assert_eq!(seen.len(), 2, "the tenant sees its two decoys only");
    drop(session);

    // The daemon starts after the decoys, so no handle of the real key is
    // cached from before them.
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let published = vault::published_key(&c.provider, "E-1");
    assert_eq!(published, generated);

    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("COTENANT-1", recipient.public(), 1));
    let envelope = vault::seal(
        &published,
        "E-1",
        TARGET,
        OffsetDateTime::now_utc() - time::Duration::minutes(1),
        "cotenant",
        b"the real key opens this",
    );
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let reply: serde_json::Value = serde_json::from_slice(&r.body).expect("reply");
    assert_eq!(vault::statuses(&reply), ["ok"]);
}
/// A tenant of the token without the PIN can write public objects under a
/// label lavd will use (monthly kids are predictable): they are not lavd's
/// (not `CKA_PRIVATE`), so they do not make the kid "taken".
#[test]
fn a_public_decoy_under_the_label_does_not_block_a_generation() {
    let t = TestToken::new();
    let session = harness()
        .pkcs11()
        .open_rw_session(t.slot())
        .expect("a session without the PIN");
    softhsm_tests::foreign_pair(&session, "lav-escrow:E-2", false);
    drop(session);
    vault::generate_escrow_key(&t, "E-2");
    assert!(private_key_of_ours(&t, "E-2"));
}

/// Whether the token holds lavd's (`CKA_PRIVATE`) private key for `kid`.
fn private_key_of_ours(t: &TestToken, kid: &str) -> bool {
    let found = t
        .session()
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(format!("lav-escrow:{kid}").into_bytes()),
            Attribute::Private(true),
        ])
        .unwrap();
    found.len() == 1
}

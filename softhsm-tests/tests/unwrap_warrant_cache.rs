//! The daemon keeps the warrants it verified (`lavd::warrant::cache`), so
//! an agency that sends the same warrant again skips its signature checks.
//! Against a real `lavd serve`, a warrant it keeps is still refused with
//! its exact code when it is revoked, when it expires, when another agency
//! sends it, and when a reload removes an authority that signed it.

use rustix::process::Signal;
use softhsm_tests::server::{authorities, serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Clients, Parties, TARGET};
use softhsm_tests::TestToken;
use time::{Duration, OffsetDateTime};

/// Holds the agency role too, but the warrants name `vault::AGENCY`.
const OTHER_AGENCY: &str = "spiffe://agency.example/other-unit";

struct Setup {
    t: TestToken,
    pki: Pki,
    daemon: Daemon,
    c: Clients,
    escrow: lavd::jwk::P256PublicKey,
}

fn setup() -> Setup {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "{}\"{OTHER_AGENCY}\" = [\"agency\"]\n",
        vault::roles_toml()
    )));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    Setup {
        t,
        pki,
        daemon,
        c,
        escrow,
    }
}

impl Setup {
    /// `{"warrant", "envelopes"}` with one fresh envelope for `TARGET`.
    fn body(&self, warrant: &serde_json::Value) -> serde_json::Value {
        let envelope = vault::seal(
            &self.escrow,
            "E-1",
            TARGET,
            OffsetDateTime::now_utc() - Duration::hours(1),
            "m",
            &[7; 32],
        );
        serde_json::json!({"warrant": warrant, "envelopes": [envelope]})
    }

    fn opens(&self, warrant: &serde_json::Value) {
        let r = vault::post(&self.c.agency, "/v1/unwrap", &self.body(warrant));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    }

    fn refused(&self, warrant: &serde_json::Value, code: &str) -> String {
        vault::post(&self.c.agency, "/v1/unwrap", &self.body(warrant)).assert_error(403, code)
    }
}

#[test]
fn a_kept_warrant_is_refused_when_revoked_expired_or_sent_by_another_agency() {
    let s = setup();
    let recipient = vault::recipient();
    let other = s
        .pki
        .client(s.daemon.api, Some(&s.pki.clients.identity(OTHER_AGENCY)));

    // Another agency, before and after the warrant is kept: one code.
    let warrant = vault::double_lock(&vault::claims("W-KEPT", recipient.public(), 100));
    vault::post(&other, "/v1/unwrap", &s.body(&warrant)).assert_error(403, "agency_mismatch");
    s.opens(&warrant);
    s.opens(&warrant);
    vault::post(&other, "/v1/unwrap", &s.body(&warrant)).assert_error(403, "agency_mismatch");
    s.opens(&warrant);

    // Revoked after being kept.
    let r = vault::post(
        &s.c.admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": "W-KEPT", "reason": "quashed on review"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let message = s.refused(&warrant, "warrant_revoked");
    assert!(message.contains("W-KEPT"), "{message}");

    // Expires while kept. Eight seconds leave room for two requests on a
    // loaded machine; RFC 3339 times here have whole seconds.
    let now = OffsetDateTime::now_utc();
    let expires = now + Duration::seconds(8);
    let mut claims = vault::claims("W-SHORT", recipient.public(), 100);
    claims["expires"] = vault::at(now, Duration::seconds(8)).into();
    let short = vault::double_lock(&claims);
    s.opens(&short);
    s.opens(&short);
    let left = expires + Duration::seconds(2) - OffsetDateTime::now_utc();
    if left.is_positive() {
        std::thread::sleep(left.unsigned_abs());
    }
    s.refused(&short, "warrant_expired");
}

#[test]
fn a_reload_that_removes_a_signer_refuses_a_kept_warrant() {
    let s = setup();
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-RELOAD", recipient.public(), 100));
    s.opens(&warrant);
    s.opens(&warrant);

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

    let message = s.refused(&warrant, "unknown_authority");
    assert!(message.contains(&judicial), "{message}");
    // A warrant the executive alone signed is what opens now.
    let one = softhsm_tests::server::Authorities::sign(
        &vault::claims("W-ONE", recipient.public(), 100),
        &[&authorities().executive],
    );
    s.opens(&one);
}

//! What the trust reload tests share: the signal that reloads a daemon,
//! the `authorities_loaded` leaves it wrote, a one-signature request, and
//! the config edits that change the trust.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use rustix::process::Signal;
use softhsm_tests::server::{authorities, Authorities, Daemon};
use softhsm_tests::vault::{self, TARGET};
use softhsm_tests::TestToken;
use time::OffsetDateTime;

pub fn reload(daemon: &Daemon) {
    daemon.signal(Signal::HUP);
    daemon.expect_notify("RELOADING=1");
    daemon.expect_notify("READY=1");
}

pub fn loaded(auditor: &softhsm_tests::server::Client) -> Vec<serde_json::Value> {
    let size = vault::tree_size(auditor);
    vault::entries(auditor, 0, size)
        .into_iter()
        .filter(|e| e.leaf["event"] == "authorities_loaded")
        .map(|e| e.leaf)
        .collect()
}

/// An unwrap request for one envelope under warrant `id`, signed by the
/// executive alone: refused under the double lock.
pub fn one_signature_request(c: &softhsm_tests::vault::Clients, id: &str) -> serde_json::Value {
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let a = authorities();
    let warrant = Authorities::sign(&vault::claims(id, recipient.public(), 5), &[&a.executive]);
    serde_json::json!({"warrant": warrant, "envelopes": [vault::seal(
        &escrow, "E-1", TARGET, OffsetDateTime::now_utc() - time::Duration::hours(1), "m", &[7; 32],
    )]})
}

/// Rewrites the config so that the policy needs only an executive.
pub fn loosen_policy(t: &TestToken) {
    let config = std::fs::read_to_string(t.config()).unwrap();
    let loosened = config.replace("[[policy.require]]\nrole = \"judicial\"\ncount = 1\n", "");
    assert_ne!(loosened, config);
    std::fs::write(t.config(), loosened).unwrap();
}

/// Rewrites the config without the judicial authority, and so with a policy
/// that needs only an executive.
pub fn remove_the_judicial_authority(t: &TestToken) {
    loosen_policy(t);
    let config = std::fs::read_to_string(t.config()).unwrap();
    let start = config
        .find("[[authorities]]\nkid = \"judicial-1\"")
        .expect("the judicial authority");
    let end = start + config[start..].find("\n\n").expect("its end") + 2;
    let mut without = config.clone();
    without.replace_range(start..end, "");
    std::fs::write(t.config(), without).unwrap();
}

/// Rewrites the config so that the agency's identity has no role.
pub fn take_the_agency_role(t: &TestToken) {
    let config = std::fs::read_to_string(t.config()).unwrap();
    let agency_role = format!("\"{}\" = [\"agency\"]\n", vault::AGENCY);
    assert!(config.contains(&agency_role), "{config}");
    std::fs::write(t.config(), config.replace(&agency_role, "")).unwrap();
}

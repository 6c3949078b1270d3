//! Two generations of one escrow key id at once, through the real `lavd
//! keys generate` on a real SoftHSM token (through the fault module, which
//! holds one generation at the HSM while another application makes its
//! pair), checked from this test process.

use cryptoki::object::{Attribute, ObjectClass};
use softhsm_tests::{assert_fails_with, assert_ok, TestToken};

const KID: &str = "2026-12";

fn generate(t: &TestToken, kid: &str, destroy_after: &str) -> std::process::Output {
    t.lavd_with_config(&[
        "keys",
        "generate",
        "--kid",
        kid,
        "--not-before",
        "2026-12-01T00:00:00Z",
        "--not-after",
        "2027-01-01T00:00:00Z",
        "--destroy-after",
        destroy_after,
    ])
}

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
        let held = s.spawn(|| generate(&t, KID, "2030-01-01T00:00:00Z"));
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
        let winner = assert_ok(&generate(&t, KID, "2030-01-01T00:00:00Z"));
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
    let left = session
        .find_objects(&[Attribute::Label(format!("lav-escrow:{KID}").into_bytes())])
        .unwrap();
    assert!(left.is_empty(), "{} objects left", left.len());
}

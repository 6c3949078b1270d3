//! Two authorities sign a warrant in turn with the real `lavd` binary, and
//! `lavd warrant inspect` accepts it only once both have signed; with one
//! signature it names the missing role.

use softhsm_tests::{assert_fails_with, assert_ok, lavd_command};

fn run(args: &[&str]) -> std::process::Output {
    softhsm_tests::output_within(&mut lavd_command(args), softhsm_tests::CLI_LIMIT)
}

#[test]
fn executive_then_judicial_signature_is_accepted_by_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    assert_ok(&run(&[
        "warrant",
        "keygen",
        "--alg",
        "ES256",
        "--kid",
        "home-office-1",
        "--out",
        &p("exec.jwk"),
        "--public-out",
        &p("exec.pub.jwk"),
    ]));
    assert_ok(&run(&[
        "warrant",
        "keygen",
        "--alg",
        "ES256",
        "--kid",
        "ipc-judicial-3",
        "--out",
        &p("judge.jwk"),
        "--public-out",
        &p("judge.pub.jwk"),
    ]));
    assert_ok(&run(&[
        "warrant",
        "keygen",
        "--alg",
        "ECDH-ES",
        "--kid",
        "agency-recipient",
        "--out",
        &p("recipient.jwk"),
        "--public-out",
        &p("recipient.pub.jwk"),
    ]));
    let authority = |kid: &str, role: &str, file: &str| {
        format!(
            "[[authorities]]\nkid = \"{kid}\"\nrole = \"{role}\"\nalg = \"ES256\"\njwk = '{}'\n\
             valid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2028-01-01T00:00:00Z\"\n\n",
            std::fs::read_to_string(p(file)).unwrap().trim()
        )
    };
    std::fs::write(
        p("trust.toml"),
        format!(
            "{}{}[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n\
             [[policy.require]]\nrole = \"judicial\"\ncount = 1\n",
            authority("home-office-1", "executive", "exec.pub.jwk"),
            authority("ipc-judicial-3", "judicial", "judge.pub.jwk"),
        ),
    )
    .unwrap();

    assert_ok(&run(&[
        "warrant",
        "new",
        "--id",
        "OP-2026-0042",
        "--legal-basis",
        "Investigatory Powers Act 2016 s.19",
        "--agency",
        "spiffe://agency.example/lea",
        "--recipient",
        &p("recipient.pub.jwk"),
        "--target",
        "acct:alice@example.com",
        "--window-from",
        "2026-11-01T00:00:00Z",
        "--window-to",
        "2026-12-01T00:00:00Z",
        "--not-before",
        "2026-11-24T00:00:00Z",
        "--expires",
        "2026-12-24T00:00:00Z",
        "--max-unwraps",
        "10",
        "--out",
        &p("w0.json"),
    ]));
    assert_ok(&run(&[
        "warrant",
        "sign",
        "--key",
        &p("exec.jwk"),
        "--in",
        &p("w0.json"),
        "--out",
        &p("w1.json"),
    ]));
    // Refusals lead with their code, then the file they are about.
    let sign = |key: &str, out: &str| {
        run(&[
            "warrant",
            "sign",
            "--key",
            &p(key),
            "--in",
            &p("w1.json"),
            "--out",
            &p(out),
        ])
    };
    let stderr = assert_fails_with(&sign("exec.jwk", "again.json"), 1, "already_signed");
    assert!(stderr.contains("w1.json"), "{stderr}");
    assert_fails_with(
        &sign("exec.pub.jwk", "public.json"),
        1,
        "invalid_authority_key",
    );
    std::fs::write(p("garbage.json"), "{").unwrap();
    let stderr = assert_fails_with(
        &run(&["warrant", "inspect", &p("garbage.json")]),
        1,
        "malformed_warrant",
    );
    assert!(stderr.contains("garbage.json"), "{stderr}");
    // Not a file: refused at once, not read until memory runs out.
    let stderr = assert_fails_with(
        &run(&["warrant", "inspect", "/dev/zero"]),
        1,
        "input_unreadable",
    );
    assert!(stderr.contains("not a regular file"), "{stderr}");
    let inspect = |file: &str| {
        run(&[
            "warrant",
            "inspect",
            &p(file),
            "--trust",
            &p("trust.toml"),
            "--agency",
            "spiffe://agency.example/lea",
            "--at",
            "2026-11-25T12:00:00Z",
        ])
    };
    let one = inspect("w1.json");
    let stderr = assert_fails_with(&one, 1, "policy_not_met");
    let stdout = String::from_utf8_lossy(&one.stdout);
    assert!(
        format!("{stdout}{stderr}").contains("needs 1 judicial (found 0)"),
        "{stdout}{stderr}"
    );

    assert_ok(&run(&[
        "warrant",
        "sign",
        "--key",
        &p("judge.jwk"),
        "--in",
        &p("w1.json"),
        "--out",
        &p("w2.json"),
    ]));
    let both = assert_ok(&inspect("w2.json"));
    assert!(both.contains("accepted"), "{both}");
    assert!(
        both.contains("home-office-1") && both.contains("ipc-judicial-3"),
        "{both}"
    );
}

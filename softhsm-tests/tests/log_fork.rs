//! An operator who holds the database and the HSM forks the log: the store
//! is copied, and two `lavd serve` processes on the one token (so both
//! branches are signed by the real log key) write different leaves at the
//! same index. Then:
//!
//! - `lavd witness serve` (key in SoftHSM) and the independent Python
//!   witness (`softhsm-tests/interop/witness.py`) both cosign branch 1 and
//!   refuse branch 2 with the spec's answers: 409 `text/x.tlog.size` for an
//!   old size that is not theirs, 422 for another root at the size they
//!   recorded and for branch 2's own consistency proof from their record;
//! - `lavd audit mirror` holding branch 1 refuses branch 2, a larger tree
//!   that does not extend what it holds (`old_root_mismatch`), and keeps
//!   branch 1;
//! - `lavd audit verify --policy` with both witnesses at quorum 2 accepts
//!   branch 1's cosigned checkpoint and refuses branch 2's (`quorum_not_met`,
//!   and `cosignature_invalid` with branch 1's cosignatures pasted on),
//!   while without the policy branch 2 verifies: only the witnesses tell
//!   the branches apart;
//! - the daemon itself refuses to sign a branch when its database is
//!   rewritten behind it (hardening defect 11): that is
//!   `softhsm-tests/tests/audit_consistency.rs`, not repeated here.

use lavd::audit::witness::{verify_cosignatures, CosignerKey};
use softhsm_tests::server::{path_str, Pki};
use softhsm_tests::witness::{body, proof_via, size, Log, PyWitness, Witness};
use softhsm_tests::{assert_fails_with, assert_ok};

#[test]
fn witnesses_and_the_policy_refuse_a_forked_branch() {
    let mut log = Log::start();
    let lavd_w = Witness::start("witness.test/lavd", &log.origin, &log.vkey, "");
    let py_state = log.v.t.path("py-witness.json");
    let py_w = PyWitness::start(
        "witness.test/py",
        &[21; 32],
        &py_state,
        &log.origin,
        &log.vkey,
    );
    let py_key = CosignerKey::parse(&py_w.vkey).unwrap();
    let lavd_key = CosignerKey::parse(&lavd_w.vkey).unwrap();

    // Before the fork: both witnesses cosign the shared history.
    let c0 = log.unwrap(0);
    let s0 = size(&c0);
    for r in [lavd_w.add(&log.body(0, &c0)), py_w.add(&log.body(0, &c0))] {
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // The fork: the store copied while the daemon is stopped, then one
    // daemon per copy on the same token.
    log.stop();
    let db = log.v.t.path("lavd.db");
    let fork_db = log.v.t.path("fork.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("VACUUM INTO ?1", [path_str(&fork_db)])
        .unwrap();
    let config = std::fs::read_to_string(log.v.t.config()).unwrap();
    assert!(config.contains("path = \"lavd.db\""));
    let fork_config = log.v.t.path("fork.toml");
    std::fs::write(
        &fork_config,
        config.replace("path = \"lavd.db\"", "path = \"fork.db\""),
    )
    .unwrap();
    log.start_again();
    let (mut fork, fork_c) = log.serve(&fork_config, "fork");

    let c1 = log.unwrap(1);
    let f1 = log.unwrap_via(&fork_c, 2);
    let s1 = size(&c1);
    // The same size, both signed by the log key, different roots: a fork.
    assert_eq!(size(&f1), s1);
    assert_ne!(c1, f1);
    lavd::audit::note::verify_note(&c1, &log.vkey).unwrap();
    lavd::audit::note::verify_note(&f1, &log.vkey).unwrap();

    // Branch 1 is cosigned by both.
    let mut c1_cosigned = c1.clone();
    for (r, key) in [
        (lavd_w.add(&log.body(s0, &c1)), &lavd_key),
        (py_w.add(&log.body(s0, &c1)), &py_key),
    ] {
        assert_eq!(r.status, 200, "{}", r.text());
        c1_cosigned.push_str(&r.text());
        assert_eq!(verify_cosignatures(&c1_cosigned, key).unwrap().len(), 1);
    }

    // Branch 2, every way its operator can ask: refused by both.
    let f2 = log.unwrap_via(&fork_c, 3);
    let s2 = size(&f2);
    for (name, add) in [
        (
            "lavd",
            &(|b: &str| lavd_w.add(b)) as &dyn Fn(&str) -> softhsm_tests::server::Response,
        ),
        ("python", &|b: &str| py_w.add(b)),
    ] {
        let conflict = |r: softhsm_tests::server::Response| {
            assert_eq!(r.status, 409, "{name}: {}", r.text());
            assert_eq!(r.header("content-type"), Some("text/x.tlog.size"), "{name}");
            assert_eq!(r.text(), format!("{s1}\n"), "{name}");
        };
        // From the size both branches share, with the fork's own proof.
        conflict(add(&body(s0, &proof_via(&fork_c, s0, s1), &f1)));
        // At the size the witness recorded, another root: 422 since C2SP
        // tlog-witness's change of 2026-07-06 (commit 95978ca; 409 before).
        let r = add(&body(s1, &[], &f1));
        assert_eq!(r.status, 422, "{name}: {}", r.text());
        // As if never seen.
        conflict(add(&body(0, &[], &f2)));
        // Past it, with the fork's proof from the recorded size: it proves
        // f2 extends f1, not what the witness cosigned.
        let r = add(&body(s1, &proof_via(&fork_c, s1, s2), &f2));
        assert_eq!(r.status, 422, "{name}: {}", r.text());
    }
    // `lavd audit mirror` of branch 1 (still at `c1`), then pointed at
    // branch 2: a larger tree, signed by the log key, that does not extend
    // the mirrored checkpoint. Refused (`old_root_mismatch`); the mirror
    // keeps branch 1 and still verifies.
    let files = log.v.pki.cli_files(&log.v.parties.auditor, "auditor");
    let dir = path_str(&log.v.t.path("mirror"));
    let mirror = |api: std::net::SocketAddr| {
        let url = format!("https://{api}/v1/log");
        Pki::audit_mirror(&log.v.t, &log.vkey, &url, &dir, &files, &[])
    };
    let body_of = |note: &str| note[..note.find("\n\n").expect("a signed note")].to_string();
    let mirrored =
        || body_of(&std::fs::read_to_string(log.v.t.path("mirror").join("checkpoint")).unwrap());
    assert_ok(&mirror(log.v.daemon.api));
    assert_eq!(mirrored(), body_of(&c1));
    let stderr = assert_fails_with(&mirror(fork.api), 1, "old_root_mismatch");
    assert!(
        stderr.contains(&format!(
            "the log of size {s2} does not extend the checkpoint of size {s1} already held"
        )),
        "{stderr}"
    );
    assert_eq!(mirrored(), body_of(&c1));
    assert_ok(
        &log.v
            .t
            .lavd(&["audit", "verify", "--key", &log.vkey, "--tiles", &dir]),
    );

    // lavd's witness kept the fork's requests, signed by the log, as
    // evidence in its log.
    let stderr = lavd_w.daemon.stderr();
    let f1_root = f1.lines().nth(2).unwrap();
    assert!(
        stderr.contains("contradicts what this witness cosigned") && stderr.contains(f1_root),
        "{stderr}"
    );
    // Both answers to a checkpoint at its size with another root are kept:
    // 422 when the old size was that size, 409 when it was another.
    for status in ["status=409", "status=422"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("contradicts what this witness cosigned") && l.contains(status)),
            "{status}: {stderr}"
        );
    }

    // Branch 1 goes on being cosigned.
    let c2 = log.unwrap(4);
    let mut c2_cosigned = c2.clone();
    for r in [lavd_w.add(&log.body(s1, &c2)), py_w.add(&log.body(s1, &c2))] {
        assert_eq!(r.status, 200, "{}", r.text());
        c2_cosigned.push_str(&r.text());
    }

    // A verifier holding the policy (both witnesses, quorum 2).
    log.stop();
    fork.signal(rustix::process::Signal::TERM);
    assert!(fork.wait_exit(std::time::Duration::from_secs(30)).success());
    let export = |config: &std::path::Path, name: &str| {
        let out = log.v.t.path(name);
        assert_ok(&log.v.t.lavd(&[
            "audit",
            "export",
            "--config",
            &path_str(config),
            "--out",
            &path_str(&out),
        ]));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        (out, json)
    };
    let (_, branch1) = export(&log.v.t.config(), "branch1.json");
    let (branch2_path, branch2) = export(&fork_config, "branch2.json");
    assert_eq!(branch1["checkpoint"].as_str(), Some(c2.as_str()));
    assert_eq!(branch2["checkpoint"].as_str(), Some(f2.as_str()));
    let policy = log.v.t.path("witnesses.policy");
    std::fs::write(
        &policy,
        format!(
            "log {}\nwitness L {}\nwitness P {}\ngroup both all L P\nquorum both\n",
            log.vkey, lavd_w.vkey, py_w.vkey
        ),
    )
    .unwrap();
    let with_checkpoint = |export: &serde_json::Value, name: &str, checkpoint: String| {
        let mut e = export.clone();
        e["checkpoint"] = checkpoint.into();
        let path = log.v.t.path(name);
        std::fs::write(&path, e.to_string()).unwrap();
        path_str(&path)
    };
    let verify = |export: &str, policy: Option<&std::path::Path>| {
        let mut args = vec!["audit", "verify", "--key", &log.vkey, "--export", export];
        let policy = policy.map(path_str);
        if let Some(p) = &policy {
            args.extend(["--policy", p]);
        }
        log.v.t.lavd(&args)
    };

    // Branch 1 with the witnesses' cosignatures of its head: verifies.
    let good = with_checkpoint(&branch1, "branch1-cosigned.json", c2_cosigned.clone());
    let out = assert_ok(&verify(&good, Some(&policy)));
    assert!(out.contains("verdict: the log verifies"), "{out}");

    // Branch 2 verifies as a log on its own: the log key signed it.
    assert_ok(&verify(&path_str(&branch2_path), None));
    // Under the policy it has no quorum.
    assert_fails_with(
        &verify(&path_str(&branch2_path), Some(&policy)),
        1,
        "quorum_not_met",
    );
    // Branch 1's cosignatures pasted onto branch 2's head do not verify.
    let lines = &c2_cosigned[c2.len()..];
    let pasted = with_checkpoint(&branch2, "branch2-pasted.json", format!("{f2}{lines}"));
    assert_fails_with(&verify(&pasted, Some(&policy)), 1, "cosignature_invalid");
}

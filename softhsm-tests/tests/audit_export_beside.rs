//! `lavd audit export` beside a running daemon: a leaf the daemon appends
//! while the export signs its checkpoint is not in the export, whose
//! checkpoint covers exactly its leaves, so the export verifies (and can be
//! the next export's `--previous`). Before, such a leaf was exported beyond
//! the checkpoint and the verifier refused the export with
//! `entries_extra`, the code that says leaves were slipped in.
//!
//! Deterministic: the export's own `C_Sign` is held in the fault module (a
//! settings file of its own, so the daemon's signatures are not), and the
//! daemon appends and signs meanwhile.

use softhsm_tests::vault::{self, Held};
use softhsm_tests::{assert_ok, Shim};

#[test]
fn a_leaf_appended_while_an_export_signs_is_left_to_the_next_export() {
    let held = Held::new(&["E-1"]);
    let (c, shim, t) = (&held.c, &held.shim, &held.t);
    let revoke = |id: &str| {
        let r = vault::post(
            &c.admin,
            "/v1/warrants/revocations",
            &serde_json::json!({"id": id, "reason": "quashed"}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    // A leaf no checkpoint covers yet (the daemon's signature fails), so
    // that the export signs one.
    shim.set("fault = device_error\nfault_calls = C_Sign");
    let uncovered = revoke("W-EXPORT-1");
    assert_eq!(
        uncovered["audit"]["checkpoint"],
        serde_json::Value::Null,
        "{uncovered}"
    );
    shim.set("");
    let covered = uncovered["audit"]["first_index"].as_u64().unwrap() + 1;

    // The export's process loads the fault module with settings of its own.
    let cli_shim = Shim::named(t, "cli-shim");
    let config = std::fs::read_to_string(t.config()).unwrap();
    assert!(config.contains(&shim.hsm_env()), "{config}");
    let cli_config = t.path("cli.toml");
    std::fs::write(
        &cli_config,
        config.replace(&shim.hsm_env(), &cli_shim.hsm_env()),
    )
    .unwrap();
    let export = t.path("export.json");
    cli_shim.set("fault = hang\nfault_calls = C_Sign");
    let appended = std::thread::scope(|s| {
        let _release = cli_shim.releasing();
        let exporting = s.spawn(|| {
            t.lavd(&[
                "audit",
                "export",
                "--out",
                export.to_str().unwrap(),
                "--config",
                cli_config.to_str().unwrap(),
            ])
        });
        // The export has read the tree (`covered` leaves) and waits in its
        // signature; the daemon appends a leaf and signs over it.
        cli_shim.wait_for_faults(1);
        let appended = revoke("W-EXPORT-2");
        assert!(appended["audit"]["checkpoint"].is_string(), "{appended}");
        assert_eq!(appended["audit"]["first_index"], covered, "{appended}");
        cli_shim.set("");
        assert_ok(&exporting.join().unwrap());
        appended
    });

    let vkey = assert_ok(&t.lavd_with_config(&["audit", "key"]));
    // `lavd audit verify --key KEY --export FILE [more]`.
    let verify = |file: &std::path::Path, more: &[&str]| {
        let mut args = vec![
            "audit",
            "verify",
            "--key",
            vkey.trim(),
            "--export",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(more);
        assert_ok(&t.lavd(&args))
    };
    let out = verify(&export, &[]);
    assert!(out.contains(&format!("{covered} leaves verified")), "{out}");
    let exported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    assert_eq!(
        exported["entries"].as_array().unwrap().len() as u64,
        covered,
        "the leaf appended during the export is not in it: {appended}"
    );

    // The next export has it, and verifies against the first.
    let next = t.path("next.json");
    assert_ok(&t.lavd_with_config(&["audit", "export", "--out", next.to_str().unwrap()]));
    let out = verify(&next, &["--previous", export.to_str().unwrap()]);
    assert!(
        out.contains(&format!("{} leaves verified", covered + 1)),
        "{out}"
    );
}

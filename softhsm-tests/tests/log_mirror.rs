//! `lavd audit mirror` against a real `lavd serve`, then `lavd audit verify
//! --tiles` on the mirror:
//!
//! - a first mirror fetches every tile and verifies;
//! - after the log grows, a second one fetches only what is new, proves the
//!   new tree extends the mirrored checkpoint, and verifies;
//! - a run cut short (here by a response limit smaller than a tile) leaves
//!   the previous checkpoint in place, so the mirror still verifies as it
//!   was, and the next run completes it;
//! - a tile fetched but refused is dropped, so the next run fetches it
//!   again and completes, instead of failing on it for good;
//! - a mirrored tile altered on disk is caught by the next run.

use softhsm_tests::server::{serve_config, Client, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{assert_ok, TestToken};
use time::OffsetDateTime;

fn unwrap_batch(
    c: &Client,
    escrow: &lavd::jwk::P256PublicKey,
    warrant: &serde_json::Value,
    tag: &str,
) {
    let now = OffsetDateTime::now_utc();
    let envelopes: Vec<_> = (0..150)
        .map(|i| {
            vault::seal(
                escrow,
                "E-1",
                TARGET,
                now - time::Duration::minutes(i + 1),
                &format!("{tag}-{i}"),
                format!("mirror-dek-{tag}-{i:08}").as_bytes(),
            )
        })
        .collect();
    let r = vault::post(
        c,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The number of tiles a mirror run says it fetched.
fn fetched(out: &str) -> u64 {
    out.split(": ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {out:?}"))
}

/// The `… N leaves verified` line of a verify summary.
fn size_line(out: &str) -> String {
    out.lines()
        .find(|l| l.contains("leaves verified"))
        .unwrap_or_else(|| panic!("no size in {out:?}"))
        .to_string()
}

/// Every file under `dir`.
fn files_under(dir: &str) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let mut todo = vec![std::path::PathBuf::from(dir)];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.insert(path);
            }
        }
    }
    out
}

#[test]
fn a_mirror_fetches_incrementally_resumes_and_verifies() {
    // Under the umask most shells have, so that the modes checked below
    // are the ones lavd asked for (under 077 a 0644 request is 0600 too).
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o022));
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "{}[limits]\nmax_batch = 200\nrate_limit_per_second = 1000\nrate_limit_burst = 1000\n",
        vault::roles_toml()
    )));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("MIRROR-1", recipient.public(), 10_000));
    unwrap_batch(&c.agency, &escrow, &warrant, "a");
    unwrap_batch(&c.agency, &escrow, &warrant, "b");

    let files = pki.cli_files(&parties.auditor, "auditor");
    let key = vault::verifier_key(&c.auditor);
    let url = format!("https://{}/v1/log", daemon.api);
    let dir = t.path("mirror").to_str().unwrap().to_string();
    let mirror = |extra: &[&str]| Pki::audit_mirror(&t, &key, &url, &dir, &files, extra);
    let verify = || assert_ok(&t.lavd(&["audit", "verify", "--key", &key, "--tiles", &dir]));

    // First run: everything, its owner's alone (the bundles hold the
    // leaves).
    let first = fetched(&assert_ok(&mirror(&[])));
    softhsm_tests::assert_private(std::path::Path::new(&dir));
    let verified = verify();
    assert!(verified.contains("verdict: the log verifies"), "{verified}");
    // Under another log's key the tiles' checkpoint is refused by its code;
    // without the checkpoint, so are the tiles.
    let other = lavd::audit::note::verifier_key(
        "other.example/log",
        lavd::audit::note::VerifierKey::parse(&key)
            .unwrap()
            .public_key(),
    )
    .unwrap();
    softhsm_tests::assert_fails_with(
        &t.lavd(&["audit", "verify", "--key", &other, "--tiles", &dir]),
        1,
        "note_unverified",
    );
    let empty = tempfile::tempdir().unwrap();
    softhsm_tests::assert_fails_with(
        &t.lavd(&[
            "audit",
            "verify",
            "--key",
            &key,
            "--tiles",
            empty.path().to_str().unwrap(),
        ]),
        1,
        "tile_unavailable",
    );
    assert!(first >= 5, "{first} tiles for a log of over 300 leaves");

    // The log grows; the next run fetches only the new tiles. Its owner
    // opened the mirror to others first (to republish it): what the run
    // writes, others can read too.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // `chmod -R u=rwX,go=rX`, as OPERATIONS §4 says to.
        let mut todo = vec![std::path::PathBuf::from(&dir)];
        while let Some(d) = todo.pop() {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                        .unwrap();
                }
            }
        }
        unwrap_batch(&c.agency, &escrow, &warrant, "c");
        let before: std::collections::BTreeSet<std::path::PathBuf> = files_under(&dir);
        let second = fetched(&assert_ok(&mirror(&[])));
        assert!(
            second < first + 3,
            "second run fetched {second}, first {first}"
        );
        let checkpoint = std::path::Path::new(&dir).join("checkpoint");
        assert_eq!(mode(&checkpoint), 0o644);
        let new: Vec<_> = files_under(&dir).difference(&before).cloned().collect();
        assert!(!new.is_empty(), "no new tile");
        for file in new {
            assert_eq!(mode(&file), 0o644, "{}", file.display());
            // And others can reach it: every directory up to the mirror's.
            for above in file.ancestors().skip(1) {
                assert_eq!(mode(above), 0o755, "{}", above.display());
                if above == std::path::Path::new(&dir) {
                    break;
                }
            }
        }
    }
    let grown = verify();
    assert_ne!(size_line(&grown), size_line(&verified), "{grown}");

    // Cut short: a limit smaller than a full tile stops the run after the
    // checkpoint; the mirror keeps its old checkpoint and still verifies.
    unwrap_batch(&c.agency, &escrow, &warrant, "d");
    let cut = mirror(&["--max-response-bytes", "4096"]);
    assert!(!cut.status.success(), "a run with a 4 KiB limit completed");
    let stderr = String::from_utf8_lossy(&cut.stderr);
    assert!(stderr.contains("response_too_large"), "{stderr}");
    assert_eq!(size_line(&verify()), size_line(&grown));
    // And the next run completes it.
    assert_ok(&mirror(&[]));
    let resumed = verify();
    assert_ne!(size_line(&resumed), size_line(&grown), "{resumed}");

    // A tile fetched but refused (here: planted where a run cut short
    // would have staged the new entry bundle) is dropped, not kept: the
    // run after it fetches it again and completes.
    unwrap_batch(&c.agency, &escrow, &warrant, "e");
    let size = vault::tree_size(&c.auditor);
    let bundle = if size.is_multiple_of(256) {
        format!("tile/entries/{:03}", size / 256 - 1)
    } else {
        format!("tile/entries/{:03}.p/{}", size / 256, size % 256)
    };
    let incoming = t.path("mirror").join(".incoming");
    let planted = incoming.join(&bundle);
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    std::fs::write(&planted, b"not an entry bundle").unwrap();
    let refused = mirror(&[]);
    let stderr = softhsm_tests::assert_fails_with(&refused, 1, "bundle_malformed");
    assert!(stderr.contains(&bundle), "{stderr}");
    assert!(!incoming.exists(), "the refused tiles were kept");
    assert_eq!(size_line(&verify()), size_line(&resumed));
    assert_ok(&mirror(&[]));
    assert_ne!(size_line(&verify()), size_line(&resumed));

    // A symbolic link anywhere in the mirror (a seed mirror handed over
    // with one) is refused before anything is fetched or written: writing
    // through it would put fetched, unverified bytes outside the mirror.
    let victim = t.path("victim");
    std::fs::write(&victim, b"untouched").unwrap();
    let link = t.path("mirror").join("checkpoint.partial-download");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let out = mirror(&[]);
    assert!(!out.status.success(), "a mirror holding a link was used");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
    std::fs::remove_file(&link).unwrap();

    // A tiles directory whose checkpoint is a device (or a FIFO) is refused
    // at once, not read until memory runs out.
    let odd = t.path("odd-tiles");
    std::fs::create_dir_all(&odd).unwrap();
    std::os::unix::fs::symlink("/dev/zero", odd.join("checkpoint")).unwrap();
    let out = t.lavd(&[
        "audit",
        "verify",
        "--key",
        &key,
        "--tiles",
        odd.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a regular file"), "{stderr}");

    // A mirrored tile altered on disk: the next run refuses it.
    let tile = t.path("mirror").join("tile/0/000");
    let mut bytes = std::fs::read(&tile).unwrap();
    bytes[0] ^= 0x80;
    std::fs::write(&tile, &bytes).unwrap();
    let out = mirror(&[]);
    assert!(!out.status.success(), "an altered mirror was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("root_mismatch"), "{stderr}");
}

//! `lavd witness serve`: a real process, its key in a real SoftHSM token,
//! over real TLS (no client certificate), cosigning real checkpoints of a
//! real `lavd serve` log with the log's own consistency proofs. Each answer
//! of C2SP tlog-witness `add-checkpoint` is asserted with its exact status,
//! content type and body; the state survives a restart; racing clients
//! never roll it back; the admin listener reports readiness and metrics;
//! the rate limit answers 429; a key file outside dev mode exits 64.

use lavd::audit::witness::{verify_cosignatures, CosignerKey};
use softhsm_tests::server::{path_str, Daemon, Pki};
use softhsm_tests::witness::{body, size, Log, Witness};
use softhsm_tests::{assert_fails_with, TestToken};

/// The cosignature a 200 answer carries verifies under the vkey
/// `lavd witness keygen` printed, with a timestamp of about now.
fn assert_cosigned(w: &Witness, checkpoint: &str, r: &softhsm_tests::server::Response) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let line = r.text();
    assert!(line.starts_with(&format!("\u{2014} {} ", w.name)), "{line}");
    assert!(
        line.ends_with('\n') && line.matches('\n').count() == 1,
        "{line:?}"
    );
    let key = CosignerKey::parse(&w.vkey).unwrap();
    let times = verify_cosignatures(&format!("{checkpoint}{line}"), &key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Generous: the clocks are the same machine's, the bound only catches
    // a timestamp that is not "now" at all.
    assert!(
        times.len() == 1 && times[0].abs_diff(now) < 600,
        "{times:?} vs {now}"
    );
}

/// `lavd witness serve` expected to refuse its config: bounded, since a
/// witness that serves never exits (killed after 30 s, and the test fails).
fn serve_bounded(config: &std::path::Path) -> std::process::Output {
    std::process::Command::new("timeout")
        .args(["--signal=KILL", "30"])
        .arg(softhsm_tests::lavd_binary())
        .args(["witness", "serve", "--config", &path_str(config)])
        .env("SOFTHSM2_CONF", softhsm_tests::harness().conf())
        .env("LAVD_LOG", "warn")
        .output()
        .expect("timeout (coreutils)")
}

fn assert_size_conflict(r: &softhsm_tests::server::Response, recorded: u64) {
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/x.tlog.size"));
    assert_eq!(r.text(), format!("{recorded}\n"));
}

#[test]
fn add_checkpoint_answers_every_status_of_the_spec() {
    let log = Log::start();
    let mut w = Witness::start("witness.test/w1", &log.origin, &log.vkey, "");
    w.daemon.wait_readyz(200);
    let c1 = log.unwrap(1);
    let c2 = log.unwrap(2);
    let c3 = log.unwrap(3);
    let (s1, s2, s3) = (size(&c1), size(&c2), size(&c3));
    assert!(s1 < s2 && s2 < s3);

    // First sight: old 0, no proof.
    assert_cosigned(&w, &c1, &w.add(&log.body(0, &c1)));
    // From the recorded size, with the log's proof.
    assert_cosigned(&w, &c2, &w.add(&log.body(s1, &c2)));

    // Old size not the recorded one: 409, the recorded size as the body.
    assert_size_conflict(&w.add(&log.body(s1, &c3)), s2);
    assert_size_conflict(&w.add(&log.body(0, &c3)), s2);
    // A routine 409 (the client did not know the size) is not evidence.
    assert!(
        !w.daemon.stderr().contains("contradicts"),
        "{}",
        w.daemon.stderr()
    );

    // Old size above the checkpoint's: 400.
    let r = w.add(&body(s3 + 1, &[], &c3));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));

    // A proof that does not verify: 422.
    let mut proof = log.proof(s2, s3);
    assert!(!proof.is_empty());
    proof[0] = {
        use base64::Engine as _;
        let mut h = base64::engine::general_purpose::STANDARD
            .decode(&proof[0])
            .unwrap();
        h[0] ^= 1;
        base64::engine::general_purpose::STANDARD.encode(h)
    };
    let r = w.add(&body(s2, &proof, &c3));
    assert_eq!(r.status, 422, "{}", r.text());
    // Anyone can change a byte of the log's real proof: a 422 is the
    // client's error, not evidence of a fork against the log.
    assert!(
        !w.daemon.stderr().contains("contradicts"),
        "{}",
        w.daemon.stderr()
    );
    // Old 0 with a proof, once a size is recorded: the recorded size
    // (409) comes before the proof's checks in the spec's order. (A
    // non-empty proof from a recorded 0, 422, is checked by the unit test
    // `audit::witness::tests::add_checkpoint_answers_every_case_of_the_spec`
    // and by the hostile-input target, not over HTTP.)
    let r = w.add(&body(0, &log.proof(s1, s3)[..1], &c3));
    assert_eq!(
        r.status,
        409,
        "old 0 is not the recorded size: {}",
        r.text()
    );

    // Signed by no key trusted for the origin (the root changed under the
    // log's signature): 403.
    let mut forged = c3.clone();
    let root_line = forged.lines().nth(2).unwrap().to_string();
    let other_root = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([9u8; 32])
    };
    forged = forged.replacen(&root_line, &other_root, 1);
    let r = w.add(&body(s2, &log.proof(s2, s3), &forged));
    assert_eq!(r.status, 403, "{}", r.text());

    // An origin the witness does not witness: 404.
    let other = c3.replacen(&log.origin, "other.example/log", 1);
    let r = w.add(&body(0, &[], &other));
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));

    // Malformed bodies: 400.
    for bad in [
        "".to_string(),
        "garbage".to_string(),
        format!("old 01\n\n{c3}"),
        format!("old {s2}\nnot base64!\n\n{c3}"),
        format!("old {s2}\n{c3}"),
    ] {
        let r = w.add(&bad);
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
    }

    // The good one still goes through after all that.
    assert_cosigned(&w, &c3, &w.add(&log.body(s2, &c3)));

    // Rollback: an older checkpoint after a newer one is refused, whatever
    // old size the client claims.
    assert_size_conflict(&w.add(&log.body(0, &c1)), s3);
    assert_size_conflict(&w.add(&log.body(s1, &c2)), s3);
    let r = w.add(&body(s3, &[], &c2));
    assert_eq!(
        r.status,
        400,
        "old size above the checkpoint's: {}",
        r.text()
    );

    // Method and path.
    let client = w.client();
    let r = client.request("GET", "/add-checkpoint", None).unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(
        client.request("POST", "/other", Some(b"x")).unwrap().status,
        404
    );

    // Metrics: statuses, cosignatures, and the recorded size per origin.
    let m = |series: &str| w.daemon.metric(series);
    assert_eq!(m("lavd_witness_requests_total{status=\"200\"}"), 3.0);
    assert_eq!(m("lavd_witness_requests_total{status=\"409\"}"), 5.0);
    assert_eq!(m("lavd_witness_requests_total{status=\"422\"}"), 1.0);
    assert_eq!(m("lavd_witness_requests_total{status=\"403\"}"), 1.0);
    assert_eq!(
        m(&format!(
            "lavd_witness_cosignatures_total{{origin=\"{}\"}}",
            log.origin
        )),
        3.0
    );
    assert_eq!(
        m(&format!(
            "lavd_witness_recorded_size{{origin=\"{}\"}}",
            log.origin
        )),
        s3 as f64
    );
    let ready = w.daemon.admin_get("/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.json(),
        serde_json::json!({"ready": true, "key": true, "state": true, "draining": false})
    );
    assert_eq!(w.daemon.admin_get("/healthz").status, 200);

    // The state survives a restart (SIGTERM: STOPPING=1, exit 0).
    w.restart();
    assert_eq!(
        w.daemon.metric(&format!(
            "lavd_witness_recorded_size{{origin=\"{}\"}}",
            log.origin
        )),
        s3 as f64
    );
    assert_size_conflict(&w.add(&log.body(s2, &c3)), s3);
    let c4 = log.unwrap(4);
    assert_cosigned(&w, &c4, &w.add(&log.body(s3, &c4)));

    // A lost state is not a new witness's: without its file the witness
    // does not start (it would cosign, from size 0, a branch contradicting
    // what it cosigned), until the file is restored. Before, it made a new
    // empty one and served.
    w.daemon.signal(rustix::process::Signal::TERM);
    w.daemon.expect_notify("STOPPING=1");
    assert!(w
        .daemon
        .wait_exit(std::time::Duration::from_secs(30))
        .success());
    let moved: Vec<(std::path::PathBuf, std::path::PathBuf)> = ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| {
            (
                w.t.path(&format!("witness.db{suffix}")),
                w.t.path(&format!("saved.db{suffix}")),
            )
        })
        .filter(|(from, _)| from.exists())
        .collect();
    for (from, to) in &moved {
        std::fs::rename(from, to).unwrap();
    }
    let stderr = assert_fails_with(&serve_bounded(&w.config), 64, "bad_config");
    assert!(
        stderr.contains("state") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(!w.t.path("witness.db").exists(), "an empty state was made");
    // Nor is a zero-length file (a placeholder, a failed restore), which
    // SQLite would take for an empty database, or another database.
    std::fs::write(w.t.path("witness.db"), b"").unwrap();
    let stderr = assert_fails_with(&serve_bounded(&w.config), 64, "bad_config");
    assert!(
        stderr.contains("state") && stderr.contains("not a witness state"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(w.t.path("witness.db")).unwrap().len(), 0);
    std::fs::remove_file(w.t.path("witness.db")).unwrap();
    for (from, to) in &moved {
        std::fs::rename(to, from).unwrap();
    }
    w.daemon = Daemon::start_witness(&w.t, &w.config, "witness");
    assert_size_conflict(&w.add(&log.body(0, &c4)), size(&c4));

    // A checkpoint that also carries 15 signatures of post-quantum size
    // (ML-DSA-65's 3,309 bytes, by keys the witness does not know), which
    // C2SP signed-note asks verifiers to take: read and cosigned under the
    // default body bound (before, 413 at its 64 KiB).
    let c5 = log.unwrap(5);
    let mut large = c5.clone();
    for i in 0..15u8 {
        let signature = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(vec![i; 4 + 3309])
        };
        large.push_str(&format!("\u{2014} pq{i}.example/key {signature}\n"));
    }
    let request = log.body(size(&c4), &large);
    assert!(request.len() > 64 << 10, "{}", request.len());
    assert_cosigned(&w, &large, &w.add(&request));
}

/// Many clients race add-checkpoints of growing real checkpoints, each
/// from the size it last learned: every cosignature chains from the size
/// recorded just before it, and the recorded size never goes back.
#[test]
fn racing_add_checkpoints_never_roll_the_witness_back() {
    let log = Log::start();
    let w = Witness::start(
        "witness.test/race",
        &log.origin,
        &log.vkey,
        "[limits]\nrate_limit_per_second = 10000\nrate_limit_burst = 10000\n",
    );
    let checkpoints: Vec<String> = (0..12).map(|i| log.unwrap(i)).collect();
    let cosigned = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for task in 0..8usize {
            let (log, w, checkpoints, cosigned) = (&log, &w, &checkpoints, &cosigned);
            s.spawn(move || {
                let mut known = 0u64;
                for round in 0..12usize {
                    let checkpoint = &checkpoints[(task * 5 + round * 7) % checkpoints.len()];
                    let to = size(checkpoint);
                    if known > to {
                        continue;
                    }
                    let r = w.add(&log.body(known, checkpoint));
                    match r.status {
                        200 => {
                            let key = CosignerKey::parse(&w.vkey).unwrap();
                            let line = r.text();
                            verify_cosignatures(&format!("{checkpoint}{line}"), &key).unwrap();
                            cosigned.lock().unwrap().push((known, to));
                            known = to;
                        }
                        409 => known = r.text().trim().parse().unwrap(),
                        other => panic!("{other}: {}", r.text()),
                    }
                }
            });
        }
    });
    let cosigned = cosigned.into_inner().unwrap();
    assert!(cosigned.len() >= 2, "{cosigned:?}");
    // The witness took them in the order of (old, new): at each recorded
    // size the same-size cosignatures, then the one advance, and the
    // recorded size never goes back. Responses came back in another order;
    // sorted, every cosignature starts where the last ended.
    let mut chain = cosigned.clone();
    chain.sort_unstable();
    let mut recorded = 0;
    for &(old, to) in &chain {
        assert_eq!(old, recorded, "unchained cosignatures: {chain:?}");
        assert!(to >= old, "{chain:?}");
        recorded = to;
    }
    assert_eq!(
        w.daemon.metric(&format!(
            "lavd_witness_recorded_size{{origin=\"{}\"}}",
            log.origin
        )),
        recorded as f64
    );
}

/// A key file is refused outside dev mode (exit 64, naming the field); in
/// dev mode it serves, and a client over its per-IP rate gets 429.
#[test]
fn dev_key_files_and_the_rate_limit() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    std::fs::write(t.path("witness.seed"), hex::encode([5u8; 32])).unwrap();
    let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let log_vkey =
        lavd::audit::note::verifier_key("log.test/a", sk.verifying_key().as_bytes()).unwrap();
    let config = |dev: bool| {
        format!(
            "name = \"witness.test/dev\"\nstate = \"witness.db\"\n{}key_file = \"witness.seed\"\n\n\
             [server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [tls]\ncert = \"tls/server.pem\"\nkey = \"tls/server.key\"\n\n\
             [limits]\nrate_limit_per_second = 0.001\nrate_limit_burst = 3\nmax_body_bytes = 4096\n\n\
             [[logs]]\norigin = \"log.test/a\"\nvkey = {log_vkey:?}\n",
            if dev { "dev = true\n" } else { "" }
        )
    };
    let path = t.path("witness.toml");
    // A log whose vkey is named for another origin could never be
    // cosigned (a checkpoint's key name is its origin): refused at load.
    std::fs::write(
        &path,
        config(true).replace("origin = \"log.test/a\"", "origin = \"log.test/b\""),
    )
    .unwrap();
    let stderr = assert_fails_with(&serve_bounded(&path), 64, "bad_config");
    assert!(
        stderr.contains("logs[0].vkey") && stderr.contains("log.test/b"),
        "{stderr}"
    );
    // A limit of unwraps would be ignored by a witness: refused by name.
    std::fs::write(
        &path,
        config(true).replace("[limits]\n", "[limits]\nmax_batch = 10\n"),
    )
    .unwrap();
    let stderr = assert_fails_with(&serve_bounded(&path), 64, "bad_config");
    assert!(stderr.contains("limits.max_batch"), "{stderr}");
    std::fs::write(&path, config(false)).unwrap();
    let out = t.lavd(&["witness", "serve", "--config", &path_str(&path)]);
    let stderr = assert_fails_with(&out, 64, "bad_config");
    assert!(
        stderr.contains("key_file") && stderr.contains("dev = true"),
        "{stderr}"
    );

    std::fs::write(&path, config(true)).unwrap();
    let d = Daemon::start_witness(&t, &path, "witness");
    assert!(d.stderr().contains("dev = true"), "{}", d.stderr());
    let client = pki.client(d.api, None);
    // Above max_body_bytes: 413 before the body is read.
    let r = client
        .request("POST", "/add-checkpoint", Some(&[b'x'; 5000]))
        .unwrap();
    r.assert_error(413, "body_too_large");
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            client
                .request("POST", "/add-checkpoint", Some(b"old 0\n\nlog.test/a\n1\n"))
                .unwrap()
                .status
        })
        .collect();
    // The burst of three (the 413 took one; the rest are refused by the
    // spec's checks: no signature line makes the note malformed), then 429
    // at 0.001 per second (a token in 1,000 s: none comes back however slow
    // the machine).
    assert_eq!(statuses, [400, 400, 429, 429]);
    assert_eq!(d.metric("lavd_witness_requests_total{status=\"429\"}"), 2.0);
    // The dev key: its vkey is the seed's.
    let printed =
        softhsm_tests::assert_ok(&t.lavd(&["witness", "vkey", "--config", &path_str(&path)]));
    let expected = CosignerKey::new(
        "witness.test/dev",
        ed25519_dalek::SigningKey::from_bytes(&[5; 32])
            .verifying_key()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(printed.trim(), expected.to_string());

    // Bodies held at once are bounded here too, where anyone may post
    // (`max_body_bytes_in_flight`): while one being sent holds 4,000 of
    // 4,096 bytes, another of 200 is refused unread with 503 `server_busy`;
    // once the first is answered, the same request is read.
    drop(d);
    std::fs::write(
        &path,
        config(true).replace(
            "rate_limit_per_second = 0.001\nrate_limit_burst = 3\n",
            "max_body_bytes_in_flight = 4096\n",
        ),
    )
    .unwrap();
    let d = Daemon::start_witness(&t, &path, "witness");
    let client = pki.client(d.api, None);
    let small = [b'x'; 200];
    let post_small = || {
        client
            .request("POST", "/add-checkpoint", Some(&small))
            .unwrap()
    };
    // Read, and refused by the spec's checks (not a note): 400.
    assert_eq!(post_small().status, 400);
    let mut slow = client.connect().unwrap();
    slow.send(
        b"POST /add-checkpoint HTTP/1.1\r\nhost: localhost\r\ncontent-length: 4000\r\n\r\nold 0\n",
    )
    .unwrap();
    // The slow head's bytes held (the gauge is read when scraped): a small
    // body sent before they were could hold its 200 first and have the slow
    // head refused instead (CI once saw no 503 in 10 s of retries).
    const HELD: &str = "lavd_witness_request_body_bytes_held";
    softhsm_tests::eventually(
        "the slow head's 4000 bytes held",
        std::time::Duration::from_secs(10),
        || d.metric(HELD) == 4000.0,
    );
    let r = post_small();
    let message = r.assert_error(503, "server_busy");
    assert!(message.contains("4096"), "{message}");
    assert_eq!(r.header("retry-after"), Some("1"));
    slow.send(&[b'x'; 4000 - 6]).unwrap();
    assert_eq!(slow.read_response().unwrap().status, 400);
    assert_eq!(d.metric(HELD), 0.0);
    assert_eq!(
        post_small().status,
        400,
        "read once the slow one is answered"
    );
}

/// `/readyz` follows the witness's token: with its storage gone (what a
/// network HSM losing its partition looks like) it is 503 with
/// `"key": false`, and add-checkpoint answers 503 `hsm_unavailable` without recording
/// anything; with the storage back it is ready again without a restart and
/// cosigns from the size recorded before.
#[test]
fn readiness_follows_the_witness_token() {
    let log = Log::start();
    let w = Witness::start("witness.test/ready", &log.origin, &log.vkey, "");
    let c1 = log.unwrap(1);
    assert_cosigned(&w, &c1, &w.add(&log.body(0, &c1)));
    let dir = w.t.token_dir();
    let away = w.t.path("token-away");
    std::fs::rename(&dir, &away).unwrap();
    let r = w.daemon.wait_readyz(503);
    assert_eq!(
        r.json(),
        serde_json::json!({"ready": false, "key": false, "state": true, "draining": false})
    );
    let c2 = log.unwrap(2);
    w.add(&log.body(size(&c1), &c2))
        .assert_error(503, "hsm_unavailable");
    std::fs::rename(&away, &dir).unwrap();
    w.daemon.wait_readyz(200);
    // Nothing was recorded by the failed attempt.
    assert_size_conflict(&w.add(&log.body(0, &c2)), size(&c1));
    assert_cosigned(&w, &c2, &w.add(&log.body(size(&c1), &c2)));
}

/// A key replaced under the witness's label while it runs (the pair
/// deleted and another made there): it is not ready (`"key": false`), and
/// add-checkpoint answers 503 `hsm_unavailable` and records nothing. Before,
/// every request after the first signed with the new key under the old
/// key's name and ID, recorded the size, and answered 200 with a
/// cosignature that verifies under no key the witness published.
#[test]
fn a_key_replaced_under_the_label_gives_no_cosignature() {
    let log = Log::start();
    let w = Witness::start("witness.test/replaced", &log.origin, &log.vkey, "");
    let c1 = log.unwrap(1);
    assert_cosigned(&w, &c1, &w.add(&log.body(0, &c1)));
    let session = w.t.session();
    for handle in session
        .find_objects(&[cryptoki::object::Attribute::Label(b"lav-witness".to_vec())])
        .unwrap()
    {
        session.destroy_object(handle).unwrap();
    }
    drop(session);
    // Another pair under the label, as `lavd witness keygen` makes one (for
    // a state of its own: the running witness's is left alone).
    let other = w.t.path("witness-other.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&w.config)
            .unwrap()
            .replace("state = \"witness.db\"", "state = \"witness-other.db\""),
    )
    .unwrap();
    let other_vkey = softhsm_tests::assert_ok(&w.t.lavd(&[
        "witness",
        "keygen",
        "--config",
        other.to_str().unwrap(),
    ]));
    assert_ne!(other_vkey.trim(), w.vkey.trim());
    let r = w.daemon.wait_readyz(503);
    assert_eq!(
        r.json(),
        serde_json::json!({"ready": false, "key": false, "state": true, "draining": false})
    );
    let c2 = log.unwrap(2);
    // Twice: each signs with the new key (the readiness probe found its
    // handle), and each signature is refused by the self-check.
    for _ in 0..2 {
        w.add(&log.body(size(&c1), &c2))
            .assert_error(503, "hsm_unavailable");
    }
    assert_size_conflict(&w.add(&log.body(0, &c2)), size(&c1));
}

//! The audit log as C2SP `tlog-tiles` under `/v1/log/`, read over mTLS by an
//! auditor from a real `lavd serve` holding more than 256 leaves:
//!
//! - `/v1/log/checkpoint` is the signed checkpoint as `text/plain`, cached a
//!   few seconds at most;
//! - the root computed from the tiles alone (the log's own RFC 6962 code
//!   reading tiles through `TileReader`) equals the checkpoint's root, and so
//!   do inclusion proofs made from tiles and from the proof API;
//! - entry bundles hold the exact leaves (as `/v1/audit/entries` gives
//!   them), and each hashes to its level-0 tile hash;
//! - full and partial tiles carry the spec's content type and are immutable;
//! - paths that are not the canonical spelling are 400 `malformed_request`,
//!   tiles the checkpoint does not cover are 404 `not_found`, and only the
//!   auditor role may read them; none is served once the newest
//!   checkpoint's row says a size its signature does not (503
//!   `log_inconsistent`);
//! - the real `lavd audit verify --tiles` gives the same summary from the
//!   served tiles (URL) and from a directory mirroring them as `--url` gives
//!   from the JSON API, and refuses a mirror with one altered tile;
//! - an independent tlog-tiles client written from the C2SP specifications
//!   in Python (`interop/tiles_check.py`: the checkpoint's Ed25519
//!   signature, every entry against its level-0 hash, level 1 against
//!   level 0, the RFC 6962 root against the checkpoint's) verifies the
//!   mirror, and refuses it with one altered hash at level 0 or level 1,
//!   an edited checkpoint, or another key.

use std::path::Path;

use lavd::audit::merkle::{self, leaf_hash};
use lavd::audit::note::verify_note;
use lavd::audit::tiles::{decode_bundle, Tile, TileReader, TileSource};
use softhsm_tests::server::{serve_config, Client, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{assert_ok, interop_python, TestToken};
use time::OffsetDateTime;

/// Tiles fetched from the daemon as the auditor.
struct Http<'a>(&'a Client);

impl TileSource for Http<'_> {
    fn fetch(&self, tile: &Tile) -> Result<Vec<u8>, String> {
        let r = self
            .0
            .get_raw(&format!("/v1/log/{}", tile.path()))
            .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("{}: {}", r.status, r.text()));
        }
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(
            r.header("cache-control"),
            Some("private, max-age=31536000, immutable")
        );
        Ok(r.body)
    }
}

#[test]
fn the_log_served_as_tiles_verifies_against_its_checkpoint() {
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
    let warrant = vault::double_lock(&vault::claims("TILES-1", recipient.public(), 1000));
    let now = OffsetDateTime::now_utc();
    // Two batches: the log passes 256 leaves (a full level-0 tile, a
    // partial one, a level-1 tile of width 1).
    for batch in 0..2 {
        let envelopes: Vec<_> = (0..150)
            .map(|i| {
                vault::seal(
                    &escrow,
                    "E-1",
                    TARGET,
                    now - time::Duration::minutes(i + 1),
                    &format!("tiles-{batch}-{i}"),
                    format!("tiles-dek-{batch}-{i:08}").as_bytes(),
                )
            })
            .collect();
        let r = vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // The checkpoint, as tlog-tiles serves it.
    let r = c.auditor.get("/v1/log/checkpoint");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("private, max-age=5"));
    let checkpoint = verify_note(&r.text(), &vault::verifier_key(&c.auditor)).expect("verifies");
    let size = checkpoint.size;
    assert!(size > 300, "{size}");

    // The root and proofs from tiles alone.
    let reader = TileReader::new(Http(&c.auditor), size);
    assert_eq!(merkle::root(&reader, size).unwrap(), checkpoint.root);
    for index in [0, 255, 256, size - 1] {
        let from_tiles = merkle::inclusion_proof(&reader, index, size).unwrap();
        let r = c.auditor.get(&format!(
            "/v1/audit/proof/inclusion?index={index}&size={size}"
        ));
        let api: Vec<String> = r.json()["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect();
        let tiles: Vec<String> = from_tiles.iter().map(lavd::codec::b64_encode).collect();
        assert_eq!(tiles, api, "inclusion proof of {index}");
    }

    // Entry bundles: the exact leaves, hashing to the level-0 tiles.
    let entries = vault::entries(&c.auditor, 0, size);
    for (tile, first) in [
        (Tile::entries(0, 256), 0usize),
        (Tile::entries(1, (size - 256) as u16), 256),
    ] {
        let bundle = Http(&c.auditor).fetch(&tile).unwrap();
        let leaves = decode_bundle(&tile, &bundle).unwrap();
        let hashes = reader
            .tile(&Tile::hashes(0, tile.index, tile.width))
            .unwrap();
        for (i, leaf) in leaves.iter().enumerate() {
            assert_eq!(leaf, &entries[first + i].bytes, "leaf {}", first + i);
            assert_eq!(leaf_hash(leaf), hashes[i], "leaf hash {}", first + i);
        }
    }

    // Refusals: the exact codes.
    for bad in [
        "/v1/log/tile/0/x000/000",
        "/v1/log/tile/0/0",
        "/v1/log/tile/00/000",
        "/v1/log/tile/64/000",
        "/v1/log/tile/0/000.p/0",
        "/v1/log/tile/0/000.p/256",
        "/v1/log/tile/entries/000.p/007",
    ] {
        c.auditor.get(bad).assert_error(400, "malformed_request");
    }
    let beyond = size - 256 + 1;
    for missing in [
        "/v1/log/tile/0/002".to_string(),
        format!("/v1/log/tile/0/001.p/{beyond}"),
        format!("/v1/log/tile/entries/001.p/{beyond}"),
        "/v1/log/tile/1/000".to_string(),
        "/v1/log/tile/8/000".to_string(),
        "/v1/log/tile/63/x999/999".to_string(),
    ] {
        let message = c.auditor.get(&missing).assert_error(404, "not_found");
        assert!(
            message.contains(&format!("the newest checkpoint served has {size}")),
            "{missing}: {message}"
        );
    }
    c.provider
        .get("/v1/log/tile/0/000")
        .assert_error(403, "forbidden");
    c.provider
        .get("/v1/log/checkpoint")
        .assert_error(403, "forbidden");

    // The real verifier, from the JSON API, from the tiles over HTTPS, and
    // from a directory laid out as they are served.
    let (ca, cert, client_key) = pki.cli_files(&parties.auditor, "auditor");
    let key = vault::verifier_key(&c.auditor);
    let verify = |source: &[&str]| {
        let mut args = vec!["audit", "verify", "--key", &key];
        args.extend_from_slice(source);
        if source.iter().any(|s| s.starts_with("https://")) {
            args.extend_from_slice(&["--ca", &ca, "--cert", &cert, "--client-key", &client_key]);
        }
        t.lavd(&args)
    };
    let api = format!("https://{}", daemon.api);
    let tiles_url = format!("https://{}/v1/log", daemon.api);
    let from_api = assert_ok(&verify(&["--url", &api]));
    let from_tiles = assert_ok(&verify(&["--tiles", &tiles_url]));

    // A mirror: the checkpoint the tiles were read under, every tile a tree
    // of that size needs, and its entry bundles. (A newer checkpoint may
    // have been signed since: the mirror holds what `size` needs.)
    let mirror = t.path("mirror");
    let checkpoint_text = c.auditor.get("/v1/log/checkpoint").text();
    let mirrored = verify_note(&checkpoint_text, &key).unwrap().size;
    let put = |path: &str, bytes: &[u8]| {
        let file = mirror.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    };
    put("checkpoint", checkpoint_text.as_bytes());
    for level in 0u8..3 {
        let span = 256u64.pow(u32::from(level));
        let nodes = mirrored / span;
        for index in 0..nodes.div_ceil(256) {
            let width = (nodes - index * 256).min(256) as u16;
            for tile in [
                Tile::hashes(level, index, width),
                Tile::entries(index, width),
            ] {
                if tile.level.is_none() && level > 0 {
                    continue;
                }
                put(&tile.path(), &Http(&c.auditor).fetch(&tile).unwrap());
            }
        }
    }
    let dir = mirror.to_str().unwrap().to_string();
    let from_dir = assert_ok(&verify(&["--tiles", &dir]));
    // The log did not grow in between: the three summaries are the same.
    assert_eq!(from_tiles, from_api);
    assert_eq!(from_dir, from_api);
    assert!(from_dir.contains("verdict: the log verifies"), "{from_dir}");
    let independent_with = |key: &str| {
        std::process::Command::new(interop_python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/tiles_check.py"))
            .arg(&mirror)
            .arg(key)
            .output()
            .unwrap()
    };
    let independent = || independent_with(&key);
    // Each alteration refused with its reason, then undone.
    let refused = |file: &Path, change: &dyn Fn(&mut Vec<u8>), reason: &str, with: &str| {
        let original = std::fs::read(file).unwrap();
        let mut bytes = original.clone();
        change(&mut bytes);
        std::fs::write(file, &bytes).unwrap();
        let out = independent_with(with);
        std::fs::write(file, &original).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(reason),
            "{reason}: {stderr}"
        );
    };
    refused(
        &mirror.join(Tile::hashes(1, 0, (mirrored / 256) as u16).path()),
        &|b| b[0] ^= 1,
        "tile/1: not the hashes of the full level-0 tiles",
        &key,
    );
    let size_line = format!("\n{mirrored}\n");
    refused(
        &mirror.join("checkpoint"),
        &|b| {
            let text = String::from_utf8(b.clone()).unwrap();
            *b = text
                .replacen(&size_line, &format!("\n{}\n", mirrored - 1), 1)
                .into_bytes();
        },
        "checkpoint: the signature does not verify",
        &key,
    );
    let (name, rest) = key.split_once('+').unwrap();
    refused(
        &mirror.join("checkpoint"),
        &|_| {},
        "VKEY: the key ID does not match the name and key",
        &format!("{name}x+{rest}"),
    );
    let out = independent();
    let root_line = checkpoint_text.lines().nth(2).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("verified {mirrored} {root_line}\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        mirrored > 256,
        "a full level-0 tile and a level-1 tile: {mirrored}"
    );

    // One altered hash in a level-0 tile: refused, naming the root.
    let tile0 = mirror.join(Tile::hashes(0, 0, 256).path());
    let mut bytes = std::fs::read(&tile0).unwrap();
    bytes[5] ^= 1;
    std::fs::write(&tile0, &bytes).unwrap();
    let out = verify(&["--tiles", &dir]);
    assert!(!out.status.success(), "an altered tile verified");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("root_mismatch"), "{stderr}");
    let out = independent();
    assert!(!out.status.success(), "the independent client took it");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tile/0/000: hash 0 is not the hash of tile/entries/000's entry 0"),
        "{stderr}"
    );
    bytes[5] ^= 1;
    std::fs::write(&tile0, &bytes).unwrap();
    assert_ok(&verify(&["--tiles", &dir]));

    // The right edge's partial tile one byte short: refused with the tile's
    // own code (it is read while the root is computed), naming it once.
    let partial = mirrored % 256;
    assert!(partial > 0, "a partial level-0 tile: {mirrored}");
    let edge = Tile::hashes(0, mirrored / 256, partial as u16).path();
    let edge_file = mirror.join(&edge);
    let mut bytes = std::fs::read(&edge_file).unwrap();
    bytes.pop();
    std::fs::write(&edge_file, &bytes).unwrap();
    let out = verify(&["--tiles", &dir]);
    assert!(!out.status.success(), "a short tile verified");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let says = format!("{edge}: {} bytes", partial * 32 - 1);
    assert!(
        stderr.starts_with("lavd: tile_length_mismatch: ") && stderr.matches(&says).count() == 1,
        "{stderr}"
    );

    // The newest checkpoint's row edited to a larger size (write access to
    // the store): no tile is served from it, since tiles of leaves no
    // signature covers would be cached as immutable. The log is
    // inconsistent, as the checkpoint's own route says.
    tamper_one(
        &t,
        "UPDATE audit_checkpoints SET size = size + 512 \
         WHERE size = (SELECT MAX(size) FROM audit_checkpoints)",
        [],
    );
    c.auditor
        .get(&format!("/v1/log/{}", Tile::hashes(0, 0, 1).path()))
        .assert_error(503, "log_inconsistent");
    c.auditor
        .get("/v1/log/checkpoint")
        .assert_error(503, "log_inconsistent");
}

/// A daemon whose log holds a few leaves (a key's, an unwrap of 3
/// envelopes): its token, the daemon, the parties' clients and the newest
/// checkpoint's size.
fn small_log() -> (TestToken, Daemon, vault::Clients, u64) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("TILES-2", recipient.public(), 3));
    let now = OffsetDateTime::now_utc();
    let envelopes: Vec<_> = (0..3)
        .map(|i| {
            vault::seal(
                &escrow,
                "E-1",
                TARGET,
                now - time::Duration::minutes(i + 1),
                &format!("edited-{i}"),
                &[7; 32],
            )
        })
        .collect();
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let size = verify_note(
        &c.auditor.get("/v1/log/checkpoint").text(),
        &vault::verifier_key(&c.auditor),
    )
    .unwrap()
    .size;
    assert!(size >= 3, "{size}");
    (t, daemon, c, size)
}

/// Runs `sql` with `params` on `t`'s store file behind the daemon's back
/// (write access to the store); it must change exactly one row.
fn tamper_one(t: &TestToken, sql: &str, params: impl rusqlite::Params) {
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(db.execute(sql, params).unwrap(), 1, "{sql}");
}

/// `path` refused 503 `log_inconsistent`, the log marked so (its
/// checkpoint refused too), and the daemon's log saying `why`.
fn assert_found_inconsistent(c: &vault::Clients, daemon: &Daemon, path: &str, why: &str) {
    c.auditor.get(path).assert_error(503, "log_inconsistent");
    c.auditor
        .get("/v1/log/checkpoint")
        .assert_error(503, "log_inconsistent");
    let stderr = daemon.stderr();
    assert!(stderr.contains(why), "{why}: {stderr}");
}

/// A node row edited behind lavd (write access to the store), below the
/// nodes any root the signer computes reads: the tile holding it is not
/// served (503 `log_inconsistent`: computed through the tile's nodes, the
/// root is not the signed checkpoint's), and the log is inconsistent.
/// Before, the tile was served with the edited hash, as immutable for a
/// year; only a client's own check could catch it.
#[test]
fn a_tile_whose_nodes_do_not_give_the_signed_root_is_not_served() {
    let (t, daemon, c, size) = small_log();
    let tile = format!("/v1/log/{}", Tile::hashes(0, 0, size as u16).path());
    assert_eq!(c.auditor.get(&tile).status, 200);
    // Leaf 0's hash, under a larger complete subtree whose stored hash the
    // root is computed from.
    tamper_one(
        &t,
        "UPDATE audit_nodes SET hash = zeroblob(32) WHERE level = 0 AND idx = 0",
        [],
    );
    assert_found_inconsistent(
        &c,
        &daemon,
        &tile,
        "does not give the root of the signed checkpoint",
    );
}

/// A leaf edited behind lavd together with its level-0 hash, so that the
/// bundle still matches the hashes it is checked against: the entry bundle
/// is not served either (503 `log_inconsistent`), since those hashes do
/// not give the signed root.
#[test]
fn an_entry_bundle_whose_leaf_and_hash_were_edited_together_is_not_served() {
    let (t, daemon, c, size) = small_log();
    let bundle = format!("/v1/log/{}", Tile::entries(0, size as u16).path());
    assert_eq!(c.auditor.get(&bundle).status, 200);
    let forged = br#"{"event":"forged"}"#.to_vec();
    tamper_one(
        &t,
        "UPDATE audit_leaves SET leaf = ?1 WHERE idx = 1",
        [&forged],
    );
    tamper_one(
        &t,
        "UPDATE audit_nodes SET hash = ?1 WHERE level = 0 AND idx = 1",
        [leaf_hash(&forged).to_vec()],
    );
    assert_found_inconsistent(
        &c,
        &daemon,
        &bundle,
        "does not give the root of the signed checkpoint",
    );
}

/// A leaf row edited alone behind lavd (its level-0 hash left as it was):
/// the entry bundle holding it is not served, and the log is marked
/// inconsistent (503 `log_inconsistent`), as for an edited node (rows are
/// never rewritten, so no lagging read can look like it). Before
/// 2026-12-07 this was 503 `store_unavailable` ("try again later"), and the
/// log was not marked.
#[test]
fn an_entry_bundle_whose_leaf_alone_was_edited_is_not_served() {
    let (t, daemon, c, size) = small_log();
    let bundle = format!("/v1/log/{}", Tile::entries(0, size as u16).path());
    assert_eq!(c.auditor.get(&bundle).status, 200);
    tamper_one(
        &t,
        "UPDATE audit_leaves SET leaf = ?1 WHERE idx = 1",
        [br#"{"event":"forged"}"#.to_vec()],
    );
    assert_found_inconsistent(&c, &daemon, &bundle, "does not match the tree's hash of it");
}

/// A tile's node row deleted behind lavd: SQLite's reads vouch for every
/// row, so the tile is not served and the log is marked inconsistent (503
/// `log_inconsistent`), naming the deletion (`AuditLog::check_nodes`).
#[test]
fn a_hash_tile_whose_node_row_was_deleted_is_not_served() {
    let (t, daemon, c, size) = small_log();
    let tile = format!("/v1/log/{}", Tile::hashes(0, 0, size as u16).path());
    assert_eq!(c.auditor.get(&tile).status, 200);
    tamper_one(
        &t,
        "DELETE FROM audit_nodes WHERE level = 0 AND idx = 1",
        [],
    );
    assert_found_inconsistent(&c, &daemon, &tile, "a node row deleted behind lavd");
}

/// A tile's node row truncated behind lavd (the schema's length check set
/// aside): not a hash, so the log is marked inconsistent.
#[test]
fn a_hash_tile_whose_node_row_was_truncated_is_not_served() {
    let (t, daemon, c, size) = small_log();
    let tile = format!("/v1/log/{}", Tile::hashes(0, 0, size as u16).path());
    assert_eq!(c.auditor.get(&tile).status, 200);
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    db.execute_batch("PRAGMA ignore_check_constraints = ON")
        .unwrap();
    let sql = "UPDATE audit_nodes SET hash = substr(hash, 1, 31) WHERE level = 0 AND idx = 2";
    assert_eq!(db.execute(sql, []).unwrap(), 1);
    assert_found_inconsistent(&c, &daemon, &tile, "is 31 bytes, not a hash");
}

/// The last leaf row deleted behind lavd, its nodes left: a hash tile the
/// signed checkpoint covers is not served, and, SQLite's reads never being
/// behind, the log is marked inconsistent (503 `log_inconsistent`). Before
/// 2026-12-07 the client was answered 400 `bad_proof_request`, as if it had
/// asked for too much. (On PostgreSQL, where a read on a standby that is
/// behind looks the same, it is 503 `store_unavailable`; the entry bundle
/// tells the two apart: `replicas.rs`.)
#[test]
fn a_hash_tile_over_a_leaf_deleted_behind_lavd_is_not_served() {
    let (t, daemon, c, size) = small_log();
    let tile = format!("/v1/log/{}", Tile::hashes(0, 0, size as u16).path());
    assert_eq!(c.auditor.get(&tile).status, 200);
    tamper_one(
        &t,
        "DELETE FROM audit_leaves WHERE idx = ?1",
        [i64::try_from(size - 1).unwrap()],
    );
    assert_found_inconsistent(
        &c,
        &daemon,
        &tile,
        "cannot be read as the signed checkpoint",
    );
}

//! One function per parser family of untrusted bytes: what every input, from
//! a fuzzer, a property test or a regression file, must satisfy. Each calls
//! lavd's public parse functions and checks that
//! - nothing panics;
//! - every rejection is the module's typed error with a code from the set
//!   the docs name (cited beside each set);
//! - where a serializer exists, what parses serializes back to something
//!   that parses to the same value, and a canonical form comes back byte for
//!   byte.
//!
//! This file is the whole of each fuzz target: `fuzz/fuzz_targets/*.rs`
//! include it with `#[path]` and call one function, and the regression
//! replay (`regressions.rs`) calls the same function on every file in
//! `fuzz/regressions/<target>/`. It uses only `lavd` and `std`, so that the
//! fuzz crate needs no other dependency.

// Test code: a broken property must panic, which is what a fuzzer reports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::OnceLock;

use lavd::audit::export::{verify_export, Export};
use lavd::audit::leaf::Leaf;
use lavd::audit::note::{verify_checkpoint, Checkpoint, VerifierKey};
use lavd::audit::tiles::{decode_bundle, encode_bundle, Tile, TilePathError};
use lavd::audit::witness::{
    check_add_checkpoint, check_against_record, verify_cosignatures, AddCheckpoint, CosignerKey,
    Policy,
};
use lavd::config::{Env, RawConfig, Settings};
use lavd::envelope::{Envelope, EnvelopeLimits, Header, HeaderBuilder};
use lavd::unwrap::{authority_revocation_jws, AdminRevocation};
use lavd::warrant::{jws, Claims, RevocationClaims, TrustStore, Verifier, WarrantLimits};

/// One parser family's check of one input.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: the directory names under `fuzz/regressions/`
/// and the binaries of `fuzz/Cargo.toml`.
pub const TARGETS: &[(&str, Target)] = &[
    ("envelope", envelope),
    ("warrant", warrant),
    ("revocation", revocation),
    ("note", note),
    ("tiles", tiles),
    ("witness", witness),
    ("export", export),
    ("config", config),
];

/// Every code `Envelope::parse` and `Header::parse` may give (docs/envelope.md:
/// "Every parse error has code `malformed_envelope`").
pub const ENVELOPE_CODES: &[&str] = &["malformed_envelope"];

/// Codes of the JWS structure and claims (docs/openapi.yaml, 400 and 413 of
/// `/v1/unwrap`).
pub const WARRANT_PARSE_CODES: &[&str] = &[
    "malformed_warrant",
    "warrant_too_large",
    "unsupported_algorithm",
    "crit_not_supported",
    "unprotected_header",
];

/// Codes of a structurally valid warrant that does not authorise the request
/// (docs/openapi.yaml, 403 of `/v1/unwrap`; the store's codes cannot come
/// from `Verifier::verify`).
pub const WARRANT_VERIFY_CODES: &[&str] = &[
    "unknown_authority",
    "algorithm_mismatch",
    "bad_signature",
    "authority_not_valid",
    "policy_not_met",
    "warrant_not_yet_valid",
    "warrant_expired",
    "emergency_not_allowed",
    "emergency_expired",
    "agency_mismatch",
];

/// Codes of a checkpoint or signed note refused (docs/audit.md §5 table).
pub const NOTE_CODES: &[&str] = &[
    "note_too_large",
    "note_malformed",
    "note_unverified",
    "signature_invalid",
    "checkpoint_malformed",
    "origin_mismatch",
];

/// Codes of a verifier key refused (`NoteError::code`).
pub const VKEY_CODES: &[&str] = &[
    "verifier_key_malformed",
    "verifier_key_id_mismatch",
    "verifier_key_unsupported",
];

/// Codes of an audit leaf refused (docs/audit.md §5 table).
pub const LEAF_CODES: &[&str] = &[
    "leaf_too_large",
    "leaf_not_json",
    "leaf_not_canonical",
    "leaf_invalid",
];

/// Codes of an export refused (docs/audit.md §5 table).
pub const EXPORT_CODES: &[&str] = &[
    "export_malformed",
    "export_origin_mismatch",
    "checkpoint_beyond_export",
    "earlier_checkpoint_refused",
    "entry_index_mismatch",
    "entries_missing",
    "entries_extra",
    "leaf_not_base64",
    "leaf_seq_mismatch",
    "root_mismatch",
    "checkpoints_inconsistent",
];

/// Codes of a cosignature or witness policy refused (docs/audit.md, the
/// witness policy section; `WitnessError::code`).
pub const WITNESS_CODES: &[&str] = &[
    "bad_witness_key",
    "cosignature_invalid",
    "bad_policy",
    "unknown_log",
    "quorum_not_met",
];

/// Codes of an `add-checkpoint` body that does not parse (docs/audit.md,
/// the witness section; `AddCheckpointError::code`).
pub const ADD_CHECKPOINT_CODES: &[&str] = &[
    "add_checkpoint_too_large",
    "body_not_utf8",
    "old_line_malformed",
    "old_size_malformed",
    "proof_not_terminated",
    "proof_too_long",
    "proof_line_malformed",
];

/// Codes of a tile path or tile refused (docs/audit.md, the tiles section;
/// `TilePathError::code`, `TileError::code`).
pub const TILE_CODES: &[&str] = &[
    "tile_path_malformed",
    "tile_length_mismatch",
    "bundle_malformed",
    "tile_unavailable",
    "tile_outside_tree",
];

/// C2SP tlog-witness `add-checkpoint` answers other than 200.
pub const ADD_CHECKPOINT_STATUSES: &[u16] = &[400, 403, 404, 409, 422];

/// Asserts `code` is in `set`, naming the input on failure.
pub fn assert_code(code: &str, set: &[&[&str]], what: &str, input: &[u8]) {
    assert!(
        set.iter().any(|s| s.contains(&code)),
        "{what}: undocumented code `{code}` for input {:?}",
        String::from_utf8_lossy(input)
    );
}

/// The time every verification runs at.
pub fn now() -> time::OffsetDateTime {
    lavd::codec::parse_time("2026-11-25T12:00:00Z").unwrap()
}

/// The agency the warrant target verifies for.
pub const AGENCY: &str = "spiffe://agency.example/lea/unit-7";

/// A fixed trust store (public keys of RFC 7515 A.3 and RFC 8037 A.2) under
/// the double lock, built once: the warrant target runs the whole verifier.
fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let toml = r#"
[[authorities]]
kid = "executive-1"
role = "executive"
alg = "ES256"
jwk = '{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}'
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2028-01-01T00:00:00Z"

[[authorities]]
kid = "judicial-1"
role = "judicial"
alg = "EdDSA"
jwk = '{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}'
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2028-01-01T00:00:00Z"

[policy]
[[policy.require]]
role = "executive"
count = 1
[[policy.require]]
role = "judicial"
count = 1
"#;
        let trust = TrustStore::from_toml(toml, Path::new(".")).unwrap();
        Verifier::new(trust, WarrantLimits::default())
    })
}

/// A fixed log key (the public key of RFC 8032 §7.1 test 1) named as the
/// origin the note target checks against.
pub fn log_key() -> VerifierKey {
    VerifierKey::new("lavd.example/audit", &RFC8032_TEST1_PUBLIC).unwrap()
}

/// RFC 8032 §7.1, TEST 1, PUBLIC KEY.
pub const RFC8032_TEST1_PUBLIC: [u8; 32] = [
    0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07, 0x3a,
    0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07, 0x51, 0x1a,
];

/// A checkpoint of `lavd.example/audit` signed by [`log_key`]'s key and
/// cosigned by `witness.example/w1` (the witness target's seed).
pub const COSIGNED: &str = include_str!("../../../fuzz/seeds/witness/cosigned");

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Envelopes and their headers (PROTOCOL §3).
pub fn envelope(data: &[u8]) {
    let limits = EnvelopeLimits::default();
    match Envelope::parse(data, &limits) {
        Ok(env) => {
            // The serializer writes the canonical form, which parses to the
            // same envelope and serializes to itself.
            let json = env.to_json();
            let again = Envelope::parse(json.as_bytes(), &limits).expect("to_json parses");
            assert_eq!(again, env);
            assert_eq!(again.to_json(), json);
        }
        Err(e) => assert_code(e.code(), &[ENVELOPE_CODES], "Envelope::parse", data),
    }
    match Header::parse(data, &limits) {
        Ok(h) => {
            let mut builder = HeaderBuilder::new(h.kid(), h.provider(), h.target(), h.time());
            if let Some(r) = h.reference() {
                builder = builder.reference(r);
            }
            // The builder writes whole seconds; the parsed header keeps what
            // it was given.
            let built = builder.build().expect("a parsed header can be rebuilt");
            let again = Header::parse(&built, &limits).expect("the builder's header parses");
            assert_eq!(
                (
                    again.kid(),
                    again.provider(),
                    again.target(),
                    again.reference()
                ),
                (h.kid(), h.provider(), h.target(), h.reference())
            );
            if h.time().nanosecond() == 0 {
                assert_eq!(again, h);
            }
        }
        Err(e) => assert_code(e.code(), &[ENVELOPE_CODES], "Header::parse", data),
    }
}

/// Warrant JWS (both JSON serializations), claims, and the whole verifier.
pub fn warrant(data: &[u8]) {
    let limits = WarrantLimits::default();
    match jws::parse(data, &limits) {
        Ok(parsed) => {
            let json = parsed.to_json();
            let again = jws::parse(json.as_bytes(), &limits).expect("to_json parses");
            assert_eq!(again.payload(), parsed.payload());
            assert_eq!(again.signatures().len(), parsed.signatures().len());
            for (a, b) in again.signatures().iter().zip(parsed.signatures()) {
                assert_eq!(
                    (a.alg(), a.kid(), a.signature()),
                    (b.alg(), b.kid(), b.signature())
                );
                assert_eq!(again.signing_input(a), parsed.signing_input(b));
            }
            assert_eq!(again.to_json(), json);
        }
        Err(e) => assert_code(e.code(), &[WARRANT_PARSE_CODES], "jws::parse", data),
    }
    if let Err(e) = Claims::parse(data) {
        assert_code(e.code(), &[WARRANT_PARSE_CODES], "Claims::parse", data);
    }
    if let Err(e) = verifier().verify(data, now(), AGENCY) {
        assert_code(
            e.code(),
            &[WARRANT_PARSE_CODES, WARRANT_VERIFY_CODES],
            "Verifier::verify",
            data,
        );
    }
}

/// Revocations: the admin body, the authority body and its JWS payload.
pub fn revocation(data: &[u8]) {
    match AdminRevocation::parse(data) {
        Ok(r) => {
            assert!(lavd::bounds::warrant_id(&r.id).is_ok());
            assert!(lavd::bounds::reason(&r.reason).is_ok());
        }
        Err(e) => assert_eq!(e.code(), "malformed_request", "{data:?}"),
    }
    match authority_revocation_jws(data) {
        Ok(inner) => {
            if let Err(e) = verifier().verify_revocation(inner, now()) {
                assert_code(
                    e.code(),
                    &[WARRANT_PARSE_CODES, WARRANT_VERIFY_CODES],
                    "verify_revocation",
                    data,
                );
            }
        }
        Err(e) => assert_eq!(e.code(), "malformed_request", "{data:?}"),
    }
    match RevocationClaims::parse(data) {
        Ok(r) => {
            assert!(lavd::bounds::warrant_id(&r.id).is_ok());
            assert!(lavd::bounds::reason(&r.reason).is_ok());
        }
        Err(e) => assert_eq!(e.code(), "malformed_warrant", "{data:?}"),
    }
}

/// Checkpoints, signed notes and verifier keys (C2SP signed-note,
/// tlog-checkpoint).
pub fn note(data: &[u8]) {
    let Some(text) = text(data) else { return };
    match Checkpoint::parse(text) {
        // Only the canonical spelling parses, so it comes back byte for byte.
        Ok(c) => assert_eq!(c.to_body(), text),
        Err(e) => assert_eq!(e.code(), "checkpoint_malformed", "{text:?}"),
    }
    match VerifierKey::parse(text) {
        Ok(k) => assert_eq!(k.to_string(), text),
        Err(e) => assert_code(e.code(), &[VKEY_CODES], "VerifierKey::parse", data),
    }
    if let Err(e) = verify_checkpoint(text, &log_key()) {
        assert_code(e.code(), &[NOTE_CODES], "verify_checkpoint", data);
    }
}

/// Tile paths and entry bundles (C2SP tlog-tiles).
pub fn tiles(data: &[u8]) {
    if let Some(text) = text(data) {
        match Tile::parse(text) {
            // Only the canonical spelling parses.
            Ok(tile) => assert_eq!(tile.path(), format!("tile/{text}")),
            Err(e) => {
                let TilePathError::Malformed(why) = &e;
                assert!(!why.is_empty());
                assert_code(e.code(), &[TILE_CODES], "Tile::parse", data);
            }
        }
    }
    // The bytes as an entry bundle of every width that could hold them.
    for width in [1u16, 2, 3, 255, 256] {
        let tile = Tile::entries(0, width);
        match decode_bundle(&tile, data) {
            Ok(leaves) => {
                assert_eq!(leaves.len(), usize::from(width));
                assert_eq!(encode_bundle(&leaves).as_deref(), Ok(data));
            }
            Err(e) => assert_code(e.code(), &[TILE_CODES], "decode_bundle", data),
        }
    }
}

/// Witness keys, cosignature lines, tlog-policy files and `add-checkpoint`
/// bodies (C2SP tlog-cosignature, tlog-policy, tlog-witness).
pub fn witness(data: &[u8]) {
    if let Some(text) = text(data) {
        match CosignerKey::parse(text) {
            Ok(k) => assert_eq!(k.to_string(), text),
            Err(e) => assert_code(e.code(), &[WITNESS_CODES], "CosignerKey::parse", data),
        }
        let key = CosignerKey::new("witness.example/w1", &RFC8032_TEST1_PUBLIC).unwrap();
        if let Err(e) = verify_cosignatures(text, &key) {
            assert_code(
                e.code(),
                &[WITNESS_CODES, NOTE_CODES],
                "verify_cosignatures",
                data,
            );
        }
    }
    match Policy::parse(data) {
        Ok(policy) => {
            // A policy the parser accepts judges a checkpoint without failing
            // in any undocumented way (and in bounded time): the seed's
            // checkpoint, signed by the log key of [`log_key`] and cosigned
            // by `witness.example/w1` (RFC 8032 test 2 key), so that a
            // policy naming those keys reaches the quorum rule.
            if let Err(e) = policy.verify(COSIGNED) {
                assert_code(
                    e.code(),
                    &[WITNESS_CODES, NOTE_CODES],
                    "Policy::verify",
                    data,
                );
            }
        }
        Err(e) => assert_eq!(e.code(), "bad_policy", "{data:?}"),
    }
    match AddCheckpoint::parse(data) {
        Ok(request) => {
            // The request form is canonical: it comes back byte for byte.
            assert_eq!(request.encode().as_bytes(), data);
            let key = log_key();
            let trusted = |origin: &str| {
                if origin == key.name() {
                    vec![key.clone()]
                } else {
                    Vec::new()
                }
            };
            if let Err(outcome) = check_add_checkpoint(&request, &trusted, &|_| None) {
                assert!(ADD_CHECKPOINT_STATUSES.contains(&outcome.status()));
            }
            // Past the signature (which an input rarely carries), against
            // recorded states: the old size, the consistency proof and the
            // fork checks see hostile values too.
            let text = request
                .checkpoint
                .rsplit_once("\n\n")
                .map_or(request.checkpoint.as_str(), |(text, _)| text);
            if let Ok(checkpoint) = Checkpoint::parse_with_extensions(&format!("{text}\n")) {
                let seen = [
                    None,
                    Some((1, [0; 32])),
                    Some((request.old_size, checkpoint.root)),
                    Some((request.old_size, [7; 32])),
                ];
                for recorded in seen {
                    if let Err(outcome) =
                        check_against_record(&request, checkpoint.clone(), recorded)
                    {
                        assert!(ADD_CHECKPOINT_STATUSES.contains(&outcome.status()));
                    }
                }
            }
        }
        // The witness answers a body that does not parse with 400.
        Err(e) => assert_code(
            e.code(),
            &[ADD_CHECKPOINT_CODES],
            "AddCheckpoint::parse",
            data,
        ),
    }
}

/// Audit leaves and export files.
pub fn export(data: &[u8]) {
    match Leaf::parse(data) {
        // Leaves are canonical: the bytes come back exactly.
        Ok(leaf) => assert_eq!(leaf.to_bytes().as_deref(), Ok(data)),
        Err(e) => assert_code(e.code(), &[LEAF_CODES], "Leaf::parse", data),
    }
    match Export::parse(data) {
        Ok(export) => {
            let json = export.to_json().expect("an export serializes");
            assert_eq!(Export::parse(&json).as_ref(), Ok(&export));
            if let Err(e) = verify_export(&export, &log_key(), None) {
                assert_code(
                    e.code(),
                    &[EXPORT_CODES, LEAF_CODES, NOTE_CODES],
                    "verify_export",
                    data,
                );
            }
        }
        Err(e) => assert_eq!(e.code(), "export_malformed", "{data:?}"),
    }
}

/// Every environment variable is set (to a PIN-like value), so that
/// validation goes past `pin_env` to the rest of the file.
#[derive(Debug)]
pub struct AnyEnv;

impl Env for AnyEnv {
    fn var(&self, _: &str) -> Result<String, std::env::VarError> {
        Ok("123456".into())
    }
}

/// `lavd.toml`: the TOML parse and the validation into settings. A refusal
/// names a field and a reason (`main` exits 64 with them).
pub fn config(data: &[u8]) {
    let Some(text) = text(data) else { return };
    match RawConfig::parse(text) {
        Ok(raw) => {
            if let Err(e) = Settings::from_raw(raw, Path::new("/nonexistent/lavd.toml"), &AnyEnv) {
                assert!(!e.field.is_empty() && !e.reason.is_empty(), "{e:?}");
            }
        }
        Err((field, reason)) => assert!(!field.is_empty() && !reason.is_empty()),
    }
}

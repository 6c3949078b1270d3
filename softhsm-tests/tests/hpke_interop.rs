//! HPKE (PROTOCOL §3 and §5) against an independent implementation:
//! pyhpke, on Python's cryptography, driven by
//! `softhsm-tests/interop/hpke_party.py`, which was written from PROTOCOL
//! and RFC 9180, not from lavd's code. The RFC's test vectors cover the
//! primitive; this covers the layer above it, where both sides could share
//! a misreading: the envelope's `info` (`"lav-envelope-v1" ‖ 0x00 ‖
//! header`), its empty `aad`, and the reply's one context (`info =
//! "lav-result-v1"`), whose i-th `Seal` is the i-th `ok` result with that
//! envelope's header bytes as `aad`.
//!
//! Against a real `lavd serve` on SoftHSM over mutual TLS: envelopes the
//! Python provider sealed to the key lavd publishes open (the DH in the
//! HSM), and the reply, sealed to a recipient key Python made, opens in
//! Python to the same DEKs, in order, past a denied envelope in between;
//! its `sealed_to.kid` is that key's RFC 7638 thumbprint as Python computes
//! it from the RFC.

use std::process::Command;

use softhsm_tests::server::path_str;
use softhsm_tests::vault::{self, Vault, AGENCY, PROVIDER, TARGET};
use time::OffsetDateTime;

/// Runs the Python party; returns its stdout.
fn party(args: &[&str]) -> String {
    let out = Command::new(softhsm_tests::interop_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/interop/hpke_party.py"
        ))
        .args(args)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "hpke_party.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn envelopes_pyhpke_sealed_open_in_lavd_and_its_reply_opens_in_pyhpke() {
    let v = Vault::start("");
    let c = v.parties.clients(&v.pki, v.daemon.api);
    let dir = v.t.path("hpke-interop");
    std::fs::create_dir_all(&dir).unwrap();
    let keys = c.provider.get("/v1/keys");
    assert_eq!(keys.status, 200, "{}", keys.text());
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, &keys.body).unwrap();

    // The provider, in Python: three envelopes, the second for a target
    // the warrant does not name.
    let time = lavd::codec::format_time(OffsetDateTime::now_utc() - time::Duration::hours(1));
    let deks = [
        "00112233445566778899aabbccddeeff",
        "0f0e0d0c0b0a09080706050403020100",
        "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf",
    ];
    let envelopes: Vec<serde_json::Value> = deks
        .iter()
        .enumerate()
        .map(|(i, dek)| {
            let target = if i == 1 {
                "acct:bob@example.com"
            } else {
                TARGET
            };
            let header = serde_json::json!({
                "kid": "E-1",
                "suite": "16-1-2",
                "provider": PROVIDER,
                "target": target,
                "time": time,
                "ref": format!("py-{i}"),
            })
            .to_string();
            let file = dir.join(format!("header-{i}.json"));
            std::fs::write(&file, header).unwrap();
            let sealed = party(&["seal", &path_str(&jwks), "E-1", &path_str(&file), dek]);
            serde_json::from_str(sealed.trim()).expect("an envelope")
        })
        .collect();

    // The agency's recipient key, made in Python; lavd never sees its
    // private half.
    let recipient = party(&["recipient", &path_str(&dir)]);
    let recipient: serde_json::Value = serde_json::from_str(recipient.trim()).unwrap();
    let mut claims = vault::claims("W-HPKE-INTEROP", vault::recipient().public(), 10);
    claims["recipient"] = recipient;
    assert_eq!(claims["agency"], AGENCY);
    let request = serde_json::json!({
        "warrant": vault::double_lock(&claims),
        "envelopes": envelopes,
    });
    let reply = vault::post(&c.agency, "/v1/unwrap", &request);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let request_file = dir.join("request.json");
    let reply_file = dir.join("reply.json");
    std::fs::write(&request_file, request.to_string()).unwrap();
    std::fs::write(&reply_file, &reply.body).unwrap();

    let opened = party(&[
        "open",
        &path_str(&dir),
        &path_str(&request_file),
        &path_str(&reply_file),
    ]);
    assert_eq!(
        opened.lines().collect::<Vec<_>>(),
        [
            format!("ok {}", deks[0]),
            "denied target_not_in_warrant".to_string(),
            format!("ok {}", deks[2]),
        ]
    );
    // The statuses as sent.
    assert_eq!(
        vault::statuses(&reply.json()),
        ["ok", "target_not_in_warrant", "ok"]
    );
}

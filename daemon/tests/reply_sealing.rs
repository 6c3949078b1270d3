//! PROTOCOL §5 reply sealing: one HPKE context per reply to the warrant's
//! recipient, `info = "lav-result-v1"`, the i-th `ok` result is the i-th Seal
//! with `aad` = that envelope's header bytes.
// A test crate: its helper functions (outside `#[test]`) panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lavd::codec::{b64_decode, b64_encode, parse_time};
use lavd::envelope::hpke::{self, Aead};
use lavd::envelope::reply::{
    open_reply, AuditRef, DenyReason, OpenedReply, Outcome, ReplyBuilder, ReplyError,
};
use lavd::envelope::HeaderBuilder;
use lavd::jwk::P256PrivateKey;
use serde_json::{json, Value};

fn header(reference: Option<&str>, target: &str) -> Vec<u8> {
    let mut b = HeaderBuilder::new(
        "2026-11",
        "spiffe://provider.example/mail",
        target,
        parse_time("2026-11-26T07:25:21Z").unwrap(),
    );
    if let Some(r) = reference {
        b = b.reference(r);
    }
    b.build().unwrap()
}

fn audit() -> AuditRef {
    AuditRef {
        checkpoint: "lav.example/log\n4\nAAAA\n\n— lav.example/log abcd\n".into(),
        first_index: 1042,
        count: 4,
    }
}

struct Fixture {
    recipient: P256PrivateKey,
    headers: Vec<Vec<u8>>,
    reply: String,
}

/// A four-envelope request: ok, denied, ok, denied.
fn fixture() -> Fixture {
    let recipient = P256PrivateKey::generate().unwrap();
    let headers = vec![
        header(Some("msg-1"), "acct:alice@example.com"),
        header(Some("msg-2"), "acct:alice@example.com"),
        header(None, "acct:bob@example.com"),
        header(Some("msg-4"), "acct:carol@example.com"),
    ];
    let mut b = ReplyBuilder::new(recipient.public()).unwrap();
    b.push_opened(&headers[0], &[0x11; 16]).unwrap();
    b.push_denied(DenyReason::OutOfWindow);
    b.push_opened(&headers[2], &[0x33; 64]).unwrap();
    b.push_denied(DenyReason::BudgetExhausted);
    let reply = b.finish(audit()).to_json();
    Fixture {
        recipient,
        headers,
        reply,
    }
}

fn open(f: &Fixture, reply: &str) -> Result<OpenedReply, ReplyError> {
    open_reply(&f.recipient, &f.headers, reply.as_bytes())
}

fn edit(reply: &str, change: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(reply).unwrap();
    change(&mut v);
    v.to_string()
}

#[test]
fn reply_opens_with_the_recipient_key() {
    let f = fixture();
    let opened = open(&f, &f.reply).unwrap();
    assert_eq!(opened.audit, audit());
    let summary: Vec<(usize, Option<&str>, String)> = opened
        .results
        .iter()
        .map(|r| {
            let outcome = match &r.outcome {
                Outcome::Ok(dek) => hex::encode(&dek[..]),
                Outcome::Denied(reason) => reason.as_str().to_owned(),
            };
            (r.index, r.reference.as_deref(), outcome)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, Some("msg-1"), "11".repeat(16)),
            (1, Some("msg-2"), "out_of_window".to_owned()),
            (2, None, "33".repeat(64)),
            (3, Some("msg-4"), "budget_exhausted".to_owned()),
        ]
    );
}

#[test]
fn reply_has_the_protocol_shape() {
    let f = fixture();
    let v: Value = serde_json::from_str(&f.reply).unwrap();
    assert_eq!(
        v["sealed_to"]["kid"],
        json!(f.recipient.public().thumbprint())
    );
    assert_eq!(
        b64_decode(v["sealed_to"]["enc"].as_str().unwrap())
            .unwrap()
            .len(),
        65
    );
    assert_eq!(
        v["results"][1],
        json!({"status":"denied","reason":"out_of_window"})
    );
    assert_eq!(v["results"][0].as_object().unwrap().len(), 2);
    assert_eq!(v["results"][0]["status"], json!("ok"));
    assert_eq!(
        v["audit"],
        json!({"checkpoint": audit().checkpoint, "first_index": 1042, "count": 4})
    );
    // Member order as in PROTOCOL §5.
    assert!(
        f.reply.starts_with(r#"{"sealed_to":{"kid":""#),
        "{}",
        f.reply
    );
}

#[test]
fn construction_matches_the_protocol_byte_for_byte() {
    // Open with the bare HPKE API and the documented parameters, not open_reply.
    let f = fixture();
    let v: Value = serde_json::from_str(&f.reply).unwrap();
    let enc = lavd::jwk::P256PublicKey::from_sec1(
        &b64_decode(v["sealed_to"]["enc"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let mut ctx = hpke::setup_base_r(
        &enc,
        f.recipient.public(),
        b"lav-result-v1",
        Aead::Aes256Gcm,
        |e| hpke::software_dh(&f.recipient, e),
    )
    .unwrap();
    let ct0 = b64_decode(v["results"][0]["ct"].as_str().unwrap()).unwrap();
    let ct2 = b64_decode(v["results"][2]["ct"].as_str().unwrap()).unwrap();
    assert_eq!(&ctx.open(&f.headers[0], &ct0).unwrap()[..], &[0x11; 16]);
    assert_eq!(&ctx.open(&f.headers[2], &ct2).unwrap()[..], &[0x33; 64]);
}

#[test]
fn another_key_is_told_it_is_not_the_recipient() {
    let f = fixture();
    let other = P256PrivateKey::generate().unwrap();
    let err = open_reply(&other, &f.headers, f.reply.as_bytes()).unwrap_err();
    assert_eq!(err.code(), "recipient_mismatch");
    assert_eq!(
        err,
        ReplyError::RecipientMismatch {
            expected: other.public().thumbprint(),
            found: f.recipient.public().thumbprint(),
        }
    );
    assert!(err.to_string().contains("RFC 7638 thumbprint"), "{err}");
    // A kid from the reply file with terminal controls is shown escaped.
    let hostile = edit(&f.reply, |v| {
        v["sealed_to"]["kid"] = json!("k\u{1b}[2J\u{202e}")
    });
    let err = open_reply(&other, &f.headers, hostile.as_bytes()).unwrap_err();
    let shown = err.to_string();
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{202e}'),
        "{shown:?}"
    );
    assert!(shown.contains("k\\u{1b}[2J\\u{202e}"), "{shown:?}");
}

#[test]
fn another_key_with_a_forged_kid_fails_to_open() {
    let f = fixture();
    let other = P256PrivateKey::generate().unwrap();
    let forged = edit(&f.reply, |v| {
        v["sealed_to"]["kid"] = json!(other.public().thumbprint());
    });
    let err = open_reply(&other, &f.headers, forged.as_bytes()).unwrap_err();
    assert_eq!(err, ReplyError::OpenFailed { index: 0 });
    assert_eq!(err.code(), "open_failed");
}

#[test]
fn swapped_ok_results_fail() {
    let f = fixture();
    let swapped = edit(&f.reply, |v| {
        let results = v["results"].as_array_mut().unwrap();
        results.swap(0, 2);
    });
    assert_eq!(
        open(&f, &swapped).unwrap_err(),
        ReplyError::OpenFailed { index: 0 }
    );
}

#[test]
fn swapped_cts_with_headers_still_fail_by_sequence() {
    // Swap both the ok results and the request's headers: each aad now
    // matches its ct, so only the sequence number catches it.
    let mut f = fixture();
    f.headers.swap(0, 2);
    let swapped = edit(&f.reply, |v| {
        v["results"].as_array_mut().unwrap().swap(0, 2)
    });
    assert_eq!(
        open(&f, &swapped).unwrap_err(),
        ReplyError::OpenFailed { index: 0 }
    );
}

#[test]
fn reordered_request_headers_fail() {
    let mut f = fixture();
    f.headers.swap(0, 1);
    assert_eq!(
        open(&f, &f.reply).unwrap_err(),
        ReplyError::OpenFailed { index: 0 }
    );
}

#[test]
fn dropping_an_earlier_ok_result_breaks_the_later_one() {
    let f = fixture();
    let dropped = edit(&f.reply, |v| {
        v["results"][0] = json!({"status":"denied","reason":"open_failed"});
    });
    assert_eq!(
        open(&f, &dropped).unwrap_err(),
        ReplyError::OpenFailed { index: 2 }
    );
}

#[test]
fn modified_ct_fails() {
    let f = fixture();
    let v: Value = serde_json::from_str(&f.reply).unwrap();
    let mut ct = b64_decode(v["results"][2]["ct"].as_str().unwrap()).unwrap();
    ct[0] ^= 1;
    let modified = edit(&f.reply, |v| v["results"][2]["ct"] = json!(b64_encode(&ct)));
    assert_eq!(
        open(&f, &modified).unwrap_err(),
        ReplyError::OpenFailed { index: 2 }
    );
}

#[test]
fn count_mismatch_is_refused() {
    let mut f = fixture();
    f.headers.pop();
    assert_eq!(
        open(&f, &f.reply).unwrap_err(),
        ReplyError::CountMismatch {
            expected: 3,
            found: 4
        }
    );
}

#[test]
fn malformed_replies_are_refused() {
    let f = fixture();
    let cases: Vec<(String, &str)> = vec![
        (
            edit(&f.reply, |v| v["results"][1]["extra"] = json!(1)),
            "unknown field `extra`",
        ),
        (
            edit(&f.reply, |v| v["audit"]["extra"] = json!(1)),
            "unknown field",
        ),
        (
            edit(&f.reply, |v| {
                v["results"][1]["reason"] = json!("audit_commit_failed")
            }),
            "unknown denial reason",
        ),
        (
            edit(&f.reply, |v| v["results"][1]["reason"] = json!("bored")),
            "unknown denial reason",
        ),
        (
            edit(&f.reply, |v| {
                v["results"][0]["reason"] = json!("open_failed")
            }),
            "`ok` needs `ct` and no `reason`",
        ),
        (
            edit(&f.reply, |v| v["results"][1]["ct"] = json!("AAAA")),
            "`denied` needs `reason` and no `ct`",
        ),
        (
            edit(&f.reply, |v| v["results"][1]["status"] = json!("maybe")),
            "neither",
        ),
        (
            edit(&f.reply, |v| v["sealed_to"]["enc"] = json!("AAAA")),
            "not a P-256 point",
        ),
        (format!("{} []", f.reply), "trailing"),
        (
            f.reply
                .replacen(r#""results":"#, r#""results":[],"results":"#, 1),
            "duplicate field `results`",
        ),
        // Objects written as arrays of their members' values: serde_json's
        // derive reads those too unless told not to.
        (
            edit(&f.reply, |v| {
                let o = v.as_object().unwrap();
                *v = json!([o["sealed_to"], o["results"], o["audit"]]);
            }),
            "expected a JSON object",
        ),
        (
            edit(&f.reply, |v| {
                v["sealed_to"] = json!([v["sealed_to"]["kid"], v["sealed_to"]["enc"]]);
            }),
            "expected a JSON object",
        ),
        (
            edit(&f.reply, |v| {
                v["results"][1] = json!([v["results"][1]["status"], v["results"][1]["reason"]]);
            }),
            "expected a JSON object",
        ),
        (
            edit(&f.reply, |v| {
                let a = &v["audit"];
                v["audit"] = json!([a["checkpoint"], a["first_index"], a["count"]]);
            }),
            "expected a JSON object",
        ),
    ];
    for (reply, needle) in cases {
        let err = open(&f, &reply).unwrap_err();
        assert_eq!(err.code(), "malformed_reply", "{reply}");
        assert!(
            matches!(&err, ReplyError::Malformed(m) if m.contains(needle)),
            "{err}"
        );
    }
}

#[test]
fn builder_refuses_bad_dek_lengths() {
    let recipient = P256PrivateKey::generate().unwrap();
    let mut b = ReplyBuilder::new(recipient.public()).unwrap();
    let h = header(None, "acct:a");
    assert_eq!(
        b.push_opened(&h, &[0; 15]).unwrap_err(),
        ReplyError::InvalidDek { index: 0, len: 15 }
    );
    assert_eq!(
        b.push_opened(&h, &[0; 65]).unwrap_err(),
        ReplyError::InvalidDek { index: 0, len: 65 }
    );
    // Nothing was appended and the sequence did not advance.
    b.push_opened(&h, &[7; 16]).unwrap();
    let reply = b.finish(audit()).to_json();
    let opened = open_reply(&recipient, &[h], reply.as_bytes()).unwrap();
    assert!(matches!(&opened.results[0].outcome, Outcome::Ok(d) if d[..] == [7; 16]));
}

#[test]
fn deny_reasons_round_trip_and_debug_redacts_deks() {
    for r in DenyReason::ALL {
        assert_eq!(DenyReason::from_code(r.as_str()), Some(r));
    }
    assert_eq!(DenyReason::from_code("malformed"), None);
    let f = fixture();
    let opened = open(&f, &f.reply).unwrap();
    let text = format!("{opened:?}");
    assert!(text.contains("Ok(<redacted DEK>)"), "{text}");
    assert!(!text.contains("17, 17"), "{text}");
}

/// The limit of PROTOCOL v1's `aad` (the header alone), pinned so that a
/// change to it shows here: two envelopes of one request with the same
/// header bytes (same kid, provider, target and second, no `ref`) can trade
/// an `ok` and a `denied`, and the `ok` opens as the other's DEK. Only TLS
/// stands against that edit (docs/envelope.md, THREAT_MODEL §4.3).
#[test]
fn an_ok_moved_onto_an_envelope_with_the_same_header_still_opens() {
    let recipient = P256PrivateKey::generate().unwrap();
    let same = header(None, "acct:alice@example.com");
    let headers = vec![same.clone(), same.clone()];
    let mut b = ReplyBuilder::new(recipient.public()).unwrap();
    b.push_opened(&headers[0], &[0x11; 16]).unwrap();
    b.push_denied(DenyReason::OutOfWindow);
    let swapped = edit(&b.finish(audit()).to_json(), |v| {
        v["results"].as_array_mut().unwrap().swap(0, 1)
    });
    let opened = open_reply(&recipient, &headers, swapped.as_bytes()).unwrap();
    assert!(matches!(opened.results[0].outcome, Outcome::Denied(_)));
    assert!(
        matches!(&opened.results[1].outcome, Outcome::Ok(dek) if dek[..] == [0x11; 16]),
        "the first envelope's DEK, given as the second's"
    );
}

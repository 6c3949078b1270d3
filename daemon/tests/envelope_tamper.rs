//! PROTOCOL §3 "Changing any byte of the header makes opening fail": every
//! bit of every byte of the header, `enc` and `ct` is flipped in turn; each
//! result is refused with the exact code (`malformed_envelope` when the part
//! no longer parses, otherwise `open_failed`) and never yields a DEK.
// A test crate: its helper functions (outside `#[test]`) panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lavd::codec::b64_encode;
use lavd::envelope::hpke::software_dh;
use lavd::envelope::{open_envelope, seal_envelope, Envelope, EnvelopeLimits, Header};
use lavd::jwk::{P256PrivateKey, P256PublicKey};

const HEADER: &str = r#"{"kid":"2026-11","suite":"16-1-2","provider":"spiffe://provider.example/mail","target":"acct:alice@example.com","time":"2026-11-26T07:25:21Z","ref":"msg-8812"}"#;

#[derive(Clone, Copy, Debug)]
enum Part {
    Header,
    Enc,
    Ct,
}

/// Counts of each outcome, so the test proves both paths were exercised.
#[derive(Default, Debug)]
struct Tally {
    malformed: usize,
    open_failed: usize,
}

fn tamper_all(part: Part) -> Tally {
    let key = P256PrivateKey::generate().unwrap();
    let env = seal_envelope(key.public(), HEADER.as_bytes(), &[0x5a; 32]).unwrap();
    let original: Vec<u8> = match part {
        Part::Header => env.header_bytes().to_vec(),
        Part::Enc => env.enc().sec1().to_vec(),
        Part::Ct => env.ct().to_vec(),
    };
    let mut tally = Tally::default();
    for i in 0..original.len() {
        for bit in 0..8 {
            let mut bytes = original.clone();
            bytes[i] ^= 1 << bit;
            let (header, enc, ct) = match part {
                Part::Header => (bytes.clone(), env.enc().sec1().to_vec(), env.ct().to_vec()),
                Part::Enc => (
                    env.header_bytes().to_vec(),
                    bytes.clone(),
                    env.ct().to_vec(),
                ),
                Part::Ct => (
                    env.header_bytes().to_vec(),
                    env.enc().sec1().to_vec(),
                    bytes.clone(),
                ),
            };
            let json = format!(
                r#"{{"v":1,"header":"{}","enc":"{}","ct":"{}"}}"#,
                b64_encode(&header),
                b64_encode(&enc),
                b64_encode(&ct)
            );
            // What the flip should give, decided from the part alone.
            let still_parses = match part {
                Part::Header => Header::parse(&header, &EnvelopeLimits::default()).is_ok(),
                Part::Enc => P256PublicKey::from_sec1(&enc).is_ok(),
                Part::Ct => true,
            };
            let code = match Envelope::parse(json.as_bytes(), &EnvelopeLimits::default()) {
                Err(e) => e.code(),
                Ok(parsed) => {
                    match open_envelope(&parsed, key.public(), |e| software_dh(&key, e)) {
                        Ok(_) => panic!("{part:?} byte {i} bit {bit}: tampered envelope opened"),
                        Err(e) => e.code(),
                    }
                }
            };
            let want = if still_parses {
                "open_failed"
            } else {
                "malformed_envelope"
            };
            assert_eq!(code, want, "{part:?} byte {i} bit {bit}");
            match code {
                "open_failed" => tally.open_failed += 1,
                _ => tally.malformed += 1,
            }
        }
    }
    assert_eq!(tally.malformed + tally.open_failed, original.len() * 8);
    tally
}

#[test]
fn every_header_bit_flip_is_refused() {
    let tally = tamper_all(Part::Header);
    // Flips inside string values keep the JSON valid and must fail in HPKE;
    // flips of quotes and braces break the JSON.
    assert!(tally.open_failed > 0, "{tally:?}");
    assert!(tally.malformed > 0, "{tally:?}");
}

#[test]
fn every_enc_bit_flip_is_refused() {
    let tally = tamper_all(Part::Enc);
    // Flipping the 0x04 prefix or a coordinate leaves P-256 (off-curve or
    // compressed form): all are malformed.
    assert!(tally.malformed > 0, "{tally:?}");
}

#[test]
fn every_ct_bit_flip_is_refused() {
    let tally = tamper_all(Part::Ct);
    assert_eq!(tally.malformed, 0, "{tally:?}");
    assert_eq!(tally.open_failed, 48 * 8);
}

//! The RFC 9180 test vectors through the HSM path: each vector's recipient
//! private key `skRm` is imported into SoftHSM as a sensitive,
//! non-extractable, derive-only key, and every ciphertext is opened with the
//! DH step running inside the token (`CKM_ECDH1_DERIVE`, `CKD_NULL`) through
//! lavd's HSM layer. The HSM path must equal the RFC.
//!
//! Vectors: `daemon/src/envelope/testdata/hpke-rfc9180-dhkem-p256-hkdf-sha256.json`,
//! from the CFRG `draft-irtf-cfrg-hpke` `test-vectors.json` at commit 5f503c5
//! (base mode, kem 16, kdf 1, aead 1 and 2, 257 encryptions each).

use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use lavd::envelope::hpke::{self, Aead};
use lavd::envelope::{open_envelope, seal_envelope, Envelope, EnvelopeLimits, HeaderBuilder};
use lavd::hsm::Hsm;
use lavd::jwk::{Jwk, P256PrivateKey, P256PublicKey};
use serde::Deserialize;
use softhsm_tests::TestToken;

#[derive(Deserialize)]
struct Vector {
    mode: u8,
    kem_id: u16,
    kdf_id: u16,
    aead_id: u16,
    info: String,
    #[serde(rename = "skRm")]
    sk_rm: String,
    #[serde(rename = "pkRm")]
    pk_rm: String,
    enc: String,
    encryptions: Vec<Encryption>,
    exports: Vec<Export>,
}

#[derive(Deserialize)]
struct Encryption {
    aad: String,
    ct: String,
    pt: String,
}

#[derive(Deserialize)]
struct Export {
    exporter_context: String,
    #[serde(rename = "L")]
    len: usize,
    exported_value: String,
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Imports a P-256 private scalar as lavd's escrow key `kid`: sensitive,
/// non-extractable, derive only. Checks the token agrees before returning.
fn import_escrow_key(t: &TestToken, kid: &str, scalar: &[u8]) {
    let session = t.session();
    let mut template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::Value(scalar.to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Label(format!("lav-escrow:{kid}").into_bytes()),
    ];
    template.extend(softhsm_tests::only_usage(false));
    let key = session.create_object(&template).unwrap();
    let info = session
        .get_attribute_info(key, &[AttributeType::Value])
        .unwrap();
    assert!(matches!(info[0], AttributeInfo::Sensitive), "{info:?}");
}

fn vectors() -> Vec<Vector> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../daemon/src/envelope/testdata/hpke-rfc9180-dhkem-p256-hkdf-sha256.json"
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn rfc9180_vectors_open_through_the_hsm() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    let hsm = Hsm::open(t.settings().hsm).unwrap();
    let mut opened = 0;
    let mut exported = 0;
    let vectors = vectors();
    for (i, v) in vectors.iter().enumerate() {
        assert_eq!((v.mode, v.kem_id, v.kdf_id), (0, 16, 1));
        let aead = match v.aead_id {
            1 => Aead::Aes128Gcm,
            2 => Aead::Aes256Gcm,
            other => panic!("unexpected aead {other}"),
        };
        let kid = format!("rfc-{i}");
        import_escrow_key(&t, &kid, &h(&v.sk_rm));
        let pk_r = P256PublicKey::from_sec1(&h(&v.pk_rm)).unwrap();
        let enc = P256PublicKey::from_sec1(&h(&v.enc)).unwrap();

        // The DH output of the token equals the software DH with skRm.
        let sk_r = P256PrivateKey::from_jwk(&Jwk {
            d: Some(lavd::codec::b64_encode(h(&v.sk_rm)).into()),
            ..pk_r.to_jwk()
        })
        .unwrap();
        let in_hsm = hsm.ecdh(&kid, &enc).unwrap();
        let in_software = hpke::software_dh(&sk_r, &enc).unwrap();
        assert_eq!(*in_hsm, *in_software);

        let mut ctx =
            hpke::setup_base_r(&enc, &pk_r, &h(&v.info), aead, |e| hsm.ecdh(&kid, e)).unwrap();
        for e in &v.encryptions {
            assert_eq!(ctx.open(&h(&e.aad), &h(&e.ct)).unwrap().to_vec(), h(&e.pt));
            opened += 1;
        }
        for x in &v.exports {
            assert_eq!(
                ctx.export(&h(&x.exporter_context), x.len).unwrap().to_vec(),
                h(&x.exported_value)
            );
            exported += 1;
        }
    }
    assert_eq!(vectors.len(), 2);
    assert_eq!(opened, 2 * 257);
    assert_eq!(exported, 2 * 3);
}

#[test]
fn tampered_envelopes_never_open_through_the_hsm() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    let hsm = Hsm::open(t.settings().hsm).unwrap();
    let escrow = hsm.generate_escrow_key("2026-12").unwrap().public;
    let header = HeaderBuilder::new(
        "2026-12",
        "spiffe://provider.example/messaging",
        "acct:alice@example.com",
        lavd::codec::parse_time("2026-12-03T10:00:00Z").unwrap(),
    )
    .reference("msg-1")
    .build()
    .unwrap();
    let dek = [0x42u8; 32];
    let envelope = seal_envelope(&escrow, &header, &dek).unwrap();
    let json = envelope.to_json();
    let limits = EnvelopeLimits::default();
    let open = |env: &Envelope| open_envelope(env, &escrow, |e| hsm.ecdh("2026-12", e));
    assert_eq!(open(&envelope).unwrap().as_slice(), dek);

    // Flip one bit in every byte of the decoded enc and ct, re-encode, and
    // open through the HSM: never a DEK; an invalid point never reaches it.
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for member in ["enc", "ct", "header"] {
        let bytes = lavd::codec::b64_decode(value[member].as_str().unwrap()).unwrap();
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            let mut v = value.clone();
            v[member] = lavd::codec::b64_encode(&tampered).into();
            let code = match Envelope::parse(v.to_string().as_bytes(), &limits) {
                Err(e) => e.code(),
                Ok(env) => match open(&env) {
                    Ok(_) => panic!("{member}[{i}] tampered and still opened"),
                    Err(e) => e.code(),
                },
            };
            *outcomes.entry(format!("{member}:{code}")).or_default() += 1;
        }
    }
    // Every ct flip reaches the HSM and fails authentication.
    assert_eq!(outcomes.get("ct:open_failed"), Some(&48));
    // Every enc flip is refused before or after the HSM, never opens.
    let enc_total: usize = outcomes
        .iter()
        .filter(|(k, _)| k.starts_with("enc:"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(enc_total, 65);
    assert!(outcomes
        .keys()
        .all(|k| k.ends_with(":open_failed") || k.ends_with(":malformed_envelope")));
}

//! HPKE (RFC 9180) in base mode for the one KEM and KDF this protocol uses:
//! DHKEM(P-256, HKDF-SHA256) (`0x0010`) and HKDF-SHA256 (`0x0001`), with
//! AES-128-GCM (`0x0001`, only so the RFC test vectors can be checked) or
//! AES-256-GCM (`0x0002`, the protocol suite `16-1-2`).
//!
//! Every step of the RFC is its own function so the unit tests can compare
//! each intermediate value (shared secret, key schedule context, secret, key,
//! base nonce, exporter secret) with the published vectors. HKDF is written
//! here on top of `aws_lc_rs::hmac` (RFC 5869) for the same reason; AEAD and
//! ECDH are aws-lc's.
//!
//! The receiver's DH step is a caller-supplied closure: in the daemon it runs
//! in the HSM (`CKM_ECDH1_DERIVE`, `CKD_NULL`, which returns the x-coordinate
//! exactly as RFC 9180 §7.1.4 requires); the agency's tool and the tests use
//! [`software_dh`]. The rest of the key schedule always runs here.
//!
//! # Security
//! Every secret (DH output, shared secret, AEAD key, nonces, exporter secret,
//! opened plaintext) is held in zeroizing buffers on the heap, sized up
//! front, so that neither a reallocation nor a move leaves a copy behind:
//! the fixed-size ones in [`Secret`] (boxed: moving one from function to
//! function copies a pointer, not the bytes), the others in [`Zeroizing`]
//! vectors. `Debug` of a context prints only the
//! suite and the sequence number.

use std::convert::Infallible;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, UnparsedPublicKey, ECDH_P256};
use aws_lc_rs::hmac;
use zeroize::Zeroizing;

use crate::jwk::{P256PrivateKey, P256PublicKey};
use crate::secret::Secret;

/// RFC 9180 §7.1: DHKEM(P-256, HKDF-SHA256).
pub const KEM_ID: u16 = 0x0010;
/// RFC 9180 §7.2: HKDF-SHA256.
pub const KDF_ID: u16 = 0x0001;
/// RFC 9180 §5: `mode_base`.
const MODE_BASE: u8 = 0x00;
/// RFC 9180 §7.1: `Nsecret` of DHKEM(P-256, HKDF-SHA256).
const N_SECRET: usize = 32;
/// RFC 9180 §7.1: `Nenc` (SEC1 uncompressed point).
pub const N_ENC: usize = 65;
/// RFC 9180 §7.2: `Nh` of HKDF-SHA256.
const N_H: usize = 32;
/// RFC 9180 §7.3: `Nn` of both AES-GCM variants.
const N_N: usize = 12;
/// RFC 9180 §7.3: `Nt`, the AES-GCM tag length.
pub const N_T: usize = 16;
/// RFC 5869 §2.3: HKDF-Expand yields at most 255 blocks.
const HKDF_MAX_OUTPUT: usize = 255 * N_H;
/// RFC 9180 §4: the version label prefixed to every labeled input.
const VERSION_LABEL: &[u8] = b"HPKE-v1";

/// The 32-byte output of the P-256 DH step (the x-coordinate of the shared
/// point, RFC 9180 §7.1.4).
pub type DhOutput = crate::secret::Secret<[u8; 32]>;

/// The AEAD of a context (RFC 9180 §7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aead {
    /// AES-128-GCM, `0x0001`. Only used to check the RFC test vectors.
    Aes128Gcm,
    /// AES-256-GCM, `0x0002`: the protocol suite `16-1-2`.
    Aes256Gcm,
}

impl Aead {
    /// The RFC 9180 AEAD identifier.
    pub const fn id(self) -> u16 {
        match self {
            Self::Aes128Gcm => 0x0001,
            Self::Aes256Gcm => 0x0002,
        }
    }

    /// The AEAD for an RFC 9180 identifier, if this module implements it.
    pub const fn from_id(id: u16) -> Option<Self> {
        match id {
            0x0001 => Some(Self::Aes128Gcm),
            0x0002 => Some(Self::Aes256Gcm),
            _ => None,
        }
    }

    /// `Nk`, the key length in bytes.
    pub const fn key_len(self) -> usize {
        match self {
            Self::Aes128Gcm => 16,
            Self::Aes256Gcm => 32,
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Self::Aes128Gcm => &aead::AES_128_GCM,
            Self::Aes256Gcm => &aead::AES_256_GCM,
        }
    }
}

/// An HPKE operation that failed. `E` is the error type of the caller's DH
/// step (see [`setup_base_r`]); it is [`Infallible`] everywhere else.
#[derive(Debug, thiserror::Error)]
pub enum HpkeError<E = Infallible> {
    /// The caller-supplied DH step failed: in the daemon, the HSM is
    /// unavailable or refused `CKM_ECDH1_DERIVE`. Not the sender's fault.
    #[error("the DH step failed")]
    Dh(#[source] E),
    /// Software ECDH (encapsulation, or [`software_dh`]) failed: the system
    /// RNG failed, or aws-lc refused a key. Should never happen with
    /// validated [`P256PublicKey`]s.
    #[error("software ECDH failed")]
    KeyAgreement,
    /// AEAD decryption failed: wrong key, wrong `info` or `aad`, a modified
    /// ciphertext, or messages opened out of order. A buggy sender, or an
    /// attack.
    #[error("decryption failed (wrong key, wrong context or modified ciphertext)")]
    OpenFailed,
    /// AEAD encryption or key setup failed inside aws-lc. Should never happen.
    #[error("the AEAD refused to encrypt")]
    SealFailed,
    /// The context's sequence number is exhausted (RFC 9180 §5.2
    /// `MessageLimitReachedError`); a new context is needed.
    #[error("the context's message limit is reached")]
    MessageLimitReached,
    /// An export or expansion longer than HKDF-SHA256 can produce
    /// (255 × 32 bytes, RFC 5869 §2.3).
    #[error("requested {0} bytes, more than HKDF-SHA256 can produce")]
    OutputTooLong(usize),
    /// aws-lc refused an HMAC computation or an AEAD key. Should never
    /// happen: every length is fixed by the suite.
    #[error("the crypto library failed")]
    Internal,
}

impl<E> HpkeError<E> {
    /// The stable snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Dh(_) => "dh_failed",
            Self::KeyAgreement => "key_agreement_failed",
            Self::OpenFailed => "open_failed",
            Self::SealFailed => "seal_failed",
            Self::MessageLimitReached => "message_limit_reached",
            Self::OutputTooLong(_) => "output_too_long",
            Self::Internal => "crypto_failure",
        }
    }
}

/// Lifts an error of the DH-free steps into any caller's error type.
fn widen<E>(e: HpkeError) -> HpkeError<E> {
    match e {
        HpkeError::Dh(never) => match never {},
        HpkeError::KeyAgreement => HpkeError::KeyAgreement,
        HpkeError::OpenFailed => HpkeError::OpenFailed,
        HpkeError::SealFailed => HpkeError::SealFailed,
        HpkeError::MessageLimitReached => HpkeError::MessageLimitReached,
        HpkeError::OutputTooLong(n) => HpkeError::OutputTooLong(n),
        HpkeError::Internal => HpkeError::Internal,
    }
}

/// RFC 9180 §4.1: `suite_id = "KEM" || I2OSP(kem_id, 2)`.
fn kem_suite_id() -> [u8; 5] {
    let [a, b] = KEM_ID.to_be_bytes();
    [b'K', b'E', b'M', a, b]
}

/// RFC 9180 §5.1: `suite_id = "HPKE" || I2OSP(kem_id, 2) || I2OSP(kdf_id, 2)
/// || I2OSP(aead_id, 2)`.
fn hpke_suite_id(aead: Aead) -> [u8; 10] {
    let [k0, k1] = KEM_ID.to_be_bytes();
    let [f0, f1] = KDF_ID.to_be_bytes();
    let [a0, a1] = aead.id().to_be_bytes();
    [b'H', b'P', b'K', b'E', k0, k1, f0, f1, a0, a1]
}

/// Concatenates byte strings into a zeroizing buffer allocated once at its
/// final size, so no reallocation leaves a copy of a secret part behind.
fn concat(parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
    let len = parts.iter().map(|p| p.len()).sum();
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// RFC 5869 §2.2 HKDF-Extract with SHA-256: `PRK = HMAC(salt, IKM)`. An empty
/// salt is an HMAC key of zero length, which HMAC pads to the same block as
/// RFC 5869's "string of HashLen zeros".
fn hkdf_extract(salt: &[u8], ikm: &[u8]) -> Result<Secret<[u8; N_H]>, HpkeError> {
    // The salt may be a secret (the shared secret in KeySchedule); aws-lc
    // cleanses the HMAC_CTX that holds it when `key` drops.
    let key = hmac::Key::new(hmac::HMAC_SHA256, salt);
    let mut prk = Secret::new([0u8; N_H]);
    hmac::sign_to_buffer(&key, ikm, &mut prk[..]).map_err(|_| HpkeError::Internal)?;
    Ok(prk)
}

/// RFC 5869 §2.3 HKDF-Expand with SHA-256:
/// `T(i) = HMAC(PRK, T(i-1) || info || i)`, output the first `out.len()` bytes.
fn hkdf_expand(prk: &[u8; N_H], info: &[u8], out: &mut [u8]) -> Result<(), HpkeError> {
    if out.len() > HKDF_MAX_OUTPUT {
        return Err(HpkeError::OutputTooLong(out.len()));
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, prk);
    let mut t = Secret::new([0u8; N_H]);
    let mut t_len = 0;
    for (i, chunk) in out.chunks_mut(N_H).enumerate() {
        // At most 255 chunks (checked above), so the counter fits one byte
        // and starts at 1 as RFC 5869 requires.
        let counter = u8::try_from(i + 1).map_err(|_| HpkeError::OutputTooLong(i))?;
        let block_input = concat(&[&t[..t_len], info, &[counter]]);
        hmac::sign_to_buffer(&key, &block_input, &mut t[..]).map_err(|_| HpkeError::Internal)?;
        t_len = N_H;
        chunk.copy_from_slice(&t[..chunk.len()]);
    }
    Ok(())
}

/// RFC 9180 §4: `LabeledExtract(salt, label, ikm) =
/// Extract(salt, "HPKE-v1" || suite_id || label || ikm)`.
fn labeled_extract(
    suite_id: &[u8],
    salt: &[u8],
    label: &[u8],
    ikm: &[u8],
) -> Result<Secret<[u8; N_H]>, HpkeError> {
    let labeled_ikm = concat(&[VERSION_LABEL, suite_id, label, ikm]);
    hkdf_extract(salt, &labeled_ikm)
}

/// RFC 9180 §4: `LabeledExpand(prk, label, info, L) =
/// Expand(prk, I2OSP(L, 2) || "HPKE-v1" || suite_id || label || info, L)`,
/// with `L = out.len()`.
fn labeled_expand(
    suite_id: &[u8],
    prk: &[u8; N_H],
    label: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), HpkeError> {
    let len = u16::try_from(out.len()).map_err(|_| HpkeError::OutputTooLong(out.len()))?;
    let labeled_info = concat(&[&len.to_be_bytes(), VERSION_LABEL, suite_id, label, info]);
    hkdf_expand(prk, &labeled_info, out)
}

/// RFC 9180 §4.1 DHKEM `ExtractAndExpand(dh, kem_context)`, with
/// `kem_context = enc || pkRm`.
fn extract_and_expand(
    dh: &[u8; 32],
    enc: &P256PublicKey,
    pk_r: &P256PublicKey,
) -> Result<Secret<[u8; N_SECRET]>, HpkeError> {
    let suite_id = kem_suite_id();
    let eae_prk = labeled_extract(&suite_id, b"", b"eae_prk", dh)?;
    let kem_context = concat(&[enc.sec1(), pk_r.sec1()]);
    let mut shared_secret = Secret::new([0u8; N_SECRET]);
    labeled_expand(
        &suite_id,
        &eae_prk,
        b"shared_secret",
        &kem_context,
        &mut shared_secret[..],
    )?;
    Ok(shared_secret)
}

/// The software P-256 DH of `sk` with a validated `peer`: the 32-byte
/// x-coordinate (RFC 9180 §7.1.4).
fn ecdh(sk: &agreement::PrivateKey, peer: &P256PublicKey) -> Result<DhOutput, HpkeError> {
    agreement::agree(
        sk,
        UnparsedPublicKey::new(&ECDH_P256, &peer.sec1()[..]),
        HpkeError::KeyAgreement,
        |z| {
            let mut out = DhOutput::new([0u8; 32]);
            if z.len() != out.len() {
                return Err(HpkeError::KeyAgreement);
            }
            out.copy_from_slice(z);
            Ok(out)
        },
    )
}

/// RFC 9180 §4.1 DHKEM `Encap(pkR)` with the given ephemeral key: returns the
/// shared secret and `enc = SerializePublicKey(pkE)`.
fn encap_with(
    pk_r: &P256PublicKey,
    sk_e: &agreement::PrivateKey,
) -> Result<(Secret<[u8; N_SECRET]>, P256PublicKey), HpkeError> {
    let dh = ecdh(sk_e, pk_r)?;
    let pk_e = sk_e
        .compute_public_key()
        .map_err(|_| HpkeError::KeyAgreement)?;
    let enc = P256PublicKey::from_sec1(pk_e.as_ref()).map_err(|_| HpkeError::KeyAgreement)?;
    let shared_secret = extract_and_expand(&dh, &enc, pk_r)?;
    Ok((shared_secret, enc))
}

/// RFC 9180 §4.1 DHKEM `Decap(enc, skR)` with the DH step supplied by the
/// caller (`dh(enc) = DH(skR, pkE)`).
fn decap<E>(
    enc: &P256PublicKey,
    pk_r: &P256PublicKey,
    dh: impl FnOnce(&P256PublicKey) -> Result<DhOutput, E>,
) -> Result<Secret<[u8; N_SECRET]>, HpkeError<E>> {
    let z = dh(enc).map_err(HpkeError::Dh)?;
    extract_and_expand(&z, enc, pk_r).map_err(widen)
}

/// What RFC 9180 §5.1 `KeySchedule` derives, kept apart from the context so
/// the tests can compare each value with the vectors.
struct KeySchedule {
    // Only the RFC vector tests read these two; the context needs the rest.
    #[cfg_attr(not(test), allow(dead_code))]
    key_schedule_context: Vec<u8>,
    #[cfg_attr(not(test), allow(dead_code))]
    secret: Secret<[u8; N_H]>,
    key: Zeroizing<Vec<u8>>,
    base_nonce: Secret<[u8; N_N]>,
    exporter_secret: Secret<[u8; N_H]>,
}

/// RFC 9180 §5.1 `KeySchedule(mode_base, shared_secret, info, "", "")`.
fn key_schedule(
    shared_secret: &[u8; N_SECRET],
    info: &[u8],
    aead: Aead,
) -> Result<KeySchedule, HpkeError> {
    let suite_id = hpke_suite_id(aead);
    // Base mode: psk and psk_id are empty (RFC 9180 §5.1.1).
    let psk_id_hash = labeled_extract(&suite_id, b"", b"psk_id_hash", b"")?;
    let info_hash = labeled_extract(&suite_id, b"", b"info_hash", info)?;
    let mut key_schedule_context = Vec::with_capacity(1 + 2 * N_H);
    key_schedule_context.push(MODE_BASE);
    key_schedule_context.extend_from_slice(&psk_id_hash[..]);
    key_schedule_context.extend_from_slice(&info_hash[..]);

    let secret = labeled_extract(&suite_id, shared_secret, b"secret", b"")?;
    let mut key = Zeroizing::new(vec![0u8; aead.key_len()]);
    labeled_expand(&suite_id, &secret, b"key", &key_schedule_context, &mut key)?;
    let mut base_nonce = Secret::new([0u8; N_N]);
    labeled_expand(
        &suite_id,
        &secret,
        b"base_nonce",
        &key_schedule_context,
        &mut base_nonce[..],
    )?;
    let mut exporter_secret = Secret::new([0u8; N_H]);
    labeled_expand(
        &suite_id,
        &secret,
        b"exp",
        &key_schedule_context,
        &mut exporter_secret[..],
    )?;
    Ok(KeySchedule {
        key_schedule_context,
        secret,
        key,
        base_nonce,
        exporter_secret,
    })
}

/// The state RFC 9180 §5.2 shares between sender and receiver contexts.
struct Context {
    aead: Aead,
    // aws-lc frees the EVP_AEAD_CTX with OPENSSL_free, which cleanses it.
    key: LessSafeKey,
    base_nonce: Secret<[u8; N_N]>,
    exporter_secret: Secret<[u8; N_H]>,
    seq: u64,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("aead", &self.aead)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Context {
    fn new(schedule: KeySchedule, aead: Aead) -> Result<Self, HpkeError> {
        let unbound =
            UnboundKey::new(aead.algorithm(), &schedule.key).map_err(|_| HpkeError::Internal)?;
        Ok(Self {
            aead,
            key: LessSafeKey::new(unbound),
            base_nonce: schedule.base_nonce,
            exporter_secret: schedule.exporter_secret,
            seq: 0,
        })
    }

    /// RFC 9180 §5.2 `ComputeNonce(seq) = base_nonce XOR I2OSP(seq, Nn)`.
    fn compute_nonce(&self, seq: u64) -> Zeroizing<[u8; N_N]> {
        let mut nonce = Zeroizing::new(*self.base_nonce);
        for (n, s) in nonce[N_N - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    /// RFC 9180 §5.2 `IncrementSeq`, checked before the nonce is used so a
    /// refused message produces no output. `seq` is a `u64`, so the limit is
    /// 2^64 − 1 messages rather than the RFC's 2^96 − 1: the last value is
    /// never used, exactly as the RFC never uses its last one.
    fn next_seq(&self) -> Result<u64, HpkeError> {
        self.seq
            .checked_add(1)
            .ok_or(HpkeError::MessageLimitReached)
    }

    fn seal(&mut self, aad: &[u8], pt: &[u8]) -> Result<Vec<u8>, HpkeError> {
        let next = self.next_seq()?;
        let nonce = Nonce::assume_unique_for_key(*self.compute_nonce(self.seq));
        // Sized for the tag up front: appending it must not reallocate and
        // leave a copy of the plaintext in freed memory.
        // Zeroizing in case aws-lc fails and leaves the plaintext in place.
        let mut in_out = Zeroizing::new(Vec::with_capacity(pt.len() + N_T));
        in_out.extend_from_slice(pt);
        self.key
            .seal_in_place_append_tag(nonce, Aad::from(aad), &mut *in_out)
            .map_err(|_| HpkeError::SealFailed)?;
        self.seq = next;
        // Now ciphertext: moved out, leaving an empty buffer to zeroize.
        Ok(std::mem::take(&mut *in_out))
    }

    fn open(&mut self, aad: &[u8], ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, HpkeError> {
        let next = self.next_seq()?;
        let nonce = Nonce::assume_unique_for_key(*self.compute_nonce(self.seq));
        let mut in_out = Zeroizing::new(ct.to_vec());
        let pt_len = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut in_out[..])
            .map_err(|_| HpkeError::OpenFailed)?
            .len();
        in_out.truncate(pt_len);
        // RFC 9180 §5.2: the sequence number advances only on success.
        self.seq = next;
        Ok(in_out)
    }

    /// RFC 9180 §5.3 `Export(exporter_context, L) =
    /// LabeledExpand(exporter_secret, "sec", exporter_context, L)`.
    fn export(&self, exporter_context: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>, HpkeError> {
        // Before allocating: a length past HKDF's is refused, not allocated.
        if len > HKDF_MAX_OUTPUT {
            return Err(HpkeError::OutputTooLong(len));
        }
        let mut out = Zeroizing::new(vec![0u8; len]);
        labeled_expand(
            &hpke_suite_id(self.aead),
            &self.exporter_secret,
            b"sec",
            exporter_context,
            &mut out,
        )?;
        Ok(out)
    }
}

/// A sender context (RFC 9180 §5.2 `ContextS`): seals messages in order.
#[derive(Debug)]
pub struct ContextS(Context);

impl ContextS {
    /// Seals the next message: `Seal(key, ComputeNonce(seq), aad, pt)`, then
    /// advances the sequence number.
    ///
    /// # Errors
    /// [`HpkeError::MessageLimitReached`] when the sequence is exhausted;
    /// [`HpkeError::SealFailed`] if aws-lc fails.
    pub fn seal(&mut self, aad: &[u8], pt: &[u8]) -> Result<Vec<u8>, HpkeError> {
        self.0.seal(aad, pt)
    }

    /// RFC 9180 §5.3 secret export.
    ///
    /// # Errors
    /// [`HpkeError::OutputTooLong`] for more than 8160 bytes.
    pub fn export(
        &self,
        exporter_context: &[u8],
        len: usize,
    ) -> Result<Zeroizing<Vec<u8>>, HpkeError> {
        self.0.export(exporter_context, len)
    }
}

/// A receiver context (RFC 9180 §5.2 `ContextR`): opens messages in the
/// order they were sealed.
#[derive(Debug)]
pub struct ContextR(Context);

impl ContextR {
    /// Opens the next message; the sequence number advances only on success.
    ///
    /// # Errors
    /// [`HpkeError::OpenFailed`] for any authentication failure;
    /// [`HpkeError::MessageLimitReached`] when the sequence is exhausted.
    ///
    /// # Security
    /// Never returns unauthenticated plaintext; the result is zeroized on drop.
    pub fn open(&mut self, aad: &[u8], ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, HpkeError> {
        self.0.open(aad, ct)
    }

    /// RFC 9180 §5.3 secret export.
    ///
    /// # Errors
    /// [`HpkeError::OutputTooLong`] for more than 8160 bytes.
    pub fn export(
        &self,
        exporter_context: &[u8],
        len: usize,
    ) -> Result<Zeroizing<Vec<u8>>, HpkeError> {
        self.0.export(exporter_context, len)
    }
}

/// RFC 9180 §5.1.1 `SetupBaseS(pkR, info)` with a fresh ephemeral key from
/// the system RNG. Returns `enc` and the sender context.
///
/// # Errors
/// [`HpkeError::KeyAgreement`] if the RNG or ECDH fails.
pub fn setup_base_s(
    pk_r: &P256PublicKey,
    info: &[u8],
    aead: Aead,
) -> Result<(P256PublicKey, ContextS), HpkeError> {
    let sk_e = agreement::PrivateKey::generate(&ECDH_P256).map_err(|_| HpkeError::KeyAgreement)?;
    setup_base_s_with(pk_r, info, aead, &sk_e)
}

/// `SetupBaseS` with a given ephemeral key. Crate-private: reusing an
/// ephemeral key across messages would reuse key and nonce; only the test
/// vectors need a fixed one.
fn setup_base_s_with(
    pk_r: &P256PublicKey,
    info: &[u8],
    aead: Aead,
    sk_e: &agreement::PrivateKey,
) -> Result<(P256PublicKey, ContextS), HpkeError> {
    let (shared_secret, enc) = encap_with(pk_r, sk_e)?;
    let schedule = key_schedule(&shared_secret, info, aead)?;
    Ok((enc, ContextS(Context::new(schedule, aead)?)))
}

/// RFC 9180 §5.1.1 `SetupBaseR(enc, skR, info)`, with the private-key step
/// supplied by the caller.
///
/// `dh` receives the sender's ephemeral public key `enc` (already validated
/// as a point on P-256) and must return `DH(skR, enc)`: the 32-byte
/// x-coordinate of the shared point. `pk_r` must be the public key of that
/// same `skR`; it enters the KEM context, so a wrong one makes opening fail
/// rather than succeed with another key. In the daemon the closure calls the
/// HSM; elsewhere use `|enc| software_dh(&sk, enc)`.
///
/// # Errors
/// [`HpkeError::Dh`] carrying the closure's error; other variants only if
/// aws-lc fails.
pub fn setup_base_r<E>(
    enc: &P256PublicKey,
    pk_r: &P256PublicKey,
    info: &[u8],
    aead: Aead,
    dh: impl FnOnce(&P256PublicKey) -> Result<DhOutput, E>,
) -> Result<ContextR, HpkeError<E>> {
    let shared_secret = decap(enc, pk_r, dh)?;
    let schedule = key_schedule(&shared_secret, info, aead).map_err(widen)?;
    Ok(ContextR(Context::new(schedule, aead).map_err(widen)?))
}

/// The software DH step could not run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("software ECDH failed")]
pub struct DhError;

impl DhError {
    /// The stable snake_case code of this error.
    pub fn code(&self) -> &'static str {
        "key_agreement_failed"
    }
}

/// `DH(sk, peer)` in software: the receiver's DH step for keys held outside
/// an HSM (the agency's recipient key, tests).
///
/// # Errors
/// [`DhError`] only if aws-lc refuses the key (it was validated on load).
pub fn software_dh(sk: &P256PrivateKey, peer: &P256PublicKey) -> Result<DhOutput, DhError> {
    let key =
        agreement::PrivateKey::from_private_key(&ECDH_P256, sk.scalar()).map_err(|_| DhError)?;
    ecdh(&key, peer).map_err(|_| DhError)
}

#[cfg(test)]
mod tests {
    //! RFC 9180 test vectors: `testdata/hpke-rfc9180-dhkem-p256-hkdf-sha256.json`
    //! is the base-mode (mode 0), kem 16, kdf 1, aead 1 and 2 subset of the
    //! CFRG `draft-irtf-cfrg-hpke` repository's `test-vectors.json` at commit
    //! 5f503c5 (the vectors published with RFC 9180, Appendix A).

    use serde::Deserialize;

    use super::*;
    use crate::jwk::Jwk;

    const VECTORS: &str = include_str!("testdata/hpke-rfc9180-dhkem-p256-hkdf-sha256.json");

    #[derive(Deserialize)]
    struct Vector {
        mode: u8,
        kem_id: u16,
        kdf_id: u16,
        aead_id: u16,
        info: String,
        #[serde(rename = "skRm")]
        sk_rm: String,
        #[serde(rename = "skEm")]
        sk_em: String,
        #[serde(rename = "pkRm")]
        pk_rm: String,
        #[serde(rename = "pkEm")]
        pk_em: String,
        enc: String,
        shared_secret: String,
        key_schedule_context: String,
        secret: String,
        key: String,
        base_nonce: String,
        exporter_secret: String,
        encryptions: Vec<Encryption>,
        exports: Vec<Export>,
    }

    #[derive(Deserialize)]
    struct Encryption {
        aad: String,
        ct: String,
        nonce: String,
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

    fn vectors() -> Vec<Vector> {
        let all: Vec<Vector> = serde_json::from_str(VECTORS).unwrap();
        for v in &all {
            assert_eq!(
                (v.mode, v.kem_id, v.kdf_id),
                (0, KEM_ID, KDF_ID),
                "file holds a vector outside base mode / kem 16 / kdf 1"
            );
            assert!(matches!(v.aead_id, 1 | 2), "unexpected aead {}", v.aead_id);
        }
        all
    }

    fn private_key(sk: &[u8], pk: &P256PublicKey) -> P256PrivateKey {
        let jwk = Jwk {
            d: Some(Zeroizing::new(crate::codec::b64_encode(sk))),
            ..pk.to_jwk()
        };
        P256PrivateKey::from_jwk(&jwk).unwrap()
    }

    #[test]
    fn rfc9180_vectors_base_p256_sha256_aes_gcm() {
        let mut vectors_run = 0;
        let mut encryptions_run = 0;
        let mut exports_run = 0;
        let mut aeads_seen = Vec::new();
        for v in vectors() {
            let aead = Aead::from_id(v.aead_id).unwrap();
            aeads_seen.push(aead);
            let info = h(&v.info);
            let pk_r = P256PublicKey::from_sec1(&h(&v.pk_rm)).unwrap();
            let sk_r = private_key(&h(&v.sk_rm), &pk_r);
            let sk_e = agreement::PrivateKey::from_private_key(&ECDH_P256, &h(&v.sk_em)).unwrap();

            // Encap with the vector's ephemeral key.
            let (shared_secret, enc) = encap_with(&pk_r, &sk_e).unwrap();
            assert_eq!(enc.sec1().to_vec(), h(&v.enc));
            assert_eq!(enc.sec1().to_vec(), h(&v.pk_em));
            assert_eq!(shared_secret.to_vec(), h(&v.shared_secret));

            // Decap with the software DH reaches the same secret.
            let decapped = decap(&enc, &pk_r, |e| software_dh(&sk_r, e)).unwrap();
            assert_eq!(decapped.to_vec(), h(&v.shared_secret));

            let ks = key_schedule(&shared_secret, &info, aead).unwrap();
            assert_eq!(ks.key_schedule_context, h(&v.key_schedule_context));
            assert_eq!(ks.secret.to_vec(), h(&v.secret));
            assert_eq!(ks.key.to_vec(), h(&v.key));
            assert_eq!(ks.base_nonce.to_vec(), h(&v.base_nonce));
            assert_eq!(ks.exporter_secret.to_vec(), h(&v.exporter_secret));

            let (enc_s, mut ctx_s) = setup_base_s_with(&pk_r, &info, aead, &sk_e).unwrap();
            assert_eq!(enc_s, enc);
            let mut ctx_r =
                setup_base_r(&enc, &pk_r, &info, aead, |e| software_dh(&sk_r, e)).unwrap();
            for (seq, e) in v.encryptions.iter().enumerate() {
                let seq = u64::try_from(seq).unwrap();
                assert_eq!(ctx_s.0.compute_nonce(seq).to_vec(), h(&e.nonce));
                assert_eq!(ctx_s.seal(&h(&e.aad), &h(&e.pt)).unwrap(), h(&e.ct));
                assert_eq!(
                    ctx_r.open(&h(&e.aad), &h(&e.ct)).unwrap().to_vec(),
                    h(&e.pt)
                );
                encryptions_run += 1;
            }
            assert_eq!(ctx_s.0.seq, u64::try_from(v.encryptions.len()).unwrap());
            for x in &v.exports {
                let want = h(&x.exported_value);
                let ctx = h(&x.exporter_context);
                assert_eq!(ctx_s.export(&ctx, x.len).unwrap().to_vec(), want);
                assert_eq!(ctx_r.export(&ctx, x.len).unwrap().to_vec(), want);
                exports_run += 1;
            }
            vectors_run += 1;
        }
        assert_eq!(vectors_run, 2);
        assert_eq!(aeads_seen, [Aead::Aes128Gcm, Aead::Aes256Gcm]);
        assert_eq!(encryptions_run, 2 * 257);
        assert_eq!(exports_run, 2 * 3);
    }

    #[test]
    fn open_out_of_order_fails_and_does_not_advance() {
        let sk_r = P256PrivateKey::generate().unwrap();
        let (enc, mut s) = setup_base_s(sk_r.public(), b"info", Aead::Aes256Gcm).unwrap();
        let c0 = s.seal(b"a", b"zero").unwrap();
        let c1 = s.seal(b"a", b"one").unwrap();
        let mut r = setup_base_r(&enc, sk_r.public(), b"info", Aead::Aes256Gcm, |e| {
            software_dh(&sk_r, e)
        })
        .unwrap();
        assert_eq!(r.open(b"a", &c1).unwrap_err().code(), "open_failed");
        assert_eq!(r.0.seq, 0);
        assert_eq!(&r.open(b"a", &c0).unwrap()[..], b"zero");
        assert_eq!(&r.open(b"a", &c1).unwrap()[..], b"one");
    }

    #[test]
    fn wrong_info_or_key_fails() {
        let sk_r = P256PrivateKey::generate().unwrap();
        let other = P256PrivateKey::generate().unwrap();
        let (enc, mut s) = setup_base_s(sk_r.public(), b"info", Aead::Aes256Gcm).unwrap();
        let ct = s.seal(b"", b"secret").unwrap();
        let mut r = setup_base_r(&enc, sk_r.public(), b"infp", Aead::Aes256Gcm, |e| {
            software_dh(&sk_r, e)
        })
        .unwrap();
        assert_eq!(r.open(b"", &ct).unwrap_err().code(), "open_failed");
        // The right pk_r with another key's DH output.
        let mut r = setup_base_r(&enc, sk_r.public(), b"info", Aead::Aes256Gcm, |e| {
            software_dh(&other, e)
        })
        .unwrap();
        assert_eq!(r.open(b"", &ct).unwrap_err().code(), "open_failed");
    }

    #[test]
    fn dh_hook_error_is_passed_through() {
        #[derive(Debug, thiserror::Error)]
        #[error("hsm down")]
        struct HsmDown;
        let sk_r = P256PrivateKey::generate().unwrap();
        let (enc, _) = setup_base_s(sk_r.public(), b"", Aead::Aes256Gcm).unwrap();
        let err =
            setup_base_r(&enc, sk_r.public(), b"", Aead::Aes256Gcm, |_| Err(HsmDown)).unwrap_err();
        assert!(matches!(err, HpkeError::Dh(HsmDown)));
        assert_eq!(err.code(), "dh_failed");
    }

    #[test]
    fn sequence_limit_is_enforced_before_output() {
        let sk_r = P256PrivateKey::generate().unwrap();
        let (_, mut s) = setup_base_s(sk_r.public(), b"", Aead::Aes256Gcm).unwrap();
        s.0.seq = u64::MAX - 1;
        s.seal(b"", b"last").unwrap();
        assert_eq!(s.0.seq, u64::MAX);
        let err = s.seal(b"", b"one too many").unwrap_err();
        assert_eq!(err.code(), "message_limit_reached");
        assert_eq!(s.0.seq, u64::MAX);
    }

    #[test]
    fn nonce_is_base_xor_big_endian_seq() {
        let sk_r = P256PrivateKey::generate().unwrap();
        let (_, s) = setup_base_s(sk_r.public(), b"", Aead::Aes256Gcm).unwrap();
        let base = *s.0.base_nonce;
        let n = s.0.compute_nonce(0x0102_0304_0506_0708);
        let mut want = base;
        for (i, b) in [1u8, 2, 3, 4, 5, 6, 7, 8].iter().enumerate() {
            want[4 + i] ^= b;
        }
        assert_eq!(*n, want);
        assert_eq!(*s.0.compute_nonce(0), base);
    }

    #[test]
    fn export_length_is_bounded() {
        let sk_r = P256PrivateKey::generate().unwrap();
        let (_, s) = setup_base_s(sk_r.public(), b"", Aead::Aes256Gcm).unwrap();
        assert_eq!(s.export(b"", 255 * 32).unwrap().len(), 255 * 32);
        assert_eq!(
            s.export(b"", 255 * 32 + 1).unwrap_err().code(),
            "output_too_long"
        );
        // Refused before any allocation (this length would abort).
        assert_eq!(
            s.export(b"", usize::MAX).unwrap_err().code(),
            "output_too_long"
        );
    }

    #[test]
    fn debug_prints_no_secrets() {
        let sk_r = P256PrivateKey::generate().unwrap();
        let (_, s) = setup_base_s(sk_r.public(), b"", Aead::Aes256Gcm).unwrap();
        let text = format!("{s:?}");
        assert_eq!(text, "ContextS(Context { aead: Aes256Gcm, seq: 0, .. })");
    }
}

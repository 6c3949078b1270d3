//! The verifier: the one place that turns warrant bytes into a
//! [`VerifiedWarrant`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use time::{Duration, OffsetDateTime};

use super::cache::{self, Cache};
use super::claims::{check_bound, legacy_normalized_digest, normalized_digest, sha256, Claims};
use super::jws::{self, Algorithm, ParsedJws};
use super::trust::{Authority, AuthorityPublicKey, RoleRule, TrustStore};
use super::WarrantError;
use crate::codec::format_time_exact;
use crate::jwk::P256PublicKey;

/// Size bounds applied before and while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarrantLimits {
    /// Largest warrant (the whole JWS JSON), in bytes.
    pub max_warrant_bytes: usize,
    /// Most signatures in one warrant: each one costs a verification.
    pub max_signatures: usize,
}

impl Default for WarrantLimits {
    /// 256 KiB holds 1000 targets of ~190 bytes after base64url; 16 signatures
    /// is far beyond any real policy.
    fn default() -> Self {
        Self {
            max_warrant_bytes: 256 * 1024,
            max_signatures: 16,
        }
    }
}

/// An authority whose signature on the warrant verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// Its `kid`.
    pub kid: String,
    /// Its configured role.
    pub role: String,
    /// The algorithm it signed with.
    pub alg: Algorithm,
}

/// A warrant whose every signature verified against a configured, currently
/// valid authority, that meets the policy, is within its validity at the time
/// of verification, and names the caller as its agency.
///
/// Only [`Verifier::verify`] makes one; the fields are private. It does not
/// say the warrant is unrevoked or that its `id` is not in conflict: that is
/// [`super::admit`], against the store.
#[derive(Debug, Clone)]
pub struct VerifiedWarrant {
    signed: Arc<Signed>,
}

/// What checking a warrant finds that neither time nor the caller can
/// change: signatures verified against one trust store, claims parsed,
/// policy met. What [`super::cache`] keeps.
#[derive(Debug)]
struct Signed {
    claims: Claims,
    target_set: HashSet<String>,
    /// `kids` as a set (up to 1,000, looked up once an envelope), or
    /// `None` when the warrant names none (every key allowed).
    kid_set: Option<HashSet<String>>,
    digest: [u8; 32],
    normalized_digest: [u8; 32],
    /// [`super::claims::legacy_normalized_digest`]: `None` when it is
    /// `normalized_digest`.
    legacy_normalized_digest: Option<[u8; 32]>,
    signers: Vec<Signer>,
    /// The `kid` of every signature, in the JWS's order: whether each
    /// authority is valid is asked again at every use.
    signature_kids: Vec<String>,
    /// The end of the emergency period, for an urgent warrant.
    emergency_end: Option<OffsetDateTime>,
    usable_until: OffsetDateTime,
    /// The signer whose validity ends first: `(kid, valid_from,
    /// valid_until)`. Every signature must be by an authority valid at the
    /// time, so the warrant is unusable from then on too.
    first_signer_end: (String, OffsetDateTime, OffsetDateTime),
}

impl Signed {
    /// See [`VerifiedWarrant::lapsed`].
    fn lapsed(&self, now: OffsetDateTime) -> Option<WarrantError> {
        // The signers first, as a fresh check (`Verifier::check_use`) does.
        let (kid, valid_from, valid_until) = &self.first_signer_end;
        if now >= *valid_until {
            return Some(WarrantError::AuthorityNotValid {
                kid: kid.clone(),
                valid_from: format_time_exact(*valid_from),
                valid_until: format_time_exact(*valid_until),
            });
        }
        (now >= self.usable_until).then(|| match self.emergency_end {
            Some(end) if end < self.claims.expires => {
                WarrantError::EmergencyExpired(format_time_exact(end))
            }
            _ => WarrantError::Expired(format_time_exact(self.claims.expires)),
        })
    }
}

impl VerifiedWarrant {
    /// The claims.
    pub fn claims(&self) -> &Claims {
        &self.signed.claims
    }
    /// The warrant `id` (the budget and revocation key).
    pub fn id(&self) -> &str {
        &self.signed.claims.id
    }
    /// SHA-256 of the JWS payload bytes: the audit log's `warrant_digest`.
    pub fn digest(&self) -> &[u8; 32] {
        &self.signed.digest
    }
    /// SHA-256 of the canonical claims without `emergency`; equal for an
    /// urgent warrant and its fully signed replacement.
    pub fn normalized_digest(&self) -> &[u8; 32] {
        &self.signed.normalized_digest
    }
    /// The normalized digest as lavd computed it before 2026-12-06 (times
    /// hashed as spelled), when it differs from [`Self::normalized_digest`]:
    /// what the store may hold for an urgent warrant registered before then.
    pub fn legacy_normalized_digest(&self) -> Option<&[u8; 32]> {
        self.signed.legacy_normalized_digest.as_ref()
    }
    /// Whether this is an urgent warrant (its audit leaves must say so).
    pub fn is_emergency(&self) -> bool {
        self.signed.claims.emergency
    }
    /// The distinct authorities that signed, ordered by `kid`.
    pub fn signers(&self) -> &[Signer] {
        &self.signed.signers
    }
    /// When it stops being usable: `expires`, or for an urgent warrant the end
    /// of the emergency period if that comes first.
    pub fn usable_until(&self) -> OffsetDateTime {
        self.signed.usable_until
    }
    /// Why the warrant is no longer usable at `now`, if it is not:
    /// [`WarrantError::AuthorityNotValid`] once a signer's `valid_until` has
    /// passed; else [`WarrantError::Expired`] at `expires`, or
    /// [`WarrantError::EmergencyExpired`] at the end of an urgent warrant's
    /// hours when that comes first. The one rule both the
    /// verification and an unwrap's last look before its audit commit
    /// apply.
    pub fn lapsed(&self, now: OffsetDateTime) -> Option<WarrantError> {
        self.signed.lapsed(now)
    }
    /// The key results are sealed to.
    pub fn recipient(&self) -> &P256PublicKey {
        &self.signed.claims.recipient
    }
    pub(super) fn targets_contain(&self, target: &str) -> bool {
        self.signed.target_set.contains(target)
    }
    /// Whether escrow key `kid` may be used: the warrant names it, or
    /// names no keys.
    pub(super) fn allows_kid(&self, kid: &str) -> bool {
        self.signed
            .kid_set
            .as_ref()
            .is_none_or(|kids| kids.contains(kid))
    }
}

/// Verifies warrants against one trust store.
///
/// It keeps the warrants it verified ([`super::cache`]); since a reload
/// builds a new verifier for the new trust store, that memory is one trust
/// generation's.
#[derive(Debug)]
pub struct Verifier {
    trust: Arc<TrustStore>,
    limits: WarrantLimits,
    cache: Cache<Signed>,
}

impl Verifier {
    /// A verifier for `trust` with `limits`.
    pub fn new(trust: impl Into<Arc<TrustStore>>, limits: WarrantLimits) -> Self {
        Self {
            trust: trust.into(),
            limits,
            cache: Cache::new(cache::MAX_ENTRIES, cache::MAX_BYTES),
        }
    }

    /// The trust store.
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// The limits.
    pub fn limits(&self) -> &WarrantLimits {
        &self.limits
    }

    /// How many verified warrants this verifier keeps ([`super::cache`]).
    pub fn cached_warrants(&self) -> usize {
        self.cache.len()
    }

    /// Verifies `jws` (General or flattened JSON Serialization bytes) at time `now` for the
    /// caller whose TLS identity is `caller_identity`.
    ///
    /// Order: size and structure → every signature (known authority, valid at
    /// `now`, its configured `alg`, verifies) → claims → emergency rule
    /// present when claimed → policy (distinct authorities per role) →
    /// `[not_before, expires)` and the emergency period → agency.
    ///
    /// # Errors
    /// The first [`WarrantError`] met in that order.
    ///
    /// # Security
    /// Every signature present must verify: one bad or unknown signature
    /// refuses the whole warrant even if the others meet the policy (PROTOCOL
    /// §4, "an invalid warrant is refused whole"). Two signatures with one
    /// `kid` are refused as malformed at parse. Claims are parsed only after the signatures
    /// verified. A warrant verified before (the same bytes, this trust
    /// store) is not verified again, but each signer's validity, the time
    /// and the agency are checked at every call ([`super::cache`]).
    pub fn verify(
        &self,
        jws_bytes: &[u8],
        now: OffsetDateTime,
        caller_identity: &str,
    ) -> Result<VerifiedWarrant, WarrantError> {
        // A warrant seen before skips the checks that neither time nor the
        // caller can change (its signatures, claims and policy against this
        // trust store); the rest runs below for every request. Since those
        // checks come first and only a warrant that passed everything is
        // kept, a kept warrant is refused with the code a fresh check
        // would give.
        let key = cache::key(jws_bytes);
        let (signed, fresh) = match self.cache.get(&key, now) {
            Some(signed) => (signed, false),
            None => (Arc::new(self.check_signed(jws_bytes, now)?), true),
        };
        self.check_use(&signed, now, caller_identity)?;
        if fresh {
            self.cache.insert(
                key,
                signed.clone(),
                signed.usable_until,
                cache::weight(jws_bytes.len()),
                now,
            );
        }
        Ok(VerifiedWarrant { signed })
    }

    /// The checks of [`Self::verify`] that time and the caller cannot change
    /// once they pass: size and structure, every signature (with each
    /// authority's validity at `now`, to keep the order of refusals), claims,
    /// the emergency rule, the policy.
    fn check_signed(&self, jws_bytes: &[u8], now: OffsetDateTime) -> Result<Signed, WarrantError> {
        let jws = jws::parse(jws_bytes, &self.limits)?;
        let signers = self.verify_signatures(&jws, now)?;

        let claims = Claims::parse(jws.payload())?;
        let policy = self.trust.policy();
        let (rules, emergency_hours) = if claims.emergency {
            let rule = policy
                .emergency
                .as_ref()
                .ok_or(WarrantError::EmergencyNotAllowed)?;
            (&rule.require, Some(rule.max_hours))
        } else {
            (&policy.require, None)
        };
        // Counted by holder and by key, not by kid: one holder's two keys
        // (a rotation) count once, and so does one key under two kids,
        // which the trust config refuses anyway.
        let signed_with = signers.values().filter_map(|s| {
            self.trust
                .authority(&s.kid)
                .map(|a| (s.role.as_str(), a.key(), a.holder()))
        });
        check_policy(rules, signed_with, claims.emergency)?;

        // `None` past the last representable time (year 9999): then
        // `expires`, which is representable, comes first anyway.
        let emergency_end = emergency_hours
            .and_then(|h| claims.not_before.checked_add(Duration::hours(i64::from(h))));
        let usable_until = match emergency_end {
            Some(end) if end < claims.expires => end,
            _ => claims.expires,
        };
        // Every signature's authority was found and valid at `now` above.
        let first_signer_end = jws
            .signatures()
            .iter()
            .filter_map(|sig| self.trust.authority(sig.kid()))
            .min_by_key(|a| a.valid_until())
            .map(|a| (a.kid().to_string(), a.valid_from(), a.valid_until()))
            .ok_or_else(|| WarrantError::Malformed("no signature".into()))?;
        let digest = sha256(jws.payload());
        let normalized_digest = normalized_digest(jws.payload())?;
        let legacy_normalized_digest = legacy_normalized_digest(jws.payload())?;
        let target_set = claims.targets.iter().cloned().collect();
        let kid_set = claims.kids.as_ref().map(|k| k.iter().cloned().collect());
        Ok(Signed {
            claims,
            target_set,
            kid_set,
            digest,
            normalized_digest,
            legacy_normalized_digest,
            signers: signers.into_values().collect(),
            signature_kids: jws
                .signatures()
                .iter()
                .map(|s| s.kid().to_string())
                .collect(),
            emergency_end,
            usable_until,
            first_signer_end,
        })
    }

    /// The checks of [`Self::verify`] made for every use: each signer
    /// still a valid authority at `now`, `[not_before, usable_until)`, the
    /// agency.
    fn check_use(
        &self,
        signed: &Signed,
        now: OffsetDateTime,
        caller_identity: &str,
    ) -> Result<(), WarrantError> {
        for kid in &signed.signature_kids {
            let authority = self
                .trust
                .authority(kid)
                .ok_or_else(|| WarrantError::UnknownAuthority(kid.clone()))?;
            check_authority_valid(authority, now)?;
        }
        let claims = &signed.claims;
        if now < claims.not_before {
            return Err(WarrantError::NotYetValid(format_time_exact(
                claims.not_before,
            )));
        }
        if let Some(lapsed) = signed.lapsed(now) {
            return Err(lapsed);
        }
        if claims.agency != caller_identity {
            return Err(WarrantError::AgencyMismatch {
                warrant: claims.agency.clone(),
                caller: caller_identity.to_string(),
            });
        }
        Ok(())
    }

    /// Every signature of `jws` must be by a configured authority valid at
    /// `now`, with its configured algorithm, and verify. Returns the distinct
    /// signers by `kid` (the parse refused a repeated `kid`).
    fn verify_signatures(
        &self,
        jws: &ParsedJws,
        now: OffsetDateTime,
    ) -> Result<BTreeMap<String, Signer>, WarrantError> {
        let mut signers = BTreeMap::new();
        for sig in jws.signatures() {
            let authority = self
                .trust
                .authority(sig.kid())
                .ok_or_else(|| WarrantError::UnknownAuthority(sig.kid().to_string()))?;
            check_authority_valid(authority, now)?;
            if authority.alg() != sig.alg() {
                return Err(WarrantError::AlgorithmMismatch {
                    kid: authority.kid().to_string(),
                    configured: authority.alg(),
                    header: sig.alg(),
                });
            }
            if !authority.verify(&jws.signing_input(sig), sig.signature()) {
                return Err(WarrantError::BadSignature(authority.kid().to_string()));
            }
            signers.insert(
                authority.kid().to_string(),
                Signer {
                    kid: authority.kid().to_string(),
                    role: authority.role().to_string(),
                    alg: sig.alg(),
                },
            );
        }
        Ok(signers)
    }

    /// Verifies a revocation signed by an authority (PROTOCOL §6: the body
    /// `{"revocation": <JWS>}` of `POST /v1/warrants/revocations`), whose
    /// payload is exactly `{"id", "reason", "time"}`.
    ///
    /// Every signature must verify as for a warrant, and at least one signer
    /// must hold a role that the policy (or its emergency rule) names: any one
    /// such authority may revoke, since revoking only ever takes power away.
    ///
    /// # Errors
    /// As [`Self::verify`] for the JWS and signatures;
    /// [`WarrantError::Malformed`] for a bad payload;
    /// [`WarrantError::RevokerNotInPolicy`] when no signer has a policy role.
    pub fn verify_revocation(
        &self,
        jws_bytes: &[u8],
        now: OffsetDateTime,
    ) -> Result<VerifiedRevocation, WarrantError> {
        let jws = jws::parse(jws_bytes, &self.limits)?;
        let signers = self.verify_signatures(&jws, now)?;
        let raw = RevocationClaims::parse(jws.payload())?;
        let policy = self.trust.policy();
        let roles: BTreeSet<&str> = policy
            .require
            .iter()
            .chain(policy.emergency.iter().flat_map(|e| e.require.iter()))
            .map(|r| r.role.as_str())
            .collect();
        // The signers are ordered by kid: the first that holds a policy
        // role is the one on whose authority the warrant is revoked (a
        // co-signer whose role the policy does not name could not have
        // revoked alone, and is not credited).
        let Some(authorised_by) = signers
            .values()
            .find(|s| roles.contains(s.role.as_str()))
            .map(|s| s.kid.clone())
        else {
            return Err(WarrantError::RevokerNotInPolicy(
                roles.into_iter().collect::<Vec<_>>().join(", "),
            ));
        };
        Ok(VerifiedRevocation {
            id: raw.id,
            reason: raw.reason,
            time: raw.time,
            digest: sha256(jws.payload()),
            signers: signers.into_values().collect(),
            authorised_by,
        })
    }
}

/// The payload of an authority's revocation JWS, exactly `{"id", "reason",
/// "time"}`, parsed and bounded. Holding one says nothing about who signed
/// it: see [`VerifiedRevocation`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationClaims {
    /// The warrant id to revoke.
    pub id: String,
    /// Why.
    pub reason: String,
    /// When the authority signed it (RFC 3339 UTC).
    #[serde(with = "crate::codec::rfc3339")]
    pub time: OffsetDateTime,
}

impl RevocationClaims {
    /// Parses a revocation payload strictly, with the same bounds for `id`
    /// and `reason` as the admin form and the audit leaf.
    ///
    /// # Errors
    /// [`WarrantError::Malformed`] (`malformed_warrant`) naming the member.
    pub fn parse(payload: &[u8]) -> Result<Self, WarrantError> {
        let raw: Self = crate::codec::from_object_slice(payload)
            .map_err(|e| WarrantError::Malformed(format!("revocation: {e}")))?;
        check_bound("id", &raw.id, crate::bounds::warrant_id)?;
        check_bound("reason", &raw.reason, crate::bounds::reason)?;
        Ok(raw)
    }
}

/// A revocation whose every signature verified and that at least one
/// authority of a policy role signed. Only [`Verifier::verify_revocation`]
/// makes one.
#[derive(Debug, Clone)]
pub struct VerifiedRevocation {
    id: String,
    reason: String,
    time: OffsetDateTime,
    digest: [u8; 32],
    signers: Vec<Signer>,
    authorised_by: String,
}

impl VerifiedRevocation {
    /// The kid of the first signer (by kid) whose role the policy names:
    /// the authority the revocation is recorded under.
    pub fn authorised_by(&self) -> &str {
        &self.authorised_by
    }
    /// The warrant `id` to revoke.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Why.
    pub fn reason(&self) -> &str {
        &self.reason
    }
    /// The time the authority put in it (the store records the daemon's own
    /// time of revocation).
    pub fn time(&self) -> OffsetDateTime {
        self.time
    }
    /// SHA-256 of the payload bytes, for the audit leaf.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
    /// The distinct signers, ordered by `kid`.
    pub fn signers(&self) -> &[Signer] {
        &self.signers
    }
}

/// `authority` must be valid at `now`.
fn check_authority_valid(authority: &Authority, now: OffsetDateTime) -> Result<(), WarrantError> {
    if authority.is_valid_at(now) {
        return Ok(());
    }
    Err(WarrantError::AuthorityNotValid {
        kid: authority.kid().to_string(),
        valid_from: format_time_exact(authority.valid_from()),
        valid_until: format_time_exact(authority.valid_until()),
    })
}

/// Every rule needs `count` distinct authorities of its role, an authority
/// being a key holder: `signed_with` gives the role, key and holder of each
/// verified signer. Signers that share a holder or a key are one authority
/// and count once.
fn check_policy<'a>(
    rules: &[RoleRule],
    signed_with: impl Iterator<Item = (&'a str, &'a AuthorityPublicKey, &'a str)>,
    emergency: bool,
) -> Result<(), WarrantError> {
    // One holder, or one key, is one authority: it counts once. One found
    // under two roles counts in neither, whatever the order of the
    // signatures: the trust configuration already refuses one key under two
    // kids and one holder under two roles, and this keeps the double lock
    // if it ever did not. (A warrant has at most a few signatures.)
    struct Found<'a> {
        keys: Vec<&'a AuthorityPublicKey>,
        holders: Vec<&'a str>,
        role: &'a str,
        two_roles: bool,
    }
    let mut found: Vec<Found<'_>> = Vec::new();
    for (role, key, holder) in signed_with {
        let same = |f: &Found<'_>| f.keys.contains(&key) || f.holders.contains(&holder);
        match found.iter().position(same) {
            Some(i) => {
                let f = &mut found[i];
                f.two_roles |= f.role != role;
                f.keys.push(key);
                f.holders.push(holder);
                // A signer can join two authorities found apart (one by
                // key, one by holder): they are one.
                while let Some(j) = found.iter().skip(i + 1).position(same).map(|j| j + i + 1) {
                    let other = found.swap_remove(j);
                    let f = &mut found[i];
                    f.two_roles |= other.two_roles || other.role != f.role;
                    f.keys.extend(other.keys);
                    f.holders.extend(other.holders);
                }
            }
            None => found.push(Found {
                keys: vec![key],
                holders: vec![holder],
                role,
                two_roles: false,
            }),
        }
    }
    let mut by_role: BTreeMap<&str, usize> = BTreeMap::new();
    for f in found {
        if !f.two_roles {
            *by_role.entry(f.role).or_default() += 1;
        }
    }
    let missing: Vec<(String, usize, usize)> = rules
        .iter()
        .filter_map(|rule| {
            let found = by_role.get(rule.role.as_str()).copied().unwrap_or(0);
            (found < rule.count).then(|| (rule.role.clone(), rule.count, found))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(WarrantError::PolicyNotMet { emergency, missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwk::P256PrivateKey;

    /// What `check_policy` finds missing: (role, needed, found) per rule
    /// not met; empty when the policy is met.
    fn missing<'a>(
        rules: &[RoleRule],
        signers: impl IntoIterator<Item = (&'a str, &'a AuthorityPublicKey, &'a str)>,
    ) -> Vec<(String, usize, usize)> {
        match check_policy(rules, signers.into_iter(), false) {
            Ok(()) => Vec::new(),
            Err(WarrantError::PolicyNotMet { missing, .. }) => missing,
            Err(other) => panic!("expected policy_not_met, got {other:?}"),
        }
    }

    /// One executive and one judicial.
    fn double_lock() -> [RoleRule; 2] {
        ["executive", "judicial"].map(|role| RoleRule {
            role: role.into(),
            count: 1,
        })
    }

    #[test]
    fn the_policy_counts_keys_not_kids() {
        let rules = [RoleRule {
            role: "judicial".into(),
            count: 2,
        }];
        let a = AuthorityPublicKey::P256(P256PrivateKey::generate().unwrap().public().clone());
        let b = AuthorityPublicKey::P256(P256PrivateKey::generate().unwrap().public().clone());
        // Two signers (two kids) holding one key: one authority.
        let same = [("judicial", &a, "k1"), ("judicial", &a, "k2")];
        assert_eq!(missing(&rules, same), vec![("judicial".to_string(), 2, 1)]);
        let two = [("judicial", &a, "k1"), ("judicial", &b, "k2")];
        check_policy(&rules, two.into_iter(), false).unwrap();
    }

    /// One holder's two keys (the old and the new of an overlapping
    /// rotation) are one authority: they count once, and under two roles
    /// in neither. A signer sharing its key with one authority found and
    /// its holder with another makes them one.
    #[test]
    fn the_policy_counts_holders_not_keys() {
        let rules = [RoleRule {
            role: "judicial".into(),
            count: 2,
        }];
        let key = || AuthorityPublicKey::P256(P256PrivateKey::generate().unwrap().public().clone());
        let (a1, a2, b) = (key(), key(), key());
        let one_holder = [("judicial", &a1, "judge-a"), ("judicial", &a2, "judge-a")];
        assert_eq!(
            missing(&rules, one_holder),
            vec![("judicial".to_string(), 2, 1)]
        );
        let two_holders = [("judicial", &a1, "judge-a"), ("judicial", &b, "judge-b")];
        check_policy(&rules, two_holders.into_iter(), false).unwrap();
        // judge-a (a1), then judge-b (b), then a signer with b's key held by
        // judge-a: all one authority.
        let joined = [
            ("judicial", &a1, "judge-a"),
            ("judicial", &b, "judge-b"),
            ("judicial", &b, "judge-a"),
        ];
        assert_eq!(
            missing(&rules, joined),
            vec![("judicial".to_string(), 2, 1)]
        );
        let both_locks = double_lock();
        let two_roles = [("executive", &a1, "judge-a"), ("judicial", &a2, "judge-a")];
        assert_eq!(
            missing(&both_locks, two_roles),
            vec![
                ("executive".to_string(), 1, 0),
                ("judicial".to_string(), 1, 0)
            ]
        );
    }

    /// One key under two roles is one authority: it cannot be both locks,
    /// and counts in neither.
    #[test]
    fn one_key_counts_in_one_role_only() {
        let rules = double_lock();
        let a = AuthorityPublicKey::P256(P256PrivateKey::generate().unwrap().public().clone());
        let b = AuthorityPublicKey::P256(P256PrivateKey::generate().unwrap().public().clone());
        // In either order, and with a rule of one role only.
        for same in [
            [("executive", &a, "k1"), ("judicial", &a, "k2")],
            [("judicial", &a, "k2"), ("executive", &a, "k1")],
        ] {
            assert_eq!(
                missing(&rules, same),
                vec![
                    ("executive".to_string(), 1, 0),
                    ("judicial".to_string(), 1, 0)
                ]
            );
            assert!(check_policy(&rules[1..], same.into_iter(), false).is_err());
        }
        let two = [("executive", &a, "k1"), ("judicial", &b, "k2")];
        check_policy(&rules, two.into_iter(), false).unwrap();
    }
}

//! The parties of the end-to-end unwrap tests against a real `lavd serve`:
//! a provider, an agency, an auditor and an admin (each a client certificate
//! with its URI SAN and a role), escrow keys made with the real `lavd keys
//! generate`, warrant claims and envelopes built relative to the wall clock
//! (the daemon checks warrants and keys against its own clock), and the
//! auditor's reads of the log.

use std::net::SocketAddr;

use lavd::envelope::{seal_envelope, HeaderBuilder};
use lavd::jwk::{JwkSet, P256PrivateKey, P256PublicKey};
use time::{Duration, OffsetDateTime};

use crate::server::{serve_config, Client, Daemon, Issued, Pki, Response};
use crate::{assert_ok, TestToken};

/// Seals message keys (role `provider`).
pub const PROVIDER: &str = "spiffe://provider.example/messaging";
/// Executes warrants (role `agency`).
pub const AGENCY: &str = "spiffe://agency.example/lea";
/// Reads the audit log (role `auditor`).
pub const AUDITOR: &str = "spiffe://oversight.example/auditor";
/// Revokes warrants (role `admin`).
pub const ADMIN: &str = "spiffe://vault.example/admin";
/// The target every test warrant names.
pub const TARGET: &str = "acct:alice@example.com";

/// `[roles]` for the four parties.
pub fn roles_toml() -> String {
    format!(
        "[roles]\n\"{PROVIDER}\" = [\"provider\"]\n\"{AGENCY}\" = [\"agency\"]\n\
         \"{AUDITOR}\" = [\"auditor\"]\n\"{ADMIN}\" = [\"admin\"]\n"
    )
}

/// Generates escrow key `kid` with the real CLI, sealable within
/// [`crate::key_window`], retained for a year: usable now by the daemon's
/// clock.
/// Returns the public key it prints.
pub fn generate_escrow_key(t: &TestToken, kid: &str) -> P256PublicKey {
    let destroy_after = lavd::codec::format_time(OffsetDateTime::now_utc() + Duration::days(365));
    let printed = assert_ok(&crate::generate_key(t, kid, &destroy_after));
    let jwk = lavd::jwk::Jwk::from_json(printed.as_bytes()).expect("printed JWK");
    P256PublicKey::from_jwk(&jwk).expect("escrow public key")
}

/// A `lavd serve` on a fresh token with the four parties' roles, escrow
/// key `E-1`, and `limits` (TOML lines) in `[limits]`, ready.
#[derive(Debug)]
pub struct Vault {
    /// The daemon (dropped, so killed, before its token).
    pub daemon: Daemon,
    /// Its token and working directory.
    pub t: TestToken,
    /// Its PKI.
    pub pki: Pki,
    /// The parties' certificates.
    pub parties: Parties,
    /// `E-1` as the daemon publishes it.
    pub escrow: P256PublicKey,
}

impl Vault {
    /// Starts it and waits until it is ready.
    pub fn start(limits: &str) -> Self {
        let t = TestToken::new();
        let pki = Pki::new(&t);
        t.write_config(&serve_config(&format!(
            "{}[limits]\n{limits}",
            roles_toml()
        )));
        Self::serve(t, pki)
    }

    /// Starts it on `t`, whose config the caller wrote (with `pki`'s
    /// certificates: [`serve_config`]), with escrow key `E-1`, and waits
    /// until it is ready.
    pub fn serve(t: TestToken, pki: Pki) -> Self {
        generate_escrow_key(&t, "E-1");
        let parties = Parties::new(&pki);
        let daemon = Daemon::start(&t);
        daemon.wait_readyz(200);
        let escrow = published_key(&parties.clients(&pki, daemon.api).provider, "E-1");
        Vault {
            daemon,
            t,
            pki,
            parties,
            escrow,
        }
    }
}

/// The client certificates of the four parties, issued once; clients for a
/// (re)started daemon are made from them.
#[derive(Debug)]
pub struct Parties {
    /// `PROVIDER`.
    pub provider: Issued,
    /// `AGENCY`.
    pub agency: Issued,
    /// `AUDITOR`.
    pub auditor: Issued,
    /// `ADMIN`.
    pub admin: Issued,
}

impl Parties {
    /// Issues the four certificates from `pki`'s client CA.
    pub fn new(pki: &Pki) -> Self {
        Parties {
            provider: pki.clients.identity(PROVIDER),
            agency: pki.clients.identity(AGENCY),
            auditor: pki.clients.identity(AUDITOR),
            admin: pki.clients.identity(ADMIN),
        }
    }

    /// Clients of the daemon at `addr`.
    pub fn clients(&self, pki: &Pki, addr: SocketAddr) -> Clients {
        Clients {
            provider: pki.client(addr, Some(&self.provider)),
            agency: pki.client(addr, Some(&self.agency)),
            auditor: pki.client(addr, Some(&self.auditor)),
            admin: pki.client(addr, Some(&self.admin)),
        }
    }
}

/// One client per party.
#[derive(Debug, Clone)]
pub struct Clients {
    /// As `PROVIDER`.
    pub provider: Client,
    /// As `AGENCY`.
    pub agency: Client,
    /// As `AUDITOR`.
    pub auditor: Client,
    /// As `ADMIN`.
    pub admin: Client,
}

/// `POST path` with a JSON body on a new connection.
pub fn post(client: &Client, path: &str, body: &serde_json::Value) -> Response {
    client
        .request("POST", path, Some(body.to_string().as_bytes()))
        .expect("request")
}

/// The kids of a JWK Set (`GET /v1/keys`, `lavd keys list`), in order.
pub fn kids(set: &serde_json::Value) -> Vec<String> {
    set["keys"]
        .as_array()
        .expect("a JWK Set")
        .iter()
        .map(|k| k["kid"].as_str().expect("a kid").to_string())
        .collect()
}

/// The escrow public key `kid` as `GET /v1/keys` publishes it.
pub fn published_key(provider: &Client, kid: &str) -> P256PublicKey {
    let r = provider.get("/v1/keys");
    assert_eq!(r.status, 200, "{}", r.text());
    let set: JwkSet = serde_json::from_slice(&r.body).expect("JWK Set");
    let jwk = set
        .keys
        .iter()
        .find(|k| k.kid.as_deref() == Some(kid))
        .unwrap_or_else(|| panic!("{kid} not published: {}", r.text()));
    assert_eq!(jwk.use_.as_deref(), Some("enc"));
    assert_eq!(jwk.lav_suite.as_deref(), Some("16-1-2"));
    P256PublicKey::from_jwk(jwk).expect("escrow JWK")
}

/// RFC 3339 for `now + offset`.
pub fn at(now: OffsetDateTime, offset: Duration) -> String {
    lavd::codec::format_time(now + offset)
}

/// Warrant claims for `AGENCY` over `TARGET`: executable from an hour ago
/// for a day, covering envelopes from 30 days ago to a day ahead.
pub fn claims(id: &str, recipient: &P256PublicKey, max_unwraps: u64) -> serde_json::Value {
    let now = OffsetDateTime::now_utc();
    serde_json::json!({
        "id": id,
        "legal_basis": "Investigatory Powers Act 2016 s.19",
        "agency": AGENCY,
        "recipient": recipient.to_jwk(),
        "targets": [TARGET],
        "window": {"from": at(now, -Duration::days(30)), "to": at(now, Duration::days(1))},
        "not_before": at(now, -Duration::hours(1)),
        "expires": at(now, Duration::days(1)),
        "max_unwraps": max_unwraps
    })
}

/// A double-lock warrant (executive and judicial signatures) over `claims`.
pub fn double_lock(claims: &serde_json::Value) -> serde_json::Value {
    let a = crate::server::authorities();
    crate::server::Authorities::sign(claims, &[&a.executive, &a.judicial])
}

/// An envelope sealed by `PROVIDER` to escrow key `kid` (public half
/// `escrow`), for `target` at `time`, carrying `dek`.
pub fn seal(
    escrow: &P256PublicKey,
    kid: &str,
    target: &str,
    time: OffsetDateTime,
    reference: &str,
    dek: &[u8],
) -> serde_json::Value {
    let header = HeaderBuilder::new(kid, PROVIDER, target, time)
        .reference(reference)
        .build()
        .expect("header");
    let envelope = seal_envelope(escrow, &header, dek).expect("seal");
    serde_json::from_str(&envelope.to_json()).expect("envelope JSON")
}

/// `n` envelopes to escrow key `E-1` for [`TARGET`], the i-th sent i+1
/// minutes ago with reference `{tag}-{i}` and DEK `{tag}-{i}-sixteen-bytes-dek`.
pub fn batch(escrow: &P256PublicKey, tag: &str, n: usize) -> Vec<serde_json::Value> {
    batch_for(escrow, "E-1", tag, n)
}

/// [`batch`] to escrow key `kid`, whose public key is `escrow`.
pub fn batch_for(escrow: &P256PublicKey, kid: &str, tag: &str, n: usize) -> Vec<serde_json::Value> {
    let now = OffsetDateTime::now_utc();
    (0..n)
        .map(|i| {
            seal(
                escrow,
                kid,
                TARGET,
                now - Duration::minutes(i as i64 + 1),
                &format!("{tag}-{i}"),
                format!("{tag}-{i}-sixteen-bytes-dek").as_bytes(),
            )
        })
        .collect()
}

/// The header bytes of each envelope (empty where there is none), as
/// `open_reply` wants them.
pub fn headers(envelopes: &[serde_json::Value]) -> Vec<Vec<u8>> {
    envelopes
        .iter()
        .map(|e| {
            e["header"]
                .as_str()
                .and_then(|h| lavd::codec::b64_decode(h).ok())
                .unwrap_or_default()
        })
        .collect()
}

/// The `envelope_digest` an audit leaf gives `envelope` (SHA-256 of header
/// ‖ enc, base64url).
pub fn envelope_digest(envelope: &serde_json::Value) -> String {
    let part = |name: &str| {
        lavd::codec::b64_decode(envelope[name].as_str().expect("member")).expect("base64url")
    };
    let mut bytes = part("header");
    bytes.extend_from_slice(&part("enc"));
    lavd::codec::b64_encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    ))
}

/// Each result of an unwrap reply: `ok`, or its denial reason.
pub fn statuses(reply: &serde_json::Value) -> Vec<String> {
    reply["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| match r["status"].as_str().expect("status") {
            "ok" => "ok".to_string(),
            "denied" => r["reason"].as_str().expect("reason").to_string(),
            other => panic!("unknown status {other}"),
        })
        .collect()
}

/// A fresh recipient key for an agency.
pub fn recipient() -> P256PrivateKey {
    P256PrivateKey::generate().expect("recipient key")
}

/// One leaf of the audit log as the auditor reads it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its index.
    pub index: u64,
    /// The exact leaf bytes.
    pub bytes: Vec<u8>,
    /// The leaf parsed.
    pub leaf: serde_json::Value,
}

/// Leaves `[start, end)` through `GET /v1/audit/entries`, page by page.
pub fn entries(auditor: &Client, start: u64, end: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut next = start;
    while next < end {
        let stop = end.min(next + 1000);
        let r = auditor.get(&format!("/v1/audit/entries?start={next}&end={stop}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.json();
        let page = page["entries"].as_array().expect("entries");
        assert!(!page.is_empty(), "no leaves from {next}");
        for e in page {
            let index = e["index"].as_u64().expect("index");
            assert_eq!(index, next, "entries out of order");
            let bytes = lavd::codec::b64_decode(e["leaf"].as_str().expect("leaf")).expect("b64");
            let leaf = serde_json::from_slice(&bytes).expect("leaf JSON");
            out.push(Entry { index, bytes, leaf });
            next += 1;
        }
    }
    out
}

/// The log as a Merkle tree, each entry at its index.
pub fn memory_tree(log: &[Entry]) -> lavd::audit::merkle::MemoryTree {
    let mut memory = lavd::audit::merkle::MemoryTree::new();
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.index, i as u64, "entries out of order");
        memory.push_leaf(&e.bytes);
    }
    memory
}

/// How many of `log`'s unwrap leaves say `opened`.
pub fn opened_leaves(log: &[Entry]) -> usize {
    log.iter()
        .filter(|e| e.leaf["event"] == "unwrap" && e.leaf["outcome"] == "opened")
        .count()
}

/// Counts each answer `(status, code)` and asserts each is a success or a
/// store outage's: 200 `ok`, or 503 `store_unavailable` or (a COMMIT whose
/// answer was cut) `spent_not_released`; no 500, no other code, and no
/// request left without an answer (a transport error, status 0).
pub fn assert_store_outage_answers<'a>(
    answers: impl IntoIterator<Item = (u16, &'a str)>,
) -> std::collections::BTreeMap<(u16, String), usize> {
    let mut codes = std::collections::BTreeMap::new();
    for (status, code) in answers {
        *codes.entry((status, code.to_string())).or_default() += 1;
    }
    for (status, code) in codes.keys() {
        assert!(
            (*status == 200 && code == "ok")
                || (*status == 503
                    && (code == "store_unavailable" || code == "spent_not_released")),
            "{codes:?}"
        );
    }
    codes
}

/// The budget warrant `id` has spent, read from the SQLite store of `t`.
pub fn spent(t: &TestToken, id: &str) -> i64 {
    rusqlite::Connection::open(t.path("lavd.db"))
        .expect("open the store")
        .query_row("SELECT spent FROM warrants WHERE id = ?1", [id], |row| {
            row.get(0)
        })
        .expect("the warrant's row")
}

/// The size of the log, from a fresh checkpoint verified with the
/// published verifier key.
pub fn tree_size(auditor: &Client) -> u64 {
    let key = verifier_key(auditor);
    let r = auditor.get("/v1/audit/checkpoint");
    assert_eq!(r.status, 200, "{}", r.text());
    let note = r.json()["checkpoint"]
        .as_str()
        .expect("checkpoint")
        .to_string();
    lavd::audit::note::verify_note(&note, &key)
        .expect("checkpoint verifies")
        .size
}

/// The signed-note verifier key from `GET /v1/audit/key`.
pub fn verifier_key(auditor: &Client) -> String {
    let r = auditor.get("/v1/audit/key");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["verifier_key"]
        .as_str()
        .expect("verifier_key")
        .to_string()
}

/// A `lavd serve` through the fault module ([`crate::Shim`]) whose held
/// calls do not time out (`call_timeout_ms = 60000`), with escrow keys
/// `kids` and the four parties' clients: for tests that hold a request in
/// an HSM call while something else happens.
#[derive(Debug)]
pub struct Held {
    /// Kept running; dropped, so killed, before its token.
    pub daemon: Daemon,
    /// The parties' clients of it.
    pub c: Clients,
    /// The fault module's settings.
    pub shim: crate::Shim,
    /// Its token and working directory.
    pub t: TestToken,
}

impl Held {
    /// Starts it, ready.
    pub fn new(kids: &[&str]) -> Self {
        Self::with(kids, |config| config)
    }

    /// As [`Held::new`], with its config file's text edited by `edit`.
    pub fn with(kids: &[&str], edit: impl FnOnce(String) -> String) -> Self {
        let t = TestToken::new();
        let pki = Pki::new(&t);
        let shim = crate::Shim::new(&t);
        t.write_config_hsm(
            &crate::shim_module_path(),
            2,
            "call_timeout_ms = 60000\n",
            &edit(format!(
                "{}\n{}",
                shim.hsm_env(),
                serve_config(&roles_toml())
            )),
        );
        for kid in kids {
            generate_escrow_key(&t, kid);
        }
        let daemon = Daemon::start(&t);
        daemon.wait_readyz(200);
        let c = Parties::new(&pki).clients(&pki, daemon.api);
        Held { daemon, c, shim, t }
    }

    /// An envelope sealed to `escrow` (key `kid`) an hour ago, as a
    /// provider would.
    pub fn seal(&self, escrow: &P256PublicKey, kid: &str, tag: &str) -> serde_json::Value {
        seal(
            escrow,
            kid,
            TARGET,
            OffsetDateTime::now_utc() - Duration::hours(1),
            tag,
            &[7; 32],
        )
    }
}

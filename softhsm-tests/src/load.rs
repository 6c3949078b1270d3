//! The mixed request stream of `tests/load.rs`, run by separate client
//! processes (`src/bin/load-client.rs`): the test writes a [`Plan`] (the
//! daemon's address, the parties' certificates, the request kinds with the
//! status and outcome each must get), each process runs its share of the
//! stream on keep-alive connections and prints a [`Tally`] as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::server::{Client, Issued, Response, TlsConn};

/// One kind of request and the answer it must get.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kind {
    /// A short name for the report (`unwrap_ok`, `bad_json`, …).
    pub name: String,
    /// Which party sends it (a key of [`Plan::parties`]).
    pub party: String,
    /// `GET` or `POST`.
    pub method: String,
    /// The path.
    pub path: String,
    /// The body, if any.
    pub body: Option<String>,
    /// The HTTP status it must get.
    pub status: u16,
    /// What [`outcome`] must say of the response.
    pub outcome: String,
}

/// What one client process runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The API.
    pub addr: SocketAddr,
    /// The server CA, PEM.
    pub server_ca: String,
    /// Certificate and key PEM per party.
    pub parties: BTreeMap<String, (String, String)>,
    /// The kinds, sent in turn.
    pub kinds: Vec<Kind>,
    /// How many requests this process sends.
    pub requests: u64,
    /// Where in the rotation of kinds it starts.
    pub offset: u64,
}

/// What one client process saw.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Requests sent.
    pub requests: u64,
    /// Responses per kind, then per `"<status> <outcome>"`.
    pub responses: BTreeMap<String, BTreeMap<String, u64>>,
    /// Responses that were not what their kind must get, and transport
    /// errors (the first 20).
    pub unexpected: Vec<String>,
    /// Count of everything in `unexpected`, including those not kept.
    pub unexpected_count: u64,
}

/// What a response says: the error code for an error; for an unwrap
/// reply, each result's `ok` or denial reason, comma-separated; else `ok`.
pub fn outcome(r: &Response) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
        return format!("non-JSON body of {} bytes", r.body.len());
    };
    if let Some(code) = v["error"]["code"].as_str() {
        return code.to_string();
    }
    match v["results"].as_array() {
        Some(results) => results
            .iter()
            .map(|r| match r["status"].as_str() {
                Some("ok") => "ok",
                _ => r["reason"].as_str().unwrap_or("?"),
            })
            .collect::<Vec<_>>()
            .join(","),
        None => "ok".to_string(),
    }
}

impl Tally {
    fn unexpected(&mut self, what: String) {
        self.unexpected_count += 1;
        if self.unexpected.len() < 20 {
            self.unexpected.push(what);
        }
    }

    /// Adds another process's tally.
    pub fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        for (kind, answers) in other.responses {
            let mine = self.responses.entry(kind).or_default();
            for (answer, n) in answers {
                *mine.entry(answer).or_default() += n;
            }
        }
        self.unexpected_count += other.unexpected_count;
        self.unexpected.extend(other.unexpected);
    }

    /// Responses per HTTP status, over all kinds.
    pub fn by_status(&self) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for answers in self.responses.values() {
            for (answer, n) in answers {
                let status = answer
                    .split(' ')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                *out.entry(status).or_default() += n;
            }
        }
        out
    }
}

/// Runs `plan` and tallies the answers.
pub fn run(plan: &Plan) -> Tally {
    let ca = CertificateDer::from_pem_slice(plan.server_ca.as_bytes()).expect("server CA PEM");
    let clients: BTreeMap<&str, Client> = plan
        .parties
        .iter()
        .map(|(name, (cert, key))| {
            let issued = Issued::from_pem(cert, key);
            let client = Client::trusting(
                plan.addr,
                ca.clone(),
                Some(&issued),
                &[&rustls::version::TLS13],
            );
            (name.as_str(), client)
        })
        .collect();
    let mut conns: BTreeMap<&str, TlsConn> = BTreeMap::new();
    let mut tally = Tally::default();
    for i in 0..plan.requests {
        let kind = &plan.kinds[((i + plan.offset) % plan.kinds.len() as u64) as usize];
        tally.requests += 1;
        let party = kind.party.as_str();
        if !conns.contains_key(party) {
            match clients[party].connect() {
                Ok(c) => {
                    conns.insert(party, c);
                }
                Err(e) => {
                    tally.unexpected(format!("{}: connect: {e}", kind.name));
                    continue;
                }
            }
        }
        let conn = conns.get_mut(party).expect("connected above");
        let result = conn.request(
            &kind.method,
            &kind.path,
            &[],
            kind.body.as_deref().map(str::as_bytes),
        );
        match result {
            Ok(r) => {
                let answer = format!("{} {}", r.status, outcome(&r));
                if r.status != kind.status || answer != format!("{} {}", kind.status, kind.outcome)
                {
                    tally.unexpected(format!("{}: {answer}", kind.name));
                }
                *tally
                    .responses
                    .entry(kind.name.clone())
                    .or_default()
                    .entry(answer)
                    .or_default() += 1;
                if r.header("connection") == Some("close") {
                    conns.remove(party);
                }
            }
            Err(e) => {
                tally.unexpected(format!("{}: transport: {e}", kind.name));
                conns.remove(party);
            }
        }
    }
    tally
}

/// A line of process `pid`'s `/proc/<pid>/status` in KiB (`VmRSS`,
/// `RssAnon`, …).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

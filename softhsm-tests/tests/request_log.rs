//! The request log of `lavd serve` with `[log] format = "json"`: one JSON
//! object per line, each request's line carrying the caller identity, the
//! route template, the status and the error code, and never the body.

use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::TestToken;

const AGENCY: &str = "spiffe://agency.example/lea";

#[test]
fn json_request_lines_name_the_caller_and_never_the_body() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{AGENCY}\" = [\"agency\"]\n[log]\nformat = \"json\"\n"
    )));
    let mut daemon = Daemon::start_logging(&t, "info");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(AGENCY)));
    let marker = "ENVELOPE-CONTENT-MARKER";
    let body = format!("{{\"envelopes\":[\"{marker}\"], \"x\": ");
    client
        .request("POST", "/v1/unwrap", Some(body.as_bytes()))
        .unwrap()
        .assert_error(400, "malformed_request");
    client
        .request(
            "POST",
            "/v1/unwrap",
            Some(b"{\"warrant\":{},\"envelopes\":[{}]}"),
        )
        .unwrap()
        .assert_error(400, "malformed_warrant");
    daemon.signal(rustix::process::Signal::TERM);
    assert_eq!(
        daemon.wait_exit(std::time::Duration::from_secs(10)).code(),
        Some(0)
    );

    let log = daemon.stderr();
    assert!(!log.contains(marker), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let requests: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 2, "{log}");
    for (line, (status, code)) in requests
        .iter()
        .zip([(400, "malformed_request"), (400, "malformed_warrant")])
    {
        assert_eq!(line["fields"]["status"], status, "{line}");
        assert_eq!(line["fields"]["code"], code, "{line}");
        assert_eq!(line["fields"]["route"], "/v1/unwrap", "{line}");
        assert_eq!(line["span"]["name"], "request", "{line}");
        assert_eq!(line["span"]["identity"], AGENCY, "{line}");
        assert_eq!(line["span"]["method"], "POST", "{line}");
    }
}

//! `docs/openapi.yaml` describes exactly the routes lavd serves: the paths
//! and methods in the spec equal `api::routes::ROUTES` and
//! `api::admin::ADMIN_ROUTES` (and `route()` refuses, in test builds, any
//! route missing from `ROUTES`), and a real `lavd serve` answers every one of
//! them (never 404 or 405) while an unlisted path is 404.

use std::collections::BTreeSet;

use lavd::api::admin::ADMIN_ROUTES;
use lavd::api::routes::ROUTES;
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::TestToken;

/// (METHOD, path) pairs of the spec's `paths:` map. The spec is our own
/// file, written with two-space indentation: paths at two spaces, methods at
/// four. (`deploy/check` also parses it as YAML.)
fn spec_routes() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"))
            .unwrap();
    let mut in_paths = false;
    let mut path = None;
    let mut routes = BTreeSet::new();
    for line in text.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if !in_paths {
            continue;
        }
        if !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end_matches(':')));
            continue;
        }
        if let Some(m) = line.strip_prefix("    ") {
            let m = m.trim_end_matches(':');
            if ["get", "post", "put", "delete", "patch"].contains(&m) {
                routes.insert((m.to_uppercase(), path.clone().expect("a path")));
            }
        }
    }
    routes
}

#[test]
fn the_spec_lists_exactly_the_routes_served() {
    let spec = spec_routes();
    let code: BTreeSet<(String, String)> = ROUTES
        .iter()
        .chain(ADMIN_ROUTES)
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(spec, code);

    const ALL: &str = "spiffe://test.example/all-roles";
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{ALL}\" = [\"provider\", \"agency\", \"auditor\", \"admin\"]\n"
    )));
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let client = pki.client(daemon.api, Some(&pki.clients.identity(ALL)));
    for (method, path) in ROUTES {
        let body: Option<&[u8]> = (*method == "POST").then_some(b"{}");
        let r = client.request(method, path, body).unwrap();
        assert!(
            ![404, 405].contains(&r.status),
            "{method} {path}: {} {}",
            r.status,
            r.text()
        );
    }
    let r = client.request("GET", "/v1/not-in-the-spec", None).unwrap();
    r.assert_error(404, "not_found");
}

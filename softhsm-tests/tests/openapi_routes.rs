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

/// The string literals of `fn code` bodies (indented four spaces, ended by
/// the first line that closes at that depth) and of `code: "…"` fields in
/// `text`: the stable codes a source file can answer with.
fn codes_in(text: &str) -> BTreeSet<String> {
    let literal = |s: &str| -> Vec<String> {
        s.split('"')
            .skip(1)
            .step_by(2)
            .filter(|w| {
                !w.is_empty()
                    && w.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            })
            .map(str::to_owned)
            .collect()
    };
    let mut codes = BTreeSet::new();
    let mut in_code_fn = false;
    for line in text.lines() {
        if line.trim_start().starts_with("pub fn code(")
            || line.trim_start().starts_with("fn code(")
        {
            in_code_fn = true;
            continue;
        }
        if in_code_fn {
            if line == "    }" {
                in_code_fn = false;
            } else {
                codes.extend(literal(line));
            }
        }
        // `code: "…"`, or `code: if … { "a" } else { "b" }`: every
        // code-shaped literal after it on the line.
        if let Some((_, rest)) = line.split_once("code: ") {
            codes.extend(literal(rest));
        }
    }
    codes
}

/// The README says `docs/openapi.yaml` has every error code: each code the
/// API can answer with (those of the errors an API request can end in, and
/// of the handlers' own refusals) is named in it. Client-side codes (`lavd
/// seal`, `lavd open`, `lavd warrant sign`) and the listener's start error
/// are not the API's and are not read.
#[test]
fn the_spec_names_every_error_code_the_api_answers_with() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../daemon/src/");
    let spec =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"))
            .unwrap();
    let named = |code: &str| {
        spec.match_indices(code).any(|(at, _)| {
            let before = spec[..at].bytes().next_back();
            let after = spec[at + code.len()..].bytes().next();
            let part = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
            !part(before) && !part(after)
        })
    };
    // Every file of the modules an API request runs through, but for the
    // listener's start error and the warrant-signing CLI's codes, which
    // are not answers of the API.
    let not_the_apis = ["api/server.rs", "warrant/sign.rs"];
    let mut all = BTreeSet::new();
    let mut read = 0;
    for module in ["api", "warrant", "unwrap"] {
        let mut files: Vec<_> = std::fs::read_dir(format!("{src}{module}"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .collect();
        files.sort();
        for path in files {
            let name = format!("{module}/{}", path.file_name().unwrap().to_str().unwrap());
            if not_the_apis.contains(&name.as_str()) {
                continue;
            }
            all.extend(codes_in(&std::fs::read_to_string(&path).unwrap()));
            read += 1;
        }
    }
    assert!(read >= 10, "only {read} source files read");
    // The scan finds what it should.
    for known in [
        "malformed_request",
        "warrant_revoked",
        "log_inconsistent",
        "spent_not_released",
    ] {
        assert!(
            all.contains(known),
            "{known} not found in the sources: {all:?}"
        );
    }
    let missing: Vec<_> = all.iter().filter(|c| !named(c)).collect();
    assert!(
        missing.is_empty(),
        "codes docs/openapi.yaml does not name: {missing:?}"
    );
}

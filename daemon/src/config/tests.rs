use std::collections::HashMap;
use std::io::Write as _;

use super::*;

struct MapEnv(HashMap<String, String>);
impl Env for MapEnv {
    fn var(&self, name: &str) -> Result<String, std::env::VarError> {
        self.0
            .get(name)
            .cloned()
            .ok_or(std::env::VarError::NotPresent)
    }
}

fn load(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    std::fs::write(dir.path().join("pin"), "1234\n").unwrap();
    let env = MapEnv(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    Settings::load(&path, &env)
}

const GOOD: &str = r#"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "lavd"
pin_file = "pin"
[store]
path = "lavd.db"
"#;

#[test]
fn a_good_config_resolves_relative_paths() {
    let s = load(GOOD, &[]).unwrap();
    assert_eq!(s.hsm.token, TokenSelector::Label("lavd".into()));
    assert_eq!(s.hsm.sessions, 4);
    assert_eq!(
        s.hsm.call_timeout,
        std::time::Duration::from_millis(crate::config::DEFAULT_HSM_CALL_TIMEOUT_MS)
    );
    assert!(matches!(
        &s.store,
        crate::store::StoreSettings::Sqlite { path } if path.ends_with("lavd.db") && path.is_absolute()
    ));
    assert_eq!(s.audit.key_label, "lav-audit");
}

#[test]
fn pin_from_env() {
    let text = GOOD.replace("pin_file = \"pin\"", "pin_env = \"LAVD_PIN\"");
    assert!(load(&text, &[("LAVD_PIN", "1234")]).is_ok());
    let e = load(&text, &[]).unwrap_err();
    assert_eq!(e.field, "hsm.pin_env");
    assert!(e.reason.contains("LAVD_PIN is not set"), "{e}");
    // Set, but not UTF-8: said so (not "not set"), and not shown.
    struct NotText;
    impl Env for NotText {
        fn var(&self, _: &str) -> Result<String, std::env::VarError> {
            use std::os::unix::ffi::OsStringExt as _;
            Err(std::env::VarError::NotUnicode(
                std::ffi::OsString::from_vec(b"s3cretPIN\xff".to_vec()),
            ))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::write(&path, &text).unwrap();
    let e = Settings::load(&path, &NotText).unwrap_err();
    assert_eq!(e.field, "hsm.pin_env");
    assert!(
        e.reason.contains("LAVD_PIN holds bytes that are not UTF-8"),
        "{e}"
    );
    assert!(!e.to_string().contains("s3cretPIN"), "{e}");
}

/// A PIN read from an environment variable follows the file's rule: its
/// line ends go (a Kubernetes Secret made `--from-file`, passed as an
/// environment variable, ends in one; the token refused it, and each
/// start used up one of the token's tries); nothing left is refused. The
/// database password the same.
#[test]
fn pin_env_and_pin_file_read_one_secret_alike() {
    use secrecy::ExposeSecret as _;
    let text = GOOD.replace("pin_file = \"pin\"", "pin_env = \"LAVD_PIN\"");
    let s = load(&text, &[("LAVD_PIN", "1234\r\n")]).unwrap();
    assert_eq!(s.hsm.pin.expose_secret(), "1234");
    let e = load(&text, &[("LAVD_PIN", "\n")]).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.reason.as_str()),
        ("hsm.pin_env", "LAVD_PIN is empty")
    );
    let env = PG.replace(
        "password_file = \"dbpass\"",
        "password_env = \"LAVD_DB_PASSWORD\"",
    );
    let s = load_pg(&env, &[("LAVD_DB_PASSWORD", "from-env\n")]).unwrap();
    let crate::store::StoreSettings::Postgres(pg) = &s.store else {
        panic!()
    };
    assert_eq!(pg.password.as_deref().map(String::as_str), Some("from-env"));
}

/// A PIN file that is a FIFO (or a device) is refused at once, naming it:
/// opening a FIFO waits for a writer, and held the start (or a SIGHUP's
/// reload, and every reload after it) for ever. One larger than any PIN
/// is refused too.
#[test]
fn a_pin_file_that_is_no_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::write(
        &path,
        GOOD.replace("pin_file = \"pin\"", "pin_file = \"fifo\""),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.path().join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let (done, answer) = std::sync::mpsc::channel();
    let loading = path.clone();
    std::thread::spawn(move || {
        let _ = done.send(Settings::load(&loading, &MapEnv(HashMap::new())));
    });
    let e = answer
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("the load waited on the FIFO")
        .unwrap_err();
    assert_eq!(e.field, "hsm.pin_file");
    assert!(e.reason.contains("not a regular file"), "{}", e.reason);
    std::fs::write(&path, GOOD).unwrap();
    std::fs::write(dir.path().join("pin"), "1".repeat(70_000)).unwrap();
    let e = Settings::load(&path, &MapEnv(HashMap::new())).unwrap_err();
    assert_eq!(e.field, "hsm.pin_file");
    assert!(e.reason.contains("larger than 65536 bytes"), "{}", e.reason);
}

#[test]
fn a_refused_pin_record_is_kept_against_the_pin_file_only() {
    let with_record = GOOD.replace(
        "pin_file = \"pin\"",
        "pin_file = \"pin\"\nrefused_pin_record = \"run/pin-refused\"",
    );
    let s = load(&with_record, &[]).unwrap();
    let record = s.refused_pin_record.expect("the record");
    assert!(record.record.is_absolute() && record.record.ends_with("run/pin-refused"));
    assert!(record.login.pin_file().ends_with("pin"));
    assert!(load(GOOD, &[]).unwrap().refused_pin_record.is_none());

    let from_env = with_record.replace("pin_file = \"pin\"", "pin_env = \"LAVD_PIN\"");
    let e = load(&from_env, &[("LAVD_PIN", "1234")]).unwrap_err();
    assert_eq!(e.field, "hsm.refused_pin_record");
    assert!(e.reason.contains("needs pin_file"), "{}", e.reason);
}

#[test]
fn refusals_name_the_field() {
    let cases: &[(&str, &str)] = &[
        ("token_label = \"lavd\"", "slot = 0"),
        ("pin_file = \"pin\"", "pin = \"1234\""),
        (
            "token_label = \"lavd\"",
            "token_label = \"lavd\"\ntoken_serial = \"x\"",
        ),
        ("pin_file = \"pin\"", "pin_file = \"missing\""),
        (
            "token_label = \"lavd\"",
            "token_label = \"lavd\"\nsessions = 0",
        ),
        (
            "token_label = \"lavd\"",
            "token_label = \"lavd\"\ncall_timeout_ms = 10",
        ),
        // Under the escrow keys' prefix, the daily destruction of a
        // destroyed kid of that name would delete the audit key.
        (
            "path = \"lavd.db\"",
            "path = \"lavd.db\"\n[audit]\nkey_label = \"lav-escrow:2020-01\"",
        ),
    ];
    let fields = [
        "hsm.slot",
        "hsm.pin",
        "hsm.token_label",
        "hsm.pin_file",
        "hsm.sessions",
        "hsm.call_timeout_ms",
        "audit.key_label",
    ];
    for ((from, to), field) in cases.iter().zip(fields) {
        let e = load(&GOOD.replace(from, to), &[]).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().contains("lavd.toml"), "{e}");
    }
}

#[test]
fn module_resets_are_off_unless_set_and_bounded() {
    assert_eq!(
        load(GOOD, &[]).unwrap().hsm.quirks.reset_module_after_opens,
        0
    );
    let with = |n: &str| {
        load(
            &GOOD.replace(
                "[store]",
                &format!("[hsm.quirks]\nreset_module_after_opens = {n}\n[store]"),
            ),
            &[],
        )
    };
    for ok in ["0", "100", "1000000000"] {
        assert_eq!(
            with(ok)
                .unwrap()
                .hsm
                .quirks
                .reset_module_after_opens
                .to_string(),
            ok
        );
    }
    for bad in ["1", "99", "1000000001"] {
        let e = with(bad).unwrap_err();
        assert_eq!(e.field, "hsm.quirks.reset_module_after_opens", "{e}");
        assert!(e.reason.contains("between 100 and 1000000000"), "{e}");
    }
}

#[test]
fn unknown_fields_are_refused_with_their_place() {
    let e = load(&format!("{GOOD}\nbogus = 1\n"), &[]).unwrap_err();
    assert!(e.reason.contains("bogus"), "{e}");
    // The table the key is in, and where.
    assert_eq!(e.field, "store", "{e}");
    assert!(e.reason.contains("(at [store] line "), "{e}");
}

const TLS: &str = r#"
[tls]
cert = "tls/server.pem"
key = "tls/server.key"
client_cas = ["tls/clients.pem"]
"#;

#[test]
fn serve_tables_have_documented_defaults() {
    let s = load(&format!("{GOOD}{TLS}"), &[]).unwrap();
    assert_eq!(s.server.listen, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(s.server.shutdown_grace, std::time::Duration::from_secs(30));
    assert_eq!(s.server.blocking_threads, 512);
    assert_eq!(s.admin.listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(s.limits, Limits::default());
    assert_eq!(s.limits.max_body_bytes, 1 << 20);
    assert_eq!(s.limits.max_body_bytes_in_flight, 64 << 20);
    assert_eq!(s.limits.max_warrant_bytes, 256 << 10);
    // Unset, the warrant bound follows a smaller body bound down.
    let small = load(
        &format!("{GOOD}{TLS}[limits]\nmax_body_bytes = 4096\n"),
        &[],
    )
    .unwrap();
    assert_eq!(small.limits.max_warrant_bytes, 4096);
    assert_eq!(s.log, LogSettings::default());
    let tls = s.require_tls().unwrap();
    assert_eq!(tls.min_version, TlsVersion::Tls13);
    assert!(tls.cert.is_absolute() && tls.cert.ends_with("tls/server.pem"));
    assert!(tls.client_cas[0].is_absolute());
    assert!(!tls.allow_unknown_revocation_status);
    assert!(tls.enforce_crl_expiry);
}

#[test]
fn key_commands_need_no_tls_table_but_serve_does() {
    let s = load(GOOD, &[]).unwrap();
    let e = s.require_tls().unwrap_err();
    assert_eq!(e.field, "tls");
}

#[test]
fn roles_map_identities_to_known_roles() {
    let text = format!(
        "{GOOD}{TLS}\n[roles]\n\"spiffe://agency.example/lea\" = [\"agency\", \"auditor\"]\n"
    );
    let s = load(&text, &[]).unwrap();
    let roles = s.roles.roles("spiffe://agency.example/lea");
    assert!(roles.contains(&crate::api::identity::Role::Agency));
    assert!(roles.contains(&crate::api::identity::Role::Auditor));
    assert!(s.roles.roles("spiffe://other").is_empty());
}

#[test]
fn per_address_connection_bounds_default_to_the_listeners_own() {
    let s = load(&format!("{GOOD}{TLS}[limits]\nmax_connections = 50\n"), &[]).unwrap();
    assert_eq!(s.limits.max_connections_per_ip, 50);
    let public = |extra: &str| {
        let text = format!("{GOOD}{TLS}[audit.public]\nlisten = \"127.0.0.1:9443\"\n{extra}");
        let s = load(&text, &[]).unwrap();
        s.audit.public.unwrap().max_connections_per_ip
    };
    assert_eq!(public(""), 32);
    assert_eq!(public("max_connections = 10\n"), 10);
    assert_eq!(public("max_connections_per_ip = 5\n"), 5);
}

/// Both token buckets take a rate with one definition of its bounds: a
/// fraction is a rate, not a type error, in either table.
#[test]
fn both_rate_limits_take_the_same_rates() {
    let text = format!(
        "{GOOD}{TLS}[limits]\nrate_limit_per_second = 0.5\n\
         [audit.public]\nlisten = \"127.0.0.1:9443\"\nrate_limit_per_second = 0.25\n"
    );
    let s = load(&text, &[]).unwrap();
    assert!((s.limits.rate_limit_per_second - 0.5).abs() < f64::EPSILON);
    let public = s.audit.public.unwrap().rate_limit_per_second;
    assert!((public - 0.25).abs() < f64::EPSILON);
    let public = load(
        &format!("{GOOD}{TLS}[audit.public]\nlisten = \"127.0.0.1:9443\"\n"),
        &[],
    )
    .unwrap()
    .audit
    .public
    .unwrap()
    .rate_limit_per_second;
    assert!((public - 50.0).abs() < f64::EPSILON);
    // And the same bursts: one bound (1 to 1,000,000) for both; the
    // public listener's was that of its connection counts (100,000).
    let text = format!(
        "{GOOD}{TLS}[limits]\nrate_limit_burst = 500000\n\
         [audit.public]\nlisten = \"127.0.0.1:9443\"\nrate_limit_burst = 500000\n"
    );
    let s = load(&text, &[]).unwrap();
    assert_eq!(s.limits.rate_limit_burst, 500_000);
    assert_eq!(s.audit.public.unwrap().rate_limit_burst, 500_000);
    for table in [
        "[limits]\n",
        "[audit.public]\nlisten = \"127.0.0.1:9443\"\n",
    ] {
        let e = load(
            &format!("{GOOD}{TLS}{table}rate_limit_burst = 1000001\n"),
            &[],
        )
        .unwrap_err();
        assert!(e.field.ends_with("rate_limit_burst"), "{}", e.field);
    }
}

#[test]
fn serve_table_refusals_name_the_field() {
    let cases: &[(&str, &str)] = &[
        ("[server]\nlisten = \"localhost:80\"\n", "server.listen"),
        (
            "[server]\nblocking_threads = 3\n",
            "server.blocking_threads",
        ),
        (
            "[server]\nblocking_threads = 4097\n",
            "server.blocking_threads",
        ),
        ("[admin]\nlisten = \"0.0.0.0:8443\"\n", "admin.listen"),
        // The default server.listen, 0.0.0.0:8443, takes this one too.
        ("[admin]\nlisten = \"127.0.0.1:8443\"\n", "admin.listen"),
        (
            "[audit.public]\nlisten = \"0.0.0.0:8443\"\n",
            "audit.public.listen",
        ),
        (
            "[audit.public]\nlisten = \"127.0.0.1:9090\"\n",
            "audit.public.listen",
        ),
        (
            "[audit.public]\nlisten = \"nowhere\"\n",
            "audit.public.listen",
        ),
        (
            "[audit.public]\nlisten = \"127.0.0.1:9443\"\nrate_limit_burst = 0\n",
            "audit.public.rate_limit_burst",
        ),
        (
            "[audit.public]\nlisten = \"127.0.0.1:9443\"\nmax_connections = 100001\n",
            "audit.public.max_connections",
        ),
        ("[limits]\nmax_body_bytes = 10\n", "limits.max_body_bytes"),
        (
            "[limits]\nmax_body_bytes_in_flight = 1023\n",
            "limits.max_body_bytes_in_flight",
        ),
        (
            "[limits]\nmax_body_bytes_in_flight = 68719476737\n",
            "limits.max_body_bytes_in_flight",
        ),
        // A body of max_body_bytes could never be read.
        (
            "[limits]\nmax_body_bytes = 4096\nmax_body_bytes_in_flight = 4095\n",
            "limits.max_body_bytes_in_flight",
        ),
        (
            "[limits]\nidle_timeout_secs = 0\n",
            "limits.idle_timeout_secs",
        ),
        (
            "[limits]\nrate_limit_per_second = 0\n",
            "limits.rate_limit_per_second",
        ),
        (
            "[limits]\nrate_limit_per_second = 1e-20\n",
            "limits.rate_limit_per_second",
        ),
        (
            "[audit.public]\nlisten = \"127.0.0.1:9443\"\nrate_limit_per_second = 0\n",
            "audit.public.rate_limit_per_second",
        ),
        (
            "[audit.public]\nlisten = \"127.0.0.1:9443\"\nrate_limit_per_second = 2e6\n",
            "audit.public.rate_limit_per_second",
        ),
        ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
        (
            "[limits]\nmax_connections = 10\nmax_connections_per_ip = 11\n",
            "limits.max_connections_per_ip",
        ),
        (
            "[limits]\nmax_connections_per_ip = 0\n",
            "limits.max_connections_per_ip",
        ),
        (
            "[audit.public]\nlisten = \"127.0.0.1:9443\"\nmax_connections = 8\nmax_connections_per_ip = 9\n",
            "audit.public.max_connections_per_ip",
        ),
        (
            "[limits]\nmax_warrant_bytes = 2097152\n",
            "limits.max_warrant_bytes",
        ),
        (
            "[limits]\nmax_body_bytes = 4096\nmax_warrant_bytes = 8192\n",
            "limits.max_warrant_bytes",
        ),
        (
            "[limits]\nmax_warrant_signatures = 0\n",
            "limits.max_warrant_signatures",
        ),
        (
            "[limits]\nmax_envelope_bytes = 13311\n",
            "limits.max_envelope_bytes",
        ),
        (
            "[limits]\nmax_envelope_bytes = 14000\nmax_envelope_header_bytes = 15000\n",
            "limits.max_envelope_header_bytes",
        ),
        // Its base64url alone is 26,667 characters.
        (
            "[limits]\nmax_envelope_bytes = 20000\nmax_envelope_header_bytes = 20000\n",
            "limits.max_envelope_header_bytes",
        ),
        (
            "[limits]\nmax_envelope_bytes = 65536\nmax_envelope_header_bytes = 48385\n",
            "limits.max_envelope_header_bytes",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[log]\nlevel = \"lavd=[\"\n", "log.level"),
        (
            "[roles]\n\"spiffe://a.example/x\" = [\"root\"]\n",
            "roles.\"spiffe://a.example/x\"",
        ),
        (
            "[roles]\n\"spiffe://a.example/x\" = []\n",
            "roles.\"spiffe://a.example/x\"",
        ),
        (
            "[roles]\n\"spiffe://a.example/x\" = [\"agency\", \"agency\"]\n",
            "roles.\"spiffe://a.example/x\"",
        ),
        (
            "[roles]\n\"not a uri\" = [\"agency\"]\n",
            "roles.\"not a uri\"",
        ),
        (
            "[roles]\n\"lea-unit-7\" = [\"agency\"]\n",
            "roles.\"lea-unit-7\"",
        ),
    ];
    for (extra, field) in cases {
        let e = load(&format!("{GOOD}{TLS}{extra}"), &[]).unwrap_err();
        assert_eq!(&e.field, field, "{e}");
    }
    let e = load(
        &format!("{GOOD}{}", TLS.replace("[\"tls/clients.pem\"]", "[]")),
        &[],
    )
    .unwrap_err();
    assert_eq!(e.field, "tls.client_cas");
    let e = load(&format!("{GOOD}{TLS}min_version = \"1.1\"\n"), &[]).unwrap_err();
    assert_eq!(e.field, "tls.min_version");
}

/// An identity with the provider role fits the envelope header's
/// `provider` field (`bounds::provider`, 512 bytes), which carries it; the
/// other roles take identities up to a certificate's 2,048 bytes.
#[test]
fn a_provider_identity_fits_the_envelope_header() {
    let identity = |bytes: usize| format!("spiffe://p.example/{}", "x".repeat(bytes - 19));
    let roles = |identity: &str, role: &str| format!("[roles]\n\"{identity}\" = [\"{role}\"]\n");
    let long = identity(513);
    let e = load(&format!("{GOOD}{TLS}{}", roles(&long, "provider")), &[]).unwrap_err();
    assert_eq!(e.field, format!("roles.{long:?}"), "{e}");
    assert!(
        e.reason
            .contains("an identity with the provider role is at most 512 bytes (it is 513)"),
        "{e}"
    );
    load(
        &format!("{GOOD}{TLS}{}", roles(&identity(512), "provider")),
        &[],
    )
    .unwrap();
    load(
        &format!("{GOOD}{TLS}{}", roles(&identity(2048), "agency")),
        &[],
    )
    .unwrap();
}

#[test]
fn a_pin_file_readable_by_others_is_a_warning() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::write(&path, GOOD).unwrap();
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "1234\n").unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = Settings::load(&path, &MapEnv(HashMap::new())).unwrap();
    let chmod: Vec<_> = s
        .warnings
        .iter()
        .filter(|w| w.contains("chmod 600"))
        .collect();
    assert_eq!(chmod.len(), 1, "{:?}", s.warnings);
}

/// Files whose replacement would hand lavd to whoever replaced them (the
/// config, the PKCS#11 module, trust files) are warned about when others
/// could replace them: writable by group or everyone, or in a directory
/// they may write to without the sticky bit. A PIN file only others may
/// execute is not "readable by other users".
#[test]
fn files_others_could_replace_are_warnings() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    let dir = tempfile::tempdir().unwrap();
    mode(dir.path(), 0o700).unwrap();
    let modules = dir.path().join("modules");
    std::fs::create_dir(&modules).unwrap();
    mode(&modules, 0o755).unwrap();
    let module = modules.join("vendor.so");
    std::fs::write(&module, "not loaded here").unwrap();
    mode(&module, 0o644).unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::write(
        &path,
        GOOD.replace("/usr/lib/softhsm/libsofthsm2.so", "modules/vendor.so"),
    )
    .unwrap();
    mode(&path, 0o644).unwrap();
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "1234\n").unwrap();
    mode(&pin, 0o601).unwrap();
    let replaceable = |what: &str| -> Vec<String> {
        let s = Settings::load(&path, &MapEnv(HashMap::new())).unwrap();
        assert!(
            s.warnings.iter().all(|w| !w.contains("chmod 600")),
            "{:?}",
            s.warnings
        );
        s.warnings
            .into_iter()
            .filter(|w| w.contains("chmod go-w") && w.contains(what))
            .collect()
    };
    assert_eq!(replaceable(""), Vec::<String>::new());
    mode(&path, 0o664).unwrap();
    let found = replaceable("the configuration file");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("writable by its group"), "{found:?}");
    mode(&path, 0o644).unwrap();
    mode(&modules, 0o777).unwrap();
    let found = replaceable("the PKCS#11 module");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("which its group or everyone may write to: chmod go-w that directory"),
        "{found:?}"
    );
    // The sticky bit keeps others from replacing what they do not own.
    mode(&modules, 0o1777).unwrap();
    assert_eq!(replaceable(""), Vec::<String>::new());
    // A symbolic link whose own directory others may write to: the link
    // can be swapped, wherever it points.
    let links = dir.path().join("links");
    std::fs::create_dir(&links).unwrap();
    mode(&links, 0o777).unwrap();
    std::os::unix::fs::symlink(&module, links.join("p11.so")).unwrap();
    std::fs::write(
        &path,
        GOOD.replace("/usr/lib/softhsm/libsofthsm2.so", "links/p11.so"),
    )
    .unwrap();
    let found = replaceable("the PKCS#11 module");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("links,"), "{found:?}");
    mode(&links, 0o755).unwrap();
    assert_eq!(replaceable(""), Vec::<String>::new());
    // A PIN file others may write to (they could spend the token's tries).
    mode(&pin, 0o622).unwrap();
    let found = replaceable("hsm.pin_file");
    assert_eq!(found.len(), 1, "{found:?}");
}

/// The other warnings `GOOD` gets, which the file-mode tests leave aside.
fn unrelated(w: &str) -> bool {
    w.contains("audit.origin is not set")
}

#[test]
fn an_unset_origin_and_an_admin_listener_off_loopback_are_warnings() {
    // `load` leaves the PIN file readable by others: that warning aside.
    let others = |s: &Settings| -> Vec<String> {
        s.warnings
            .iter()
            .filter(|w| !w.contains("chmod 600"))
            .cloned()
            .collect()
    };
    let s = load(GOOD, &[]).unwrap();
    assert_eq!(s.audit.origin, "lavd.invalid/audit");
    let w = others(&s);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("audit.origin is not set") && w[0].contains("\"lavd.invalid/audit\""),
        "{w:?}"
    );
    let named = format!("{GOOD}[audit]\norigin = \"lavd.test/audit\"\n");
    let s = load(&named, &[]).unwrap();
    assert_eq!(s.audit.origin, "lavd.test/audit");
    assert!(others(&s).is_empty(), "{:?}", s.warnings);
    // The origin is the log key's name: signed-note's rule for names is
    // checked here, where the field can be named, not first by the signer.
    let long = "a".repeat(257);
    for bad in [
        "lavd+ops.example/audit",
        "lavd ops/audit",
        "",
        long.as_str(),
    ] {
        let e = load(&format!("{GOOD}[audit]\norigin = {bad:?}\n"), &[]).unwrap_err();
        assert_eq!(e.field, "audit.origin", "{bad}: {e}");
    }

    for (listen, warned) in [
        ("127.0.0.1:9090", false),
        ("[::1]:9090", false),
        ("0.0.0.0:9090", true),
        ("192.0.2.1:9090", true),
    ] {
        let s = load(&format!("{named}[admin]\nlisten = \"{listen}\"\n"), &[]).unwrap();
        let w = others(&s);
        assert_eq!(w.len(), usize::from(warned), "{listen}: {w:?}");
        assert!(
            w.iter()
                .all(|w| w.contains("admin.listen") && w.contains("not a loopback address")),
            "{listen}: {w:?}"
        );
    }
}

#[test]
fn a_tls_key_readable_by_others_is_a_warning() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::write(&path, format!("{GOOD}{TLS}")).unwrap();
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "1234\n").unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let key = dir.path().join("tls/server.key");
    std::fs::write(&key, "not read here").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = Settings::load(&path, &MapEnv(HashMap::new())).unwrap();
    assert!(s.warnings.iter().all(|w| unrelated(w)), "{:?}", s.warnings);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = Settings::load(&path, &MapEnv(HashMap::new())).unwrap();
    let found: Vec<_> = s.warnings.iter().filter(|w| !unrelated(w)).collect();
    assert_eq!(found.len(), 1, "{:?}", s.warnings);
    assert!(
        found[0].contains("TLS private key") && found[0].contains("chmod 600"),
        "{:?}",
        s.warnings
    );
}

const PG: &str = r#"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "lavd"
pin_file = "pin"
[store]
url = "postgresql://lavd@db.example:5432/lavd?sslmode=verify-full"
password_file = "dbpass"
ca_file = "ca.pem"
"#;

/// Loads `text` from a directory that also holds `pin`, `dbpass` and a CA
/// certificate `ca.pem`.
fn load_pg(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::write(dir.path().join("pin"), "1234\n").unwrap();
    std::fs::write(dir.path().join("dbpass"), "s3cret\n").unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["db.example".into()]).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.path().join("not-a-cert.pem"), "hello").unwrap();
    let env = MapEnv(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    Settings::load(&path, &env)
}

/// An HSM call timeout not shorter than the reservation lease is a warning:
/// one slow call outlives the lease and its request releases nothing.
#[test]
fn a_call_timeout_past_the_lease_is_a_warning() {
    let lease_warnings = |s: &Settings| -> Vec<String> {
        s.warnings
            .iter()
            .filter(|w| w.contains("hsm.call_timeout_ms"))
            .cloned()
            .collect()
    };
    let s = load_pg(PG, &[]).unwrap();
    assert_eq!(lease_warnings(&s), Vec::<String>::new());
    let slow = PG
        .replace(
            "pin_file = \"pin\"",
            "pin_file = \"pin\"\ncall_timeout_ms = 120000",
        )
        .replace(
            "ca_file = \"ca.pem\"",
            "ca_file = \"ca.pem\"\nreservation_lease_secs = 120",
        );
    let s = load_pg(&slow, &[]).unwrap();
    let found = lease_warnings(&s);
    assert_eq!(found.len(), 1, "{:?}", s.warnings);
    assert!(
        found[0].contains("120000 ms") && found[0].contains("120 s"),
        "{found:?}"
    );
}

#[test]
fn a_postgres_store_is_configured_with_its_password_held_apart() {
    let s = load_pg(PG, &[]).unwrap();
    let crate::store::StoreSettings::Postgres(pg) = &s.store else {
        panic!("{:?}", s.store)
    };
    assert_eq!(pg.password.as_deref().map(String::as_str), Some("s3cret"));
    assert_eq!(pg.pool_size, 8);
    assert!(pg.ca_file.as_ref().unwrap().is_absolute());
    // The password never shows in a debug print.
    assert!(!format!("{pg:?}").contains("s3cret"));

    let env = PG.replace(
        "password_file = \"dbpass\"",
        "password_env = \"LAVD_DB_PASSWORD\"",
    );
    let s = load_pg(&env, &[("LAVD_DB_PASSWORD", "from-env")]).unwrap();
    let crate::store::StoreSettings::Postgres(pg) = &s.store else {
        panic!()
    };
    assert_eq!(pg.password.as_deref().map(String::as_str), Some("from-env"));

    let plain = PG
        .replace("sslmode=verify-full", "sslmode=disable")
        .replace("ca_file = \"ca.pem\"\n", "");
    assert!(load_pg(&plain, &[]).is_ok());
}

#[test]
fn postgres_refusals_name_the_field() {
    let url = "url = \"postgresql://lavd@db.example:5432/lavd?sslmode=verify-full\"";
    let cases: &[(&str, &str, &str)] = &[
        (
            "password_file = \"dbpass\"",
            "password = \"x\"",
            "store.password",
        ),
        (
            url,
            "url = \"postgresql://lavd:pw@db.example/lavd\"",
            "store.url",
        ),
        (
            url,
            "url = \"postgresql://lavd@db.example/lavd?sslmode=require\"",
            "store.url",
        ),
        (url, "url = \"mysql://lavd@db.example/lavd\"", "store.url"),
        (
            url,
            "url = \"postgresql://lavd@db.example/lavd\"\npath = \"x.db\"",
            "store.url",
        ),
        (url, "", "store.path"),
        (
            "password_file = \"dbpass\"",
            "password_file = \"missing\"",
            "store.password_file",
        ),
        (
            "password_file = \"dbpass\"",
            "password_env = \"UNSET_VAR\"",
            "store.password_env",
        ),
        (
            "password_file = \"dbpass\"",
            "password_file = \"dbpass\"\npassword_env = \"X\"",
            "store.password_file",
        ),
        ("ca_file = \"ca.pem\"\n", "", "store.ca_file"),
        (
            "ca_file = \"ca.pem\"",
            "ca_file = \"missing.pem\"",
            "store.ca_file",
        ),
        (
            "ca_file = \"ca.pem\"",
            "ca_file = \"not-a-cert.pem\"",
            "store.ca_file",
        ),
        (
            "ca_file = \"ca.pem\"",
            "ca_file = \"ca.pem\"\npool_size = 0",
            "store.pool_size",
        ),
        (
            "ca_file = \"ca.pem\"",
            "ca_file = \"ca.pem\"\npool_size = 1000",
            "store.pool_size",
        ),
        (
            "ca_file = \"ca.pem\"",
            "ca_file = \"ca.pem\"\nstatement_timeout_secs = 0",
            "store.statement_timeout_secs",
        ),
        (
            "ca_file = \"ca.pem\"",
            "ca_file = \"ca.pem\"\npool_wait_secs = 0",
            "store.pool_wait_secs",
        ),
        (
            "ca_file = \"ca.pem\"",
            "ca_file = \"ca.pem\"\nreservation_lease_secs = 0",
            "store.reservation_lease_secs",
        ),
    ];
    for (from, to, field) in cases {
        let text = PG.replace(from, to);
        assert_ne!(text, PG, "{from}");
        let e = load_pg(&text, &[]).unwrap_err();
        assert_eq!(e.field, *field, "{to}: {e}");
    }
    // PostgreSQL settings with an SQLite path.
    let e = load(
        &GOOD.replace("path = \"lavd.db\"", "path = \"lavd.db\"\npool_size = 4"),
        &[],
    )
    .unwrap_err();
    assert_eq!(e.field, "store.pool_size");
}

/// A reservation lease no longer than the statement timeout is a warning:
/// a commit that waits that long finds its opens already written as
/// interrupted by another replica.
#[test]
fn a_lease_within_the_statement_timeout_is_a_warning() {
    let warned = |text: &str| {
        load_pg(text, &[])
            .unwrap()
            .warnings
            .iter()
            .any(|w| w.contains("store.reservation_lease_secs"))
    };
    assert!(!warned(PG));
    let short = PG.replace(
        "ca_file = \"ca.pem\"",
        "ca_file = \"ca.pem\"\nreservation_lease_secs = 5",
    );
    assert!(warned(&short));
    let longer = PG.replace(
        "ca_file = \"ca.pem\"",
        "ca_file = \"ca.pem\"\nreservation_lease_secs = 6",
    );
    assert!(!warned(&longer));
}

/// `GOOD` plus `audit`, in a directory that also holds `files`.
fn load_with(audit: &str, files: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    std::fs::write(dir.path().join("pin"), "1234\n").unwrap();
    let path = dir.path().join("lavd.toml");
    std::fs::write(&path, format!("{GOOD}{audit}")).unwrap();
    Settings::load(&path, &MapEnv(HashMap::new()))
}

fn witness_key(name: &str, seed: u8) -> String {
    crate::audit::witness::CosignerKey::new(name, &[seed; 32])
        .unwrap()
        .to_string()
}

fn witness_entry(name: &str, key: &str) -> String {
    format!(
        "[[audit.witnesses]]\nname = \"{name}\"\nurl = \"https://{name}:8444\"\nkey = \"{key}\"\nca_file = \"ca.pem\"\n"
    )
}

#[test]
fn witnesses_and_their_policy_must_name_the_same_keys() {
    let (k1, k2) = (witness_key("w1.example", 1), witness_key("w2.example", 2));
    let policy = format!("witness A {k1}\nwitness B {k2}\ngroup G all A B\nquorum G\n");
    let ca = rcgen::generate_simple_self_signed(vec!["w1.example".into()])
        .unwrap()
        .cert
        .pem();
    let files = [("ca.pem", ca.as_str()), ("p.policy", policy.as_str())];
    let both = format!(
        "[audit]\nwitness_policy = \"p.policy\"\nrelease_after_witness = true\n{}{}",
        witness_entry("w1.example", &k1),
        witness_entry("w2.example", &k2)
    );
    let s = load_with(&both, &files).unwrap();
    let w = s.audit.witnesses.unwrap();
    assert!(w.release_after_witness);
    assert_eq!(w.timeout.as_secs(), 10);
    assert_eq!(w.witnesses.len(), 2);

    // Adding a witness without a gap (OPERATIONS §14, step 2): configured
    // and named by the policy, outside the quorum until it has caught up.
    let k3 = witness_key("w3.example", 3);
    let adding =
        format!("witness A {k1}\nwitness B {k2}\nwitness C {k3}\ngroup G all A B\nquorum G\n");
    let adding_files = [("ca.pem", ca.as_str()), ("p.policy", adding.as_str())];
    let s = load_with(
        &format!("{both}{}", witness_entry("w3.example", &k3)),
        &adding_files,
    )
    .unwrap();
    assert_eq!(s.audit.witnesses.unwrap().witnesses.len(), 3);

    // 64 witnesses: a checkpoint with the log's line and theirs would pass
    // the 64 signature lines a note may have.
    let many: String = (0..64u8)
        .map(|i| {
            let name = format!("w{i}.example");
            witness_entry(&name, &witness_key(&name, i))
        })
        .collect();
    let e = load_with(
        &format!("[audit]\nwitness_policy = \"p.policy\"\n{many}"),
        &files,
    )
    .unwrap_err();
    assert_eq!(e.field, "audit.witnesses", "{e}");
    assert!(e.reason.contains("64 witnesses; at most 63"), "{e}");

    let refused = |audit: &str, files: &[(&str, &str)], field: &str, says: &str| {
        let e = load_with(audit, files).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.reason.contains(says), "{e}");
    };
    // The policy names w2, which no entry configures.
    refused(
        &format!(
            "[audit]\nwitness_policy = \"p.policy\"\n{}",
            witness_entry("w1.example", &k1)
        ),
        &files,
        "audit.witnesses",
        "`B`",
    );
    // An entry the policy does not name.
    refused(
        &format!("{both}{}", witness_entry("w3.example", &k3)),
        &files,
        "audit.witnesses[2].key",
        "w3.example",
    );
    // A name that is not its key's name.
    refused(
        &format!(
            "[audit]\nwitness_policy = \"p.policy\"\n{}{}",
            witness_entry("w1.example", &k1),
            witness_entry("other.example", &k2)
        ),
        &files,
        "audit.witnesses[1].name",
        "other.example",
    );
    // A policy witness whose key type lavd does not verify (an ML-DSA
    // witness, type 0x06): a verifier may be given such a policy, the log
    // may not (it could never count that witness's cosignatures).
    let mldsa_public = [7u8; 1312];
    let mut typed = vec![0x06u8];
    typed.extend_from_slice(&mldsa_public);
    let mldsa = format!(
        "w4.example+{:08x}+{}",
        crate::audit::note::typed_key_id("w4.example", 0x06, &mldsa_public),
        {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&typed)
        }
    );
    let with_mldsa =
        format!("witness A {k1}\nwitness B {k2}\nwitness D {mldsa}\ngroup G all A B\nquorum G\n");
    refused(
        &both,
        &[("ca.pem", ca.as_str()), ("p.policy", with_mldsa.as_str())],
        "audit.witness_policy",
        "names witness `D` with a key of type 0x06",
    );
    // Nor a log key of such a type: this log's key is Ed25519.
    let with_mldsa_log =
        format!("log {mldsa}\nwitness A {k1}\nwitness B {k2}\ngroup G all A B\nquorum G\n");
    refused(
        &both,
        &[
            ("ca.pem", ca.as_str()),
            ("p.policy", with_mldsa_log.as_str()),
        ],
        "audit.witness_policy",
        "names log key `w4.example` of type 0x06",
    );
    // The refresh interval: 1 s to a day; 300 s unset.
    assert_eq!(
        load_with(&both, &files)
            .unwrap()
            .audit
            .witnesses
            .unwrap()
            .refresh_after
            .as_secs(),
        300
    );
    for bad in ["0", "86401"] {
        refused(
            &both.replace(
                "release_after_witness = true",
                &format!("release_after_witness = true\nwitness_refresh_secs = {bad}"),
            ),
            &files,
            "audit.witness_refresh_secs",
            "1 to 86400",
        );
    }
    // A witness named after the log's origin.
    refused(
        &format!(
            "[audit]\norigin = \"w1.example\"\nwitness_policy = \"p.policy\"\n{}{}",
            witness_entry("w1.example", &k1),
            witness_entry("w2.example", &k2)
        ),
        &files,
        "audit.witnesses[0].name",
        "is the log's origin",
    );
    // A URL whose port does not parse, a CA file with no certificate:
    // refused at load, naming the field.
    refused(
        &both.replace("https://w1.example:8444", "https://w1.example:x"),
        &files,
        "audit.witnesses[0].url",
        "port",
    );
    refused(
        &both,
        &[
            ("ca.pem", "not a certificate"),
            ("p.policy", policy.as_str()),
        ],
        "audit.witnesses[0].ca_file",
        "no PEM certificate",
    );
    // release_after_witness under a quorum of none.
    let none = format!("witness A {k1}\nwitness B {k2}\nquorum none\n");
    refused(
        &both,
        &[("ca.pem", ca.as_str()), ("p.policy", none.as_str())],
        "audit.release_after_witness",
        "`none`",
    );
    // Witnesses, or release_after_witness, without a policy.
    refused(
        &format!("[audit]\n{}", witness_entry("w1.example", &k1)),
        &files,
        "audit.witness_policy",
        "w1.example",
    );
    refused(
        "[audit]\nrelease_after_witness = true\n",
        &files,
        "audit.release_after_witness",
        "witness_policy",
    );
    // A policy that does not parse, a missing CA, a timeout out of range.
    refused(
        "[audit]\nwitness_policy = \"p.policy\"\n",
        &[("p.policy", "quorum X\n")],
        "audit.witness_policy",
        "line 1",
    );
    refused(
        &both,
        &[("p.policy", policy.as_str())],
        "audit.witnesses[0].ca_file",
        "ca.pem",
    );
    // https needs the witness's CA; plain http takes none.
    refused(
        &both.replace("ca_file = \"ca.pem\"\n", ""),
        &files,
        "audit.witnesses[0].ca_file",
        "needs the CA",
    );
    let plain = both.replace("https://w2.example:8444", "http://127.0.0.1:8444");
    refused(&plain, &files, "audit.witnesses[1].ca_file", "http://");
    let plain = format!(
        "[audit]\nwitness_policy = \"p.policy\"\n{}[[audit.witnesses]]\nname = \"w2.example\"\n\
         url = \"http://127.0.0.1:8444/prefix/\"\nkey = \"{k2}\"\n",
        witness_entry("w1.example", &k1)
    );
    let w = load_with(&plain, &files).unwrap().audit.witnesses.unwrap();
    assert_eq!(w.witnesses[1].url, "http://127.0.0.1:8444/prefix");
    assert_eq!(w.witnesses[1].ca_file, None);
    refused(
        &plain.replace("http://127.0.0.1", "ftp://127.0.0.1"),
        &files,
        "audit.witnesses[1].url",
        "ftp://",
    );
    // A URL with userinfo is refused naming it, and never echoed, whatever
    // else is wrong with it (a scheme mistyped, say).
    for secret in [
        "https://lavd:hunter2@w2.example/",
        "htps://lavd:hunter2@w2.example/",
        "https:/lavd:hunter2@w2.example/",
        "https//lavd:hunter2@w2.example/",
    ] {
        let e = load_with(
            &plain.replace("http://127.0.0.1:8444/prefix/", secret),
            &files,
        )
        .unwrap_err();
        assert_eq!(e.field, "audit.witnesses[1].url");
        assert!(!e.reason.contains("hunter2"), "{}", e.reason);
    }
    // A URL without a host is refused at load, not at each submission.
    for hostless in ["http:///prefix", "http://:8444/prefix"] {
        refused(
            &plain.replace("http://127.0.0.1:8444/prefix", hostless),
            &files,
            "audit.witnesses[1].url",
            "no host",
        );
    }
    refused(
        &both.replace(
            "release_after_witness = true",
            "release_after_witness = true\nwitness_timeout_secs = 0",
        ),
        &files,
        "audit.witness_timeout_secs",
        "1 to 300",
    );
}

/// The witness's TLS key is checked as lavd's is.
#[test]
fn a_witness_tls_key_readable_by_others_is_a_warning() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("witness.toml");
    let log = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let vkey =
        crate::audit::note::verifier_key("log.test/a", log.verifying_key().as_bytes()).unwrap();
    std::fs::write(dir.path().join("w.seed"), "05".repeat(32)).unwrap();
    std::fs::write(
        &path,
        format!(
            "name = \"witness.test/w\"\nstate = \"w.db\"\ndev = true\nkey_file = \"w.seed\"\n\
             [tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n\
             [[logs]]\norigin = \"log.test/a\"\nvkey = {vkey:?}\n"
        ),
    )
    .unwrap();
    let tls_key = dir.path().join("server.key");
    std::fs::write(&tls_key, "not read here").unwrap();
    let warnings = |mode| {
        std::fs::set_permissions(&tls_key, std::fs::Permissions::from_mode(mode)).unwrap();
        WitnessSettings::load(&path, &MapEnv(HashMap::new()))
            .unwrap()
            .warnings
            .into_iter()
            .filter(|w| w.contains("TLS private key"))
            .count()
    };
    assert_eq!(warnings(0o600), 0);
    assert_eq!(warnings(0o644), 1);

    // Its body bound is the largest add-checkpoint body it parses unless
    // set (lavd's is 1 MiB): the default max_body_bytes_in_flight then
    // takes about 500 of its bodies, not 64.
    let loaded = || WitnessSettings::load(&path, &MapEnv(HashMap::new())).unwrap();
    assert_eq!(
        loaded().limits.max_body_bytes,
        crate::audit::witness::MAX_ADD_CHECKPOINT_BYTES
    );
    assert_eq!(crate::audit::witness::MAX_ADD_CHECKPOINT_BYTES, 133_940);
    assert_eq!(loaded().limits.max_body_bytes_in_flight, 64 << 20);
    // Anyone may connect: one address holds at most 32 connections unless
    // the file says otherwise (lavd's API, whose callers hold certificates,
    // has no bound of its own by default).
    assert_eq!(loaded().limits.max_connections_per_ip, 32);
    let text = std::fs::read_to_string(&path).unwrap();
    let with_limits = |limits: &str| {
        std::fs::write(
            &path,
            text.replace("[tls]\n", &format!("[limits]\n{limits}[tls]\n")),
        )
        .unwrap();
    };
    let below = |s: &WitnessSettings| {
        s.warnings
            .iter()
            .filter(|w| w.contains("limits.max_body_bytes is 65536, below the 133940 bytes"))
            .count()
    };
    assert_eq!(below(&loaded()), 0);
    // Nor above it: no add-checkpoint body is larger, so the bound is
    // that, with a warning (a larger body is then refused 413 unread,
    // not read whole and refused 400 by the parser).
    with_limits("max_body_bytes = 2097152\n");
    assert_eq!(
        loaded().limits.max_body_bytes,
        crate::audit::witness::MAX_ADD_CHECKPOINT_BYTES
    );
    let above = loaded()
        .warnings
        .iter()
        .filter(|w| w.contains("limits.max_body_bytes is 2097152, above the 133940 bytes"))
        .count();
    assert_eq!(above, 1);
    // Checked first as lavd's bound is: beyond its range, refused.
    with_limits("max_body_bytes = 100000000000\n");
    let refused = WitnessSettings::load(&path, &MapEnv(HashMap::new())).unwrap_err();
    assert_eq!(refused.field, "limits.max_body_bytes", "{refused}");
    with_limits("max_connections_per_ip = 100\n");
    assert_eq!(loaded().limits.max_connections_per_ip, 100);
    // A bound below the largest conformant body is a warning.
    with_limits("max_body_bytes = 65536\n");
    assert_eq!(below(&loaded()), 1);
    // The checks see the witness's own default: a budget of 256 KiB is
    // at least its 133,940 bytes (it is below lavd's 1 MiB).
    with_limits("max_body_bytes_in_flight = 262144\n");
    assert_eq!(
        loaded().limits.max_body_bytes,
        crate::audit::witness::MAX_ADD_CHECKPOINT_BYTES
    );
    // A budget below it, which loaded when the default was 64 KiB, still
    // loads: the body bound is the budget then, with the warning.
    assert_eq!(loaded().limits.max_body_bytes_in_flight, 256 << 10);
    with_limits("max_body_bytes_in_flight = 65536\n");
    assert_eq!(loaded().limits.max_body_bytes, 65536);
    assert_eq!(below(&loaded()), 1);
    // One below the old default did not load then, nor now.
    with_limits("max_body_bytes_in_flight = 4096\n");
    let refused = WitnessSettings::load(&path, &MapEnv(HashMap::new())).unwrap_err();
    assert_eq!(
        refused.field, "limits.max_body_bytes_in_flight",
        "{refused}"
    );
}

/// A witness reads `refused_pin_record` as lavd does (its commands that log
/// in mind it), and refuses it without `pin_file` the same way.
#[test]
fn a_witness_reads_a_refused_pin_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("witness.toml");
    let log = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let vkey =
        crate::audit::note::verifier_key("log.test/a", log.verifying_key().as_bytes()).unwrap();
    std::fs::write(dir.path().join("pin"), "1234\n").unwrap();
    let write = |pin: &str, hsm_extra: &str| {
        std::fs::write(
            &path,
            format!(
                "name = \"witness.test/w\"\nstate = \"w.db\"\n\
                 [hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"w\"\n\
                 {pin}\n{hsm_extra}\
                 [tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n\
                 [[logs]]\norigin = \"log.test/a\"\nvkey = {vkey:?}\n"
            ),
        )
        .unwrap();
    };
    let record = |settings: WitnessSettings| match settings.key {
        WitnessKeySource::Hsm {
            refused_pin_record, ..
        } => refused_pin_record,
        WitnessKeySource::DevFile(_) => panic!("an HSM key"),
    };
    let env = MapEnv(HashMap::from([(
        "LAVD_PIN".to_string(),
        "1234".to_string(),
    )]));
    write("pin_file = \"pin\"", "");
    assert!(record(WitnessSettings::load(&path, &env).unwrap()).is_none());
    write(
        "pin_file = \"pin\"",
        "refused_pin_record = \"pin-refused\"\n",
    );
    let kept = record(WitnessSettings::load(&path, &env).unwrap()).expect("the record");
    assert!(kept.record.ends_with("pin-refused") && kept.record.is_absolute());
    write(
        "pin_env = \"LAVD_PIN\"",
        "refused_pin_record = \"pin-refused\"\n",
    );
    let e = WitnessSettings::load(&path, &env).unwrap_err();
    assert_eq!(e.field, "hsm.refused_pin_record");
    assert!(e.reason.contains("needs pin_file"), "{}", e.reason);
}

/// The PIN is read, and never shown by `Debug` (settings are logged and
/// printed in errors).
#[test]
fn the_pin_never_shows_in_debug() {
    let pin = "pin-7g3k-unique";
    let text = GOOD.replace("pin_file = \"pin\"", "pin_env = \"LAVD_PIN\"");
    let settings = load(&text, &[("LAVD_PIN", pin)]).unwrap();
    let shown = format!("{settings:?} {settings:#?}");
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(!shown.contains(pin), "{shown}");
}

/// A value of the wrong type or out of its type's range names its key's
/// dotted path, not only where it is (STYLE 7: file, field and reason).
/// Before, `[limits] line 7`. A syntax error, which is about no key,
/// still names its table and line.
#[test]
fn a_value_of_the_wrong_type_names_its_field() {
    for (extra, field) in [
        ("[limits]\nmax_batch = -1\n", "limits.max_batch"),
        ("[limits]\nmax_batch = \"4\"\n", "limits.max_batch"),
    ] {
        let e = load(&format!("{GOOD}{extra}"), &[]).unwrap_err();
        assert_eq!(e.field, field, "{extra}: {}", e.reason);
        assert!(!e.reason.is_empty());
    }
    let sessions = GOOD.replace("pin_file = \"pin\"", "pin_file = \"pin\"\nsessions = \"4\"");
    let e = load(&sessions, &[]).unwrap_err();
    assert_eq!(e.field, "hsm.sessions", "{}", e.reason);
    let e = load(&format!("{GOOD}[limits]\nmax_batch = = 1\n"), &[]).unwrap_err();
    assert!(e.field.starts_with("[limits] line "), "{}", e.field);
}

/// A secret wrongly written into the file (a PIN, a password, a URL with
/// one), refused at load, is not shown by the raw config's `Debug` either.
#[test]
fn secrets_written_into_the_file_never_show_in_the_raw_configs_debug() {
    let text = PG
        .replace("pin_file = \"pin\"", "pin = \"pin-7g3k-unique\"")
        .replace("lavd@db.example", "lavd:pw-9x2q-unique@db.example")
        .replace(
            "password_file = \"dbpass\"",
            "password = \"pw-4m8t-unique\"",
        );
    let raw = super::RawConfig::parse(&text).unwrap();
    let shown = format!("{raw:?} {raw:#?}");
    assert!(shown.contains("<not shown>"), "{shown}");
    for secret in ["pin-7g3k-unique", "pw-9x2q-unique", "pw-4m8t-unique"] {
        assert!(!shown.contains(secret), "{secret}: {shown}");
    }
}

/// Two listeners clash on the same port when their addresses are the same
/// or one is the wildcard that takes the other's (`0.0.0.0` for IPv4,
/// `[::]` for both families); port 0 never clashes, and `0.0.0.0` leaves
/// IPv6 addresses free.
#[test]
fn listeners_clash_on_one_address_or_under_a_wildcard() {
    let clash = |a: &str, b: &str| {
        let (a, b) = (a.parse().unwrap(), b.parse().unwrap());
        let one = super::same_listener(a, b);
        assert_eq!(one, super::same_listener(b, a), "{a} {b}: not symmetric");
        one
    };
    assert!(clash("127.0.0.1:8443", "127.0.0.1:8443"));
    assert!(clash("0.0.0.0:8443", "127.0.0.1:8443"));
    assert!(clash("0.0.0.0:8443", "0.0.0.0:8443"));
    assert!(clash("[::]:8443", "127.0.0.1:8443"));
    assert!(clash("[::]:8443", "[::1]:8443"));
    assert!(clash("[::]:8443", "0.0.0.0:8443"));
    assert!(clash("[::ffff:127.0.0.1]:8443", "127.0.0.1:8443"));
    assert!(clash("[::ffff:127.0.0.1]:8443", "0.0.0.0:8443"));
    assert!(!clash("[::ffff:127.0.0.1]:8443", "[::1]:8443"));
    assert!(!clash("127.0.0.1:8443", "127.0.0.1:9090"));
    assert!(!clash("127.0.0.1:8443", "127.0.0.2:8443"));
    assert!(!clash("0.0.0.0:8443", "[::1]:8443"));
    assert!(!clash("127.0.0.1:0", "127.0.0.1:0"));
    assert!(!clash("0.0.0.0:0", "127.0.0.1:0"));
}

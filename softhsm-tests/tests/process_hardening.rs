//! `lavd` makes itself non-dumpable (`PR_SET_DUMPABLE` 0) before it reads
//! anything: no core dump, and no debugger or `/proc/<pid>/mem` reader
//! running as the same user, sees the PIN, the database password, the TLS
//! key or a DEK. The kernel shows it: a non-dumpable process's `/proc/<pid>`
//! files belong to root, whatever user it runs as.
//!
//! Run as an unprivileged user (`setpriv`, util-linux), held where it reads
//! its `--key` from a FIFO that nobody writes.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

#[test]
fn lavd_runs_non_dumpable() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs lavd as user nobody through setpriv, which needs root: run it as root \
         (as CI does)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fifo = dir.path().join("key");
    let made = std::process::Command::new("mkfifo")
        .args(["-m", "0666"])
        .arg(&fifo)
        .status()
        .expect("mkfifo (coreutils)");
    assert!(made.success());
    let mut child = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .arg(softhsm_tests::lavd_binary())
        .args(["audit", "verify", "--export", "/nonexistent", "--key"])
        .arg(&fifo)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    let proc_dir = format!("/proc/{}", child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = std::collections::BTreeSet::new();
    let owner = loop {
        // Once `setpriv` has become lavd as nobody, the owner of its
        // `mem` is nobody while it is dumpable and root once it is not.
        let running_lavd = std::fs::read_link(format!("{proc_dir}/exe"))
            .is_ok_and(|exe| exe == softhsm_tests::lavd_binary());
        let owner = std::fs::metadata(format!("{proc_dir}/mem")).map(|m| m.uid());
        if running_lavd {
            if let Ok(uid) = owner {
                seen.insert(uid);
                if uid == 0 {
                    break uid;
                }
            }
        }
        if Instant::now() > deadline {
            break owner.unwrap_or(u32::MAX);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let status = std::fs::read_to_string(format!("{proc_dir}/status")).unwrap_or_default();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&NOBODY.to_string())),
        "not running as nobody: {status}"
    );
    assert_eq!(
        owner,
        0,
        "lavd is dumpable (owners seen: {seen:?}); stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The SQLite store is created readable by its owner only, whatever the
/// umask: under a container's usual 022, SQLite alone made it 0644 (and its
/// `-wal` and `-shm` files take the main file's mode), so any local user
/// could read the budgets, revocations and log.
#[test]
fn the_store_is_created_for_its_owner_only_whatever_the_umask() {
    let t = softhsm_tests::TestToken::new();
    let _pki = softhsm_tests::server::Pki::new(&t);
    t.write_config(&softhsm_tests::server::serve_config(""));
    let db = t.path("lavd.db");
    assert!(!db.exists());
    let out = std::process::Command::new("sh")
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(softhsm_tests::lavd_binary())
        .args(["store", "migrate", "--new", "--config"])
        .arg(t.config())
        .env("SOFTHSM2_CONF", softhsm_tests::harness().conf())
        .output()
        .expect("sh");
    softhsm_tests::assert_ok(&out);
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

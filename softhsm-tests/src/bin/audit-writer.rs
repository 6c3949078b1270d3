//! A test helper process for the crash test (`tests/audit_kill.rs`): appends
//! audit batches from several threads through lavd's real audit log (SQLite
//! group commit, checkpoints signed in SoftHSM) and prints one line per batch
//! that `append` reported durable: `durable <first_index> <count>`. The test
//! kills it with SIGKILL at a random moment.
//!
//! Usage: `audit-writer CONFIG THREADS`

use std::io::Write as _;
use std::sync::Arc;

use lavd::audit::leaf::KeyGenerated;
use lavd::audit::log::AuditLog;
use lavd::config::{ProcessEnv, Settings};
use lavd::hsm::Hsm;
use lavd::store::{AuditAppend, Spend, Store};
use time::OffsetDateTime;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config = std::path::Path::new(&args[1]);
    let threads: usize = args[2].parse().expect("THREADS");
    let settings = Settings::load(config, &ProcessEnv).expect("config");
    let store = Arc::new(Store::open_settings(&settings.store).expect("store"));
    let hsm = Hsm::open(settings.hsm).expect("hsm");
    let log = AuditLog::new(
        store,
        hsm,
        &settings.audit.key_label,
        &settings.audit.origin,
    )
    .expect("audit log");
    let stdout = std::sync::Mutex::new(std::io::stdout());
    let t0 = lavd::codec::parse_time("2026-12-01T00:00:00Z").expect("time");
    std::thread::scope(|s| {
        for t in 0..threads {
            let (log, stdout) = (&log, &stdout);
            s.spawn(move || {
                for i in 0u64.. {
                    let events = (0..1 + (i % 3))
                        .map(|j| {
                            KeyGenerated::new(
                                &format!("t{t}-{i}-{j}"),
                                t0,
                                t0 + time::Duration::days(31),
                                t0 + time::Duration::days(400),
                                None,
                            )
                            .expect("event")
                            .into()
                        })
                        .collect();
                    let receipt = log
                        .append(AuditAppend {
                            events,
                            time: OffsetDateTime::now_utc(),
                            spend: Spend::None,
                        })
                        .expect("append");
                    let mut out = stdout.lock().expect("stdout");
                    writeln!(
                        out,
                        "durable {} {}",
                        receipt.appended.first_index, receipt.appended.count
                    )
                    .and_then(|()| out.flush())
                    .expect("stdout");
                }
            });
        }
    });
}

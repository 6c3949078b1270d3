//! `lavd keys …`: escrow and audit key lifecycle against the configured HSM.

use super::outln;
use anyhow::Context as _;
use time::OffsetDateTime;

use super::ConfigArg;
use crate::codec::{format_time, parse_time};
use crate::hsm::Hsm;
use crate::keys::{self, DestroyReason, Validity};
use crate::store::{KeyStore as _, Store};

/// Key lifecycle subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Generate a P-256 escrow key pair inside the HSM (derive-only,
    /// sensitive, non-extractable) and record its validity and retention.
    Generate {
        #[command(flatten)]
        config: ConfigArg,
        /// The epoch name, e.g. 2026-12.
        #[arg(long)]
        kid: String,
        /// Providers may seal to it from this time (RFC 3339 UTC).
        #[arg(long, value_parser = time_arg)]
        not_before: OffsetDateTime,
        /// Providers stop sealing to it at this time (RFC 3339 UTC).
        #[arg(long, value_parser = time_arg)]
        not_after: OffsetDateTime,
        /// End of retention: after it the private key is destroyed (RFC 3339 UTC).
        #[arg(long, value_parser = time_arg)]
        destroy_after: OffsetDateTime,
    },
    /// Print the JWK Set of usable escrow public keys (PROTOCOL §2), each
    /// checked against the HSM's copy.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// List every key with its state (active, retained, due for
        /// destruction, destroyed) instead, one per line.
        #[arg(long)]
        all: bool,
    },
    /// Destroy an escrow key's private half in the HSM. Refused before its
    /// retention ends unless --force and --reason are given.
    Destroy {
        #[command(flatten)]
        config: ConfigArg,
        /// The key to destroy.
        #[arg(long, required_unless_present = "expired", conflicts_with = "expired")]
        kid: Option<String>,
        /// Destroy every key whose retention has ended (for a daily timer).
        #[arg(long, conflicts_with_all = ["force", "reason"])]
        expired: bool,
        /// Destroy before the end of retention.
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why (kept with the key's record; the audit log records that the
        /// destruction was forced).
        #[arg(long, requires = "force")]
        reason: Option<String>,
    },
    /// Remove from the HSM the key pair a generation that stopped before its
    /// commit left under a kid the store does not record (what `keys
    /// generate` refuses as orphan_key_pair). Refused for a recorded kid.
    /// Never after restoring the store from a backup: a key generated since
    /// that backup is unrecorded too, but was published.
    DiscardOrphan {
        #[command(flatten)]
        config: ConfigArg,
        /// The kid whose unrecorded pair to remove.
        #[arg(long)]
        kid: String,
    },
    /// Generate the Ed25519 audit signing key inside the HSM (sign-only,
    /// non-extractable) and print its public key.
    GenerateAudit {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Text read from the store, as printed: a row edited to hold escapes or
/// line breaks cannot forge the listing.
fn shown(text: &str) -> String {
    crate::codec::escape_for_terminal(text)
}

fn report(destroyed: &keys::Destroyed) {
    let record = &destroyed.record;
    let reason = shown(record.destroy_reason.as_deref().unwrap_or(""));
    if destroyed.already {
        // Not this run's: its `--reason`, if any, is not recorded.
        let at = record
            .destroyed_at
            .map(crate::codec::format_time)
            .unwrap_or_default();
        eprintln!(
            "escrow key {} was already destroyed at {at} ({reason}); nothing of it is left on \
             the token, and this run recorded nothing",
            shown(&record.kid)
        );
    } else {
        eprintln!(
            "escrow key {} destroyed ({reason}); envelopes sealed to it can no longer be opened",
            shown(&record.kid)
        );
    }
}

fn time_arg(s: &str) -> Result<OffsetDateTime, String> {
    parse_time(s).map_err(|e| e.to_string())
}

impl KeysCommand {
    /// Runs the subcommand.
    ///
    /// # Errors
    /// A config, HSM, store or lifecycle error.
    pub fn run(self) -> anyhow::Result<()> {
        let now = OffsetDateTime::now_utc();
        match self {
            KeysCommand::Generate {
                config,
                kid,
                not_before,
                not_after,
                destroy_after,
            } => {
                let settings = config.load()?;
                keys::check_kid(&kid)?;
                // Looked at before anything could make it: a generation
                // makes its store only beside a token without escrow keys.
                let absent = crate::store::probe_log_begun(&settings.store)?.err();
                let hsm = super::open_hsm_minding(settings.refused_pin_record.as_ref(), || {
                    Hsm::open(settings.hsm)
                })?;
                if let Some(why) = absent {
                    super::refuse_new_store_beside_keys(&hsm, &why)?;
                }
                let store = Store::open_settings(&settings.store)?;
                let validity = Validity {
                    not_before,
                    not_after,
                    destroy_after,
                };
                let record = keys::generate(&hsm, &store, &kid, validity, now)?;
                // With its PROTOCOL §2 members also when it is not
                // published now (its window not begun or already over).
                outln!("{}", serde_json::to_string_pretty(&keys::to_jwk(&record))?);
            }
            KeysCommand::DiscardOrphan { config, kid } => {
                let settings = config.load()?;
                keys::check_kid(&kid)?;
                // Not created here: a wrong path would be an empty store
                // in which every kid looks unrecorded.
                crate::store::probe_existing(&settings.store)?
                    .map_err(keys::KeyError::StoreUnproven)?;
                let store = std::sync::Arc::new(Store::open_settings(&settings.store)?);
                let hsm = super::open_hsm_minding(settings.refused_pin_record.as_ref(), || {
                    Hsm::open(settings.hsm)
                })?;
                // What shows the store to be this token's (in
                // `keys::discard_orphan`): its newest checkpoint under the
                // token's audit key.
                let log = crate::audit::log::AuditLog::new(
                    store.clone(),
                    hsm.clone(),
                    &settings.audit.key_label,
                    &settings.audit.origin,
                )?;
                let label = format!("{}{kid}", crate::hsm::ESCROW_LABEL_PREFIX);
                // For the record: the key that is removed, when whole.
                // Unchecked: a pair whose halves disagree is one to record.
                let public = hsm.escrow_public_key_unchecked(&kid).ok();
                if keys::discard_orphan(&hsm, store.as_ref(), &log, &kid)? {
                    let jwk = public
                        .map(|p| serde_json::to_string(&p.to_jwk()))
                        .transpose()?
                        .unwrap_or_else(|| "(its public half could not be read)".into());
                    tracing::warn!(%label, public = %jwk, "removed an escrow key pair the store does not record");
                    eprintln!(
                        "removed the key pair under {} that the store does not record; its \
                         public key: {jwk}",
                        shown(&label)
                    );
                } else {
                    eprintln!(
                        "the token held no private key under {} (any public half of ours under \
                         it is removed)",
                        shown(&label)
                    );
                }
            }
            KeysCommand::List { config, all } => {
                let settings = config.load()?;
                let store = super::open_existing_store(&settings.store)?;
                if all {
                    let mut unreadable = Vec::new();
                    for (kid, k) in store.list_keys_each()? {
                        let k = match k {
                            Ok(k) => k,
                            Err(e) => {
                                unreadable.push(report_unreadable(&kid, e));
                                continue;
                            }
                        };
                        let state = match (&k.destroyed_at, &k.destroy_reason) {
                            (Some(at), reason) => format!(
                                "destroyed {} ({})",
                                format_time(*at),
                                shown(reason.as_deref().unwrap_or(""))
                            ),
                            (None, _) if now > k.destroy_after => "due for destruction".into(),
                            (None, _) if now >= k.not_after => {
                                "retained (no longer sealed to)".into()
                            }
                            (None, _) if now < k.not_before => "not yet valid".into(),
                            (None, _) => "active".into(),
                        };
                        outln!(
                            "{}\tnot_before={}\tnot_after={}\tdestroy_after={}\t{state}",
                            shown(&k.kid),
                            format_time(k.not_before),
                            format_time(k.not_after),
                            format_time(k.destroy_after)
                        );
                    }
                    if !unreadable.is_empty() {
                        return Err(keys::KeyError::ListIncomplete(unreadable.join(", ")).into());
                    }
                } else {
                    let hsm =
                        super::open_hsm_minding(settings.refused_pin_record.as_ref(), || {
                            Hsm::open(settings.hsm)
                        })?;
                    let set = keys::jwks_checked(&hsm, &store, now)?;
                    outln!("{}", serde_json::to_string_pretty(&set)?);
                }
            }
            KeysCommand::Destroy {
                config,
                kid,
                expired,
                force,
                reason,
            } => {
                let settings = config.load()?;
                // A kid no generation could have made is named as such,
                // not looked up and reported unknown.
                kid.as_deref().map(keys::check_kid).transpose()?;
                let store = std::sync::Arc::new(super::open_existing_store(&settings.store)?);
                let hsm = super::open_hsm_minding(settings.refused_pin_record.as_ref(), || {
                    Hsm::open(settings.hsm)
                })?;
                // Only to prove an earlier destruction's leaf: see
                // `keys::finish_recorded_destruction`.
                let open_log = || {
                    crate::audit::log::AuditLog::new(
                        store.clone(),
                        hsm.clone(),
                        &settings.audit.key_label,
                        &settings.audit.origin,
                    )
                };
                let store = store.as_ref();
                if let Some(kid) = kid {
                    let reason = if force {
                        DestroyReason::Forced(reason.unwrap_or_default())
                    } else {
                        DestroyReason::Retention
                    };
                    let destroyed = keys::destroy(&hsm, store, &open_log, &kid, reason, now)?;
                    report(&destroyed);
                    if destroyed.missing_before {
                        return Err(keys::KeyError::MissingBeforeDestruction(shown(&kid)).into());
                    }
                } else if expired {
                    // The daily job: destroy every key past retention, and
                    // finish any destruction a crash interrupted. One failing
                    // key does not stop the others.
                    let mut failed = Vec::new();
                    let mut refused: Option<keys::KeyError> = None;
                    // Destroyed, but the token had lost them before.
                    let mut lost = Vec::new();
                    let due = keys::due_for_destruction(store, now)?;
                    // A row that cannot be read: whether it is due is not
                    // known, so it is reported and the job fails, after the
                    // others are done.
                    for (kid, e) in due.unreadable {
                        failed.push(report_unreadable(&kid, e));
                    }
                    // Said, and counted once; a refused PIN is kept to end
                    // with.
                    let fail = |failed: &mut Vec<String>,
                                refused: &mut Option<keys::KeyError>,
                                kid: &str,
                                e: keys::KeyError| {
                        eprintln!("lavd: {}: escrow key {}: {e}", e.code(), shown(kid));
                        if !failed.contains(&shown(kid)) {
                            failed.push(shown(kid));
                        }
                        if e.code() == "hsm_login_refused" {
                            refused.get_or_insert(e);
                        }
                    };
                    for k in due.keys {
                        match keys::destroy(
                            &hsm,
                            store,
                            &open_log,
                            &k.kid,
                            DestroyReason::Retention,
                            now,
                        ) {
                            Ok(destroyed) => {
                                report(&destroyed);
                                if destroyed.missing_before {
                                    let e = keys::KeyError::MissingBeforeDestruction(shown(&k.kid));
                                    eprintln!("lavd: {}: {e}", e.code());
                                    lost.push(shown(&k.kid));
                                }
                            }
                            Err(e) => fail(&mut failed, &mut refused, &k.kid, e),
                        }
                    }
                    // Unreadable rows were reported above.
                    for k in store
                        .list_keys_each()?
                        .into_iter()
                        .filter_map(|(_, k)| k.ok())
                    {
                        if k.destroyed_at.is_none() {
                            continue;
                        }
                        // Destroy first (it is idempotent, and takes every
                        // key object under the label, so two pairs there do
                        // not stop it), then look on a fresh session.
                        match keys::finish_recorded_destruction(&hsm, &open_log, &k.kid) {
                            Ok(true) => {
                                eprintln!(
                                    "escrow key {}: finished an interrupted destruction",
                                    shown(&k.kid)
                                );
                                // Including one this run's first pass
                                // left unfinished: it is done now.
                                failed.retain(|f| *f != shown(&k.kid));
                            }
                            Ok(false) => {}
                            Err(e) => fail(&mut failed, &mut refused, &k.kid, e),
                        }
                    }
                    // A refused PIN is said as such (exit 77, not 1): the
                    // daily job's unit must not retry it.
                    if let Some(e) = refused {
                        return Err(anyhow::Error::from(e)
                            .context(format!("destruction incomplete ({})", failed.join(", "))));
                    }
                    if !failed.is_empty() {
                        return Err(keys::KeyError::DestroyIncomplete(failed.join(", ")).into());
                    }
                    if !lost.is_empty() {
                        return Err(keys::KeyError::LostBeforeDestruction(lost.join(", ")).into());
                    }
                }
            }
            KeysCommand::GenerateAudit { config } => {
                let settings = config.load()?;
                let hsm = super::open_hsm_minding(settings.refused_pin_record.as_ref(), || {
                    Hsm::open(settings.hsm)
                })?;
                let info = hsm
                    .generate_audit_key(&settings.audit.key_label)
                    .context("generating the audit key")?;
                outln!("{}", serde_json::to_string_pretty(&info.public.to_jwk())?);
            }
        }
        Ok(())
    }
}

/// Prints that escrow key `kid`'s store row cannot be read, with its code,
/// and returns the kid as printed (escaped).
fn report_unreadable(kid: &str, e: crate::store::StoreError) -> String {
    let kid = crate::codec::escape_for_terminal(kid);
    let e = keys::KeyError::from(e);
    eprintln!(
        "lavd: {}: escrow key {kid}: its store row cannot be read ({e})",
        e.code()
    );
    kid
}

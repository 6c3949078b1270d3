//! The `/v1` handlers beyond `/v1/keys`: unwrap, revocation and the audit
//! endpoints (PROTOCOL §5, §4, §6). Each does its blocking work (HSM,
//! SQLite) on the blocking pool through [`blocking`] (a revocation on a
//! thread of its own, [`off_the_pool`]), and turns the domain
//! errors into [`ApiError`]s here, so that statuses are decided in
//! [`super::error`] and nowhere else.

use std::sync::Arc;

use time::OffsetDateTime;
use warp::http::StatusCode;
use warp::hyper::body::Bytes;
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::error::ApiError;
use super::identity::{PeerIdentity, Role};
use super::pipeline::Readmission;
use super::routes::{blocking, off_the_pool, roles_allow, IndexQuery, RequestContext, ANY_ROLE};
use super::state::{Reloadable, ServerState};
use crate::audit::log::LogError;
use crate::codec::b64_encode;
use crate::store::StoreError;
use crate::unwrap::{self, RevocationRequest, UnwrapError};
use crate::warrant::{ErrorClass, WarrantError};

/// At most this many leaves per `GET /v1/audit/entries` page.
pub const MAX_ENTRIES_PAGE: u64 = 1000;

fn json(value: &impl serde::Serialize) -> Response {
    let mut response = warp::reply::json(value).into_response();
    response.headers_mut().insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("no-store"),
    );
    response
}

fn warrant_error(e: &WarrantError) -> ApiError {
    let status = match e.class() {
        ErrorClass::Malformed => StatusCode::BAD_REQUEST,
        ErrorClass::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorClass::Forbidden => StatusCode::FORBIDDEN,
        ErrorClass::Unavailable => {
            tracing::error!(error = %e, "warrant check could not reach the store");
            return ApiError::StoreUnavailable;
        }
    };
    ApiError::Refused {
        code: e.code(),
        status,
        message: e.to_string(),
    }
}

fn unwrap_error(e: UnwrapError) -> ApiError {
    match e {
        UnwrapError::Malformed(m) => ApiError::Malformed(m),
        UnwrapError::BatchSize { max, got } => ApiError::BatchTooLarge {
            count: got,
            limit: max,
        },
        UnwrapError::Warrant(w) => warrant_error(&w),
        UnwrapError::HsmUnavailable(detail) => {
            // The detail (CKR codes) is for operators only.
            tracing::error!(error = %detail, "unwrap failed in the HSM; nothing was released");
            ApiError::HsmUnavailable
        }
        UnwrapError::Internal(detail) => {
            tracing::error!(error = %detail, "unwrap failed (a bug); nothing was released");
            ApiError::Internal
        }
        UnwrapError::StoreUnavailable(detail) => {
            // The detail (SQLite or PostgreSQL errors) is for operators only.
            tracing::error!(error = %detail, "unwrap failed in the store; nothing was released");
            ApiError::StoreUnavailable
        }
        // The handler answers with the admission's own error first; this
        // is only reached if that was lost.
        UnwrapError::Withdrawn { .. } => ApiError::Internal,
        UnwrapError::LogInconsistent(detail) => {
            tracing::error!(error = %detail, "unwrap failed; nothing was released");
            log_inconsistent()
        }
        UnwrapError::SpentNotReleased(detail) => {
            tracing::error!(error = %detail, "unwrap logged (or perhaps logged) and its budget spent, but nothing was released");
            ApiError::Refused {
                code: "spent_not_released",
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the request's audit leaves and budget spend committed, or may have, \
                          but no key was released: a retry spends the budget again; read the \
                          audit log (or ask the operator) before retrying"
                    .into(),
            }
        }
        UnwrapError::WitnessUnavailable(wait) => {
            tracing::error!(error = %wait, "unwrap logged but not released: no witness quorum in time");
            ApiError::WitnessUnavailable {
                timeout_secs: wait.timeout().as_secs(),
            }
        }
    }
}

/// A failed revocation's answer: what was wrong with the request as for an
/// unwrap (400, 403, 413); a failure of the daemon's own (HSM, store, a
/// bug) as 503 `log_inconsistent` while the log is inconsistent, else as
/// for an unwrap, with lines that speak of a revocation.
fn revocation_error(e: UnwrapError, log_inconsistent_now: bool) -> ApiError {
    let ours = matches!(
        e,
        UnwrapError::HsmUnavailable(_)
            | UnwrapError::Internal(_)
            | UnwrapError::StoreUnavailable(_)
            | UnwrapError::LogInconsistent(_)
    ) || matches!(&e, UnwrapError::Warrant(w) if w.class() == ErrorClass::Unavailable);
    if !ours {
        return unwrap_error(e);
    }
    if log_inconsistent_now {
        tracing::error!(error = %e, "revocation failed while the audit log is inconsistent");
        return log_inconsistent();
    }
    // Whether it committed is not always known here (a lost COMMIT): a
    // retry shows it, since revocation is final and the first record stands.
    match e {
        UnwrapError::HsmUnavailable(detail) => {
            tracing::error!(error = %detail, "revocation failed in the HSM; retry it");
            ApiError::HsmUnavailable
        }
        UnwrapError::StoreUnavailable(detail) => {
            tracing::error!(error = %detail, "revocation failed in the store; retry it");
            ApiError::StoreUnavailable
        }
        UnwrapError::Warrant(w) => warrant_error(&w),
        UnwrapError::Internal(detail) => {
            tracing::error!(error = %detail, "revocation failed (a bug); retry it");
            ApiError::Internal
        }
        other => unwrap_error(other),
    }
}

/// 503 `log_inconsistent`: the audit log found its stored tree does not
/// extend its last signed checkpoint ([`crate::audit::log::AuditLog::inconsistency`]).
/// Unwraps are refused before anything is opened; the reason is in the log.
fn log_inconsistent() -> ApiError {
    ApiError::Refused {
        code: "log_inconsistent",
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the audit log does not extend its last signed checkpoint; nothing is released \
                  until an operator has investigated"
            .into(),
    }
}

/// `POST /v1/unwrap` (agency).
pub(crate) async fn post_unwrap(
    peer: PeerIdentity,
    live: Arc<Reloadable>,
    readmission: Readmission,
    body: Bytes,
    ctx: Arc<RequestContext>,
    state: Arc<ServerState>,
) -> Result<Response, Rejection> {
    if state.audit.inconsistency().is_some() {
        return Err(log_inconsistent().into());
    }
    // `Bytes` clones share the buffer.
    let claimed_from = body.clone();
    let max_warrant_bytes = live.verifier.limits().max_warrant_bytes;
    let st = state.clone();
    let caller = peer.uri().to_string();
    // Why the caller was not admitted again (at its gate turn, or before
    // its audit commit).
    let withdrawn: Arc<std::sync::Mutex<Option<ApiError>>> = Arc::default();
    let refusal = withdrawn.clone();
    let result = blocking(move || {
        let limits = st.limits.envelope();
        // A reload while the request waited at the envelope gate: the
        // caller is admitted again under the configuration in force when
        // its work starts, and that one's trust judges the warrant; and
        // once more before the audit commit, for a reload while the HSM
        // opened.
        let readmit_again = || readmitted(&readmission, &live, &[Role::Agency], &refusal);
        // At the gate, a request whose connection was cut while the daemon
        // stops is dropped too: nothing was opened yet. Not later: a
        // request that opened has its leaves written all the same.
        let readmit = || {
            if st.requests_cut() {
                return Err(unwrap::UnwrapError::StoreUnavailable(
                    "the daemon is stopping and this request's connection was cut before its \
                     turn: nothing was opened"
                        .into(),
                ));
            }
            readmit_again()
        };
        let context = unwrap::Context {
            hsm: &st.hsm,
            store: &st.store,
            log: &st.audit,
            verifier: &live.verifier,
            readmit: Some(unwrap::Readmit(&readmit)),
            recheck: Some(unwrap::Recheck {
                readmit: unwrap::Readmit(&readmit_again),
                fence: st.reload_fence(),
            }),
            envelope_limits: &limits,
            max_batch: st.limits.max_batch,
            gate: &st.envelope_gate,
            witnessing: st.witnessing.as_deref(),
        };
        let mut unreleased = 0;
        let result = unwrap::unwrap_counting(
            &context,
            &caller,
            &body,
            &OffsetDateTime::now_utc,
            &mut unreleased,
        );
        Ok((result, unreleased))
    })
    .await?;
    let (result, unreleased) = result;
    // Labelled with the code the request is answered with.
    let withheld = |e: ApiError| {
        state.metrics.envelopes_unreleased(e.code(), unreleased);
        e
    };
    if let Err(unwrap::UnwrapError::Withdrawn { .. }) = &result {
        // Withdrawn at the last look before the audit commit, its leaves
        // name the warrant: the request's log line does too.
        if let Some(id) = unwrap::claimed_warrant_id(&claimed_from, max_warrant_bytes) {
            ctx.record_warrant_id(&id);
        }
        let e = withdrawn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or(ApiError::Internal);
        return Err(withheld(e).into());
    }
    let done = match result {
        Ok(done) => {
            ctx.record_warrant_id(&done.warrant_id);
            // Keys destroyed between the commit and the release.
            state
                .metrics
                .envelopes_unreleased("key_destroyed", unreleased);
            done
        }
        Err(e) => {
            // The claimed id, unverified, so that refusals can be traced
            // too (parsed again only on this path).
            if let Some(id) = unwrap::claimed_warrant_id(&claimed_from, max_warrant_bytes) {
                ctx.record_warrant_id(&id);
            }
            // This request is the one that found the log inconsistent (its
            // checkpoint was refused): say so, with the stable code.
            if state.audit.inconsistency().is_some() {
                tracing::error!(error = %e, "unwrap failed; nothing was released");
                return Err(withheld(log_inconsistent()).into());
            }
            return Err(withheld(unwrap_error(e)).into());
        }
    };
    state.metrics.unwrap_phases(&done.phases.each());
    for _ in 0..done.opened {
        state.metrics.envelope("ok");
    }
    for (reason, n) in &done.denied {
        for _ in 0..*n {
            state.metrics.envelope(reason);
        }
    }
    let mut response = Response::new(done.reply.into());
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

/// The caller admitted again under the configuration in force
/// ([`Readmission::current`]), as [`unwrap::Readmit`] asks: the newer
/// configuration's verifier, if there is one. A refusal is kept in
/// `refusal` (the answer the request gets) and reported as
/// [`UnwrapError::Withdrawn`].
fn readmitted(
    readmission: &Readmission,
    admitted: &Arc<Reloadable>,
    roles: &'static [Role],
    refusal: &std::sync::Mutex<Option<ApiError>>,
) -> Result<Option<Arc<crate::warrant::Verifier>>, UnwrapError> {
    readmission
        .current(admitted, roles)
        .map(|newer| newer.map(|r| r.verifier.clone()))
        .map_err(|e| {
            let (code, why) = (e.code(), e.to_string());
            *refusal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
            UnwrapError::Withdrawn { code, why }
        })
}

/// `POST /v1/warrants/revocations`: an admin's `{"id","reason"}`, or an
/// authority's `{"revocation": <JWS>}` delivered by any authenticated
/// caller (PROTOCOL §4, §6).
pub(crate) async fn post_revocation(
    peer: PeerIdentity,
    live: Arc<Reloadable>,
    readmission: Readmission,
    body: Bytes,
    state: Arc<ServerState>,
) -> Result<Response, Rejection> {
    // Which form, read without building the body: this runs before the
    // role check, for any caller. A body that is not JSON at all (a syntax
    // error, trailing data) is read as an authority's, the one form any
    // caller may send: its strict parse names what is wrong (400), where
    // the admin role's absence (403) would not.
    let by_authority = crate::codec::json_member(&body, "revocation").is_some()
        || (!peer.has(Role::Admin)
            && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err());
    // The roles each form needs, here and when the caller is admitted
    // again as its work starts.
    let roles: &'static [Role] = if by_authority {
        ANY_ROLE
    } else {
        &[Role::Admin]
    };
    if !roles_allow(roles, peer.roles()) {
        return Err(ApiError::forbidden(peer.uri(), roles).into());
    }
    let st = state.clone();
    let caller = peer.uri().to_string();
    // Why the caller was not admitted again as the work started.
    let withdrawn: Arc<std::sync::Mutex<Option<ApiError>>> = Arc::default();
    let refusal = withdrawn.clone();
    // Not on the blocking pool, where unwraps waiting at the envelope gate
    // could hold every thread: a revocation does not wait for them (only,
    // once parsed, for a reload of the trust under way: `unwrap::revoke`).
    let result = off_the_pool(move || {
        // A reload may have applied while it waited for a thread: the
        // caller is admitted again under the configuration in force, and
        // that one's trust verifies an authority's signature
        // (`unwrap::revoke`, under the reload's fence).
        let readmit = || readmitted(&readmission, &live, roles, &refusal);
        let limits = st.limits.envelope();
        let context = unwrap::Context {
            hsm: &st.hsm,
            store: &st.store,
            log: &st.audit,
            verifier: &live.verifier,
            readmit: None,
            recheck: Some(unwrap::Recheck {
                readmit: unwrap::Readmit(&readmit),
                fence: st.reload_fence(),
            }),
            envelope_limits: &limits,
            max_batch: st.limits.max_batch,
            gate: &st.envelope_gate,
            witnessing: st.witnessing.as_deref(),
        };
        let request = if by_authority {
            RevocationRequest::Authority {
                caller: &caller,
                body: &body,
            }
        } else {
            RevocationRequest::Admin {
                caller: &caller,
                body: &body,
            }
        };
        Ok(unwrap::revoke(&context, request, &OffsetDateTime::now_utc))
    })
    .await?;
    if let Err(UnwrapError::Withdrawn { .. }) = &result {
        let e = withdrawn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or(ApiError::Internal);
        return Err(e.into());
    }
    let revoked = result.map_err(|e| revocation_error(e, state.audit.inconsistency().is_some()))?;
    // Committed, so in force: said so even when no checkpoint could be
    // signed over its leaf (`checkpoint: null`; the next one covers it).
    let checkpoint = match &revoked.checkpoint {
        Ok(note) => Some(note.as_str()),
        Err(e) => {
            tracing::error!(error = %e, id = %revoked.id, "the revocation is committed and in force, but no checkpoint could be signed over its leaf");
            None
        }
    };
    Ok(json(&serde_json::json!({
        "id": revoked.id,
        "revoked": true,
        "already_revoked": !revoked.newly_revoked,
        "warrant_seen": revoked.warrant_seen,
        "audit": {
            "checkpoint": checkpoint,
            "first_index": revoked.appended.first_index,
            "count": revoked.appended.count,
        },
    })))
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::BadProofRequest(m) => ApiError::Refused {
            code: "bad_proof_request",
            status: StatusCode::BAD_REQUEST,
            message: m,
        },
        other => {
            tracing::error!(error = %other, "audit read failed");
            ApiError::StoreUnavailable
        }
    }
}

fn log_error(e: LogError) -> ApiError {
    match e {
        LogError::Store(s) => store_error(s),
        LogError::Inconsistent(_) => log_inconsistent(),
        other => {
            tracing::error!(error = %other, "checkpoint signing failed");
            ApiError::HsmUnavailable
        }
    }
}

/// `GET /v1/audit/key` (auditor).
pub async fn audit_key(
    _peer: PeerIdentity,
    state: Arc<ServerState>,
) -> Result<Response, Rejection> {
    let key = state.audit.verifier_key().map_err(log_error)?;
    Ok(json(&serde_json::json!({
        "origin": state.audit.origin(),
        "verifier_key": key,
    })))
}

/// Whether a checkpoint request may have the log sign a new checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    /// If the log grew since the last one (the auditor's routes).
    IfGrown,
    /// Never: the newest one signed is served (the public listener, whose
    /// callers no one authenticated, neither reach the HSM nor write).
    Never,
}

/// The checkpoint both checkpoint endpoints serve. With
/// [`Signing::IfGrown`] the log signs one now if it grew since the last;
/// with [`Signing::Never`] it serves the newest one signed. With
/// witnesses, what is served is the newest checkpoint their quorum
/// cosigned, with every cosignature (before any is, the newest signed one
/// with what it has), see [`crate::audit::witnessing::Witnessing::served`].
fn served_checkpoint(state: &ServerState, signing: Signing) -> Result<String, ApiError> {
    let signed = match signing {
        Signing::IfGrown => state.audit.current_checkpoint(),
        Signing::Never => state.audit.latest_signed(),
    }
    .map_err(log_error)?;
    match &state.witnessing {
        None => Ok(signed),
        Some(w) => match w.served().map_err(store_error)? {
            // Read from the store as it is: checked as `signed` was.
            Some(cosigned) => {
                state.audit.check_served(&cosigned).map_err(log_error)?;
                Ok(cosigned)
            }
            None => Ok(signed),
        },
    }
}

/// `GET /v1/audit/checkpoint` (auditor): a checkpoint of the whole log,
/// signed now if the log grew since the last one (with witnesses: the
/// newest cosigned one, see [`served_checkpoint`]).
pub async fn audit_checkpoint(
    _peer: PeerIdentity,
    state: Arc<ServerState>,
) -> Result<Response, Rejection> {
    let checkpoint = blocking(move || served_checkpoint(&state, Signing::IfGrown)).await?;
    Ok(json(&serde_json::json!({ "checkpoint": checkpoint })))
}

/// `GET /v1/audit/entries?start=&end=` (auditor): leaves `[start, end)`, at
/// most [`MAX_ENTRIES_PAGE`] of them; `end` defaults to a full page (or the
/// largest index the store holds).
pub async fn audit_entries(
    _peer: PeerIdentity,
    query: IndexQuery,
    state: Arc<ServerState>,
) -> Result<Response, Rejection> {
    let start = query.required("start")?;
    let end = query.optional("end").unwrap_or(
        start
            .saturating_add(MAX_ENTRIES_PAGE)
            .min(crate::store::MAX_INDEX),
    );
    if end < start || end - start > MAX_ENTRIES_PAGE {
        return Err(ApiError::Malformed(format!(
            "need start <= end and at most {MAX_ENTRIES_PAGE} entries per page"
        ))
        .into());
    }
    let leaves =
        blocking(move || state.audit.store().leaves(start, end).map_err(store_error)).await?;
    let entries: Vec<serde_json::Value> = leaves
        .into_iter()
        .map(|(index, leaf)| serde_json::json!({"index": index, "leaf": b64_encode(leaf)}))
        .collect();
    Ok(json(&serde_json::json!({ "entries": entries })))
}

/// `GET /v1/audit/proof/inclusion?index=&size=` (auditor).
pub async fn audit_inclusion(
    _peer: PeerIdentity,
    query: IndexQuery,
    state: Arc<ServerState>,
) -> Result<Response, Rejection> {
    let (index, size) = (query.required("index")?, query.required("size")?);
    let proof = blocking(move || {
        state
            .audit
            .store()
            .inclusion_proof(index, size)
            .map_err(store_error)
    })
    .await?;
    Ok(json(&serde_json::json!({
        "index": index,
        "size": size,
        "proof": proof.iter().map(b64_encode).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/audit/proof/consistency?from=&to=` (auditor).
pub async fn audit_consistency(
    _peer: PeerIdentity,
    query: IndexQuery,
    state: Arc<ServerState>,
) -> Result<Response, Rejection> {
    let (from, to) = (query.required("from")?, query.required("to")?);
    let proof = blocking(move || {
        state
            .audit
            .store()
            .consistency_proof(from, to)
            .map_err(store_error)
    })
    .await?;
    Ok(json(&serde_json::json!({
        "from": from,
        "to": to,
        "proof": proof.iter().map(b64_encode).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/log/checkpoint` (auditor, and anyone on the public listener):
/// the C2SP `tlog-tiles` checkpoint, as `text/plain`, cacheable for a few
/// seconds at most. For the auditor, the same signed note as
/// `/v1/audit/checkpoint`; on the public listener, the newest one signed
/// ([`Signing::Never`]), which may lag the log by the leaves appended
/// since.
pub async fn log_checkpoint(
    _peer: PeerIdentity,
    state: Arc<ServerState>,
    signing: Signing,
) -> Result<Response, Rejection> {
    let checkpoint = blocking(move || served_checkpoint(&state, signing)).await?;
    let mut response = checkpoint.into_response();
    let headers = response.headers_mut();
    headers.insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("private, max-age=5"),
    );
    Ok(response)
}

/// `GET /v1/log/tile/…` (auditor; anyone on the public log listener): a
/// tile of hashes or an entry bundle
/// (C2SP `tlog-tiles`), given the path after `tile/`. Served only when the
/// newest signed checkpoint covers all of it (so a client can verify it);
/// an entry bundle only with exactly its leaves, each matching its level-0
/// hash; either only when its hashes give the newest signed checkpoint's
/// root ([`crate::audit::log::AuditLog::check_tile`]); immutable once
/// served.
///
/// # Errors
/// 400 `malformed_request` for a path that is not a canonical tile path,
/// 404 `not_found` for a tile the newest checkpoint does not cover, 503
/// `log_inconsistent` once the log found its store rewritten (the newest
/// checkpoint's row not verifying, a covered tile's node rows giving
/// another root, malformed, or deleted where the read vouches for them, or
/// its entry bundle's leaf rows edited or deleted likewise, included, and
/// on SQLite any covered row missing or malformed); on PostgreSQL, 503
/// `store_unavailable` for covered rows a read on a standby could miss.
pub async fn log_tile(path: String, state: Arc<ServerState>) -> Result<Response, Rejection> {
    use crate::audit::tiles::{encode_bundle, encode_hashes, Tile};
    let tile = Tile::parse(&path).map_err(|e| ApiError::Malformed(e.to_string()))?;
    // Tiles are immutable and cached for a year: none is served from a
    // store the log found rewritten (503 `log_inconsistent`, as for the
    // checkpoint), or caches would keep tiles that match no checkpoint.
    if state.audit.inconsistency().is_some() {
        return Err(log_inconsistent().into());
    }
    let bytes = blocking(move || {
        let store = state.audit.store();
        // The newest checkpoint's size as signed, not as its row says: a
        // row edited to a larger size would have tiles of unsigned leaves
        // served as immutable.
        let head = state.audit.latest_signed_head().map_err(log_error)?;
        let size = head.map_or(0, |(size, _)| size);
        // With witnesses, the checkpoint served is the quorum's newest,
        // which may be older than the log's (a witness down): no tile
        // beyond it either, or leaves would be published that no checkpoint
        // served covers (C2SP tlog-tiles: a client fetches a partial tile
        // only for a checkpoint that needs it). Its size only lowers the
        // bound, so it is read, not verified again.
        let served = match &state.witnessing {
            None => size,
            Some(w) => w
                .served()
                .map_err(store_error)?
                .and_then(|note| note.split('\n').nth(1)?.parse::<u64>().ok())
                .map_or(size, |served| served.min(size)),
        };
        // Beyond the checkpoint (or beyond any tree): not there yet.
        let not_covered = |needed: String| ApiError::Refused {
            code: "not_found",
            status: StatusCode::NOT_FOUND,
            message: format!(
                "tile {} needs a tree of {needed} leaves; the newest checkpoint served has {served}",
                tile.path()
            ),
        };
        let (Some(needed), Some(first)) = (tile.needs_tree_size(), tile.first_node()) else {
            return Err(not_covered("more than 2^64 - 1".into()));
        };
        if needed > served {
            return Err(not_covered(needed.to_string()));
        }
        let end = first + u64::from(tile.width);
        match tile.level {
            Some(_) => {
                // needs_tree_size succeeded, so the tree level is below 64.
                let level = u8::try_from(tile.tree_level()).map_err(|_| ApiError::NotFound)?;
                let (rows, vouched) = store
                    .node_rows_vouched(level, first, end)
                    .map_err(|e| log_error(state.audit.covered_read_failed(size, e)))?;
                let hashes = state
                    .audit
                    .check_nodes((size, needed), level, first, tile.width, (&rows, vouched))
                    .map_err(log_error)?;
                // Served as immutable, so only as the signed tree has them.
                if let Some(head) = head {
                    state
                        .audit
                        .check_tile(head, level, first, &hashes)
                        .map_err(log_error)?;
                }
                Ok(encode_hashes(&hashes))
            }
            None => {
                let covered = |e| log_error(state.audit.covered_read_failed(size, e));
                let (rows, vouched) = store.leaves_vouched(first, end).map_err(covered)?;
                let (nodes, nodes_vouched) =
                    store.node_rows_vouched(0, first, end).map_err(covered)?;
                let hashes = state
                    .audit
                    .check_nodes(
                        (size, needed),
                        0,
                        first,
                        tile.width,
                        (&nodes, nodes_vouched),
                    )
                    .map_err(log_error)?;
                // Served as immutable, so only whole and as the tree
                // hashed them: exactly the tile's leaves, each matching
                // its level-0 hash, and those hashes as the signed tree
                // has them (an edited row, or a deleted one the read
                // vouches for, is 503 `log_inconsistent`, never a short
                // or altered bundle a cache would keep for a year).
                if let Some(head) = head {
                    state
                        .audit
                        .check_bundle(head, first, tile.width, (&rows, vouched), &hashes)
                        .map_err(log_error)?;
                }
                let leaves: Vec<Vec<u8>> = rows.into_iter().map(|(_, leaf)| leaf).collect();
                encode_bundle(&leaves).map_err(|i| {
                    tracing::error!(
                        index = first + i as u64,
                        "a stored leaf is too long for a tile"
                    );
                    ApiError::Internal
                })
            }
        }
    })
    .await?;
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    Ok(response)
}

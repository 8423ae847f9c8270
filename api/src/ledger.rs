//! The ledger's transparency log, readable by any authenticated user: the latest signed
//! checkpoint, inclusion and consistency proofs, the public keys; and the admin audit.
//! Hashes are standard base64, as in the checkpoint itself.

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_ledger::Hash;
use tally_workflows::{
    ledger::log::{self, ProofError},
    users::Role,
};

use crate::{
    AppState,
    auth::{Admin, Caller},
    error::ApiError,
    extract::ApiQuery,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/ledger/checkpoint", get(checkpoint))
        .route("/v1/ledger/keys", get(keys))
        .route("/v1/ledger/entries/{index}/proof", get(inclusion))
        .route("/v1/ledger/consistency", get(consistency))
        .route("/v1/admin/ledger/verify", get(verify))
}

fn b64(h: &Hash) -> String {
    STANDARD.encode(h)
}

impl From<ProofError> for ApiError {
    fn from(e: ProofError) -> Self {
        match e {
            ProofError::OutOfRange(msg) => ApiError::bad_request(msg),
            ProofError::Db(e) => e.into(),
        }
    }
}

async fn checkpoint(
    State(state): State<AppState>,
    Caller(_): Caller,
) -> Result<Json<Value>, ApiError> {
    let cp = log::latest_checkpoint(&state.db).await?.ok_or_else(|| {
        ApiError::not_found("no checkpoint has been signed yet: no process holds a signing key")
    })?;
    Ok(Json(json!({
        "origin": state.cfg.ledger.origin,
        "size": cp.size,
        "root_hash": b64(&cp.root),
        "note": cp.note,
        "signed_at": tally_workflows::rfc3339(cp.created_at),
    })))
}

async fn keys(State(state): State<AppState>, Caller(_): Caller) -> Json<Value> {
    let current = state.ledger_keys.signer.as_ref().map(|s| s.key_id());
    let keys: Vec<Value> = state
        .ledger_keys
        .trusted
        .iter()
        .map(|k| {
            json!({
                "name": k.name(),
                "key_id": format!("{:08x}", k.key_id()),
                "verifier": k.encode(),
                "algorithm": "ed25519",
                "current": Some(k.key_id()) == current,
            })
        })
        .collect();
    Json(json!({ "origin": state.cfg.ledger.origin, "keys": keys }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SizeParam {
    size: Option<u64>,
}

async fn inclusion(
    State(state): State<AppState>,
    Caller(user): Caller,
    Path(index): Path<String>,
    ApiQuery(p): ApiQuery<SizeParam>,
) -> Result<Json<Value>, ApiError> {
    let index: u64 = index.parse().map_err(|_| {
        ApiError::bad_request(format!("{index:?} is not an entry index (0, 1, 2, ...)"))
    })?;
    let (size, checkpoint) = match p.size {
        Some(size) => (size, log::checkpoint_at(&state.db, size).await?),
        None => {
            let cp = log::latest_checkpoint(&state.db)
                .await?
                .ok_or_else(|| ApiError::not_found("no checkpoint has been signed yet"))?;
            (cp.size, Some(cp))
        }
    };
    if index >= size {
        return Err(ApiError::not_found(format!(
            "entry {index} is not in the tree of {size} entries (it may not be integrated yet)"
        )));
    }
    let proof = log::inclusion_proof(&state.db, index, size).await?;
    let leaf = log::stored_leaf(&state.db, index).await?;
    // The entry itself only to its owner (or an admin); anyone may check the hashes.
    let entry = log::entry_at(&state.db, index)
        .await?
        .filter(|t| user.role == Role::Admin || t.user_id.as_deref() == Some(user.id.as_str()))
        .map(|t| t.entry(index));
    Ok(Json(json!({
        "index": index,
        "tree_size": size,
        "leaf_hash": leaf.as_ref().map(b64),
        "proof": proof.iter().map(b64).collect::<Vec<_>>(),
        "entry": entry,
        "checkpoint": checkpoint.map(|c| c.note),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyParams {
    from: u64,
    to: Option<u64>,
}

async fn consistency(
    State(state): State<AppState>,
    Caller(_): Caller,
    ApiQuery(p): ApiQuery<ConsistencyParams>,
) -> Result<Json<Value>, ApiError> {
    let to = match p.to {
        Some(to) => to,
        None => {
            log::latest_checkpoint(&state.db)
                .await?
                .ok_or_else(|| ApiError::not_found("no checkpoint has been signed yet"))?
                .size
        }
    };
    let proof = log::consistency_proof(&state.db, p.from, to).await?;
    let checkpoint = log::checkpoint_at(&state.db, to).await?;
    Ok(Json(json!({
        "from": p.from,
        "to": to,
        "proof": proof.iter().map(b64).collect::<Vec<_>>(),
        "checkpoint": checkpoint.map(|c| c.note),
    })))
}

async fn verify(State(state): State<AppState>, Admin(_): Admin) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    let verdict = log::verify(
        &state.db,
        state.ledger_keys.trusted.clone(),
        Some(state.cfg.ledger.origin.clone()),
        &mut |_, _| {},
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Json(match verdict {
        Ok(report) => json!({ "ok": true, "report": report, "seconds": seconds }),
        Err(finding) => json!({
            "ok": false,
            "error": finding.to_string(),
            "finding": finding,
            "seconds": seconds,
        }),
    }))
}

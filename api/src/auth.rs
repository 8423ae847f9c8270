//! Bearer API keys. A handler that takes [`Caller`] is authenticated; one that takes [`Admin`]
//! is also admin-only.

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts},
};
use tally_workflows::users::{self, Role, User};

use crate::{AppState, error::ApiError};

/// The authenticated user making the request.
pub struct Caller(pub User);

/// An authenticated admin.
pub struct Admin(pub User);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("send an API key: Authorization: Bearer <key>")
        })?;
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be: Bearer <key>")
            })?;
        if let Some(user) = state.keys.get(key) {
            return Ok(Caller(user));
        }
        match users::authenticate(&state.db, key).await? {
            Some(user) => {
                state.keys.put(key, user.clone());
                Ok(Caller(user))
            }
            None => Err(ApiError::unauthorized("this API key is not valid")),
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Caller(user) = Caller::from_request_parts(parts, state).await?;
        if user.role != Role::Admin {
            return Err(ApiError::forbidden("this needs an admin API key"));
        }
        Ok(Admin(user))
    }
}

/// Recently seen valid API keys, so a busy client costs one key lookup per
/// [`KEY_CACHE_TTL`] instead of one per request. Keys are held by their SHA-256, never in the
/// clear. (Tally has no key revocation or role change yet; when it does, they must clear this.)
#[derive(Default)]
pub struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (User, std::time::Instant)>>,
}

/// How long a looked-up key is trusted without asking the database again.
pub const KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Most keys remembered; past this the cache starts over.
const KEY_CACHE_MAX: usize = 10_000;

impl KeyCache {
    fn get(&self, key: &str) -> Option<User> {
        let hash = users::hash_key(key);
        let entries = self.entries.lock().ok()?;
        entries
            .get(&hash)
            .filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(user, _)| user.clone())
    }

    fn put(&self, key: &str, user: User) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= KEY_CACHE_MAX {
                entries.clear();
            }
            entries.insert(users::hash_key(key), (user, std::time::Instant::now()));
        }
    }
}

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
        match users::authenticate(&state.db, key).await? {
            Some(user) => Ok(Caller(user)),
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

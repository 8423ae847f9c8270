//! Users, roles and API keys. A key is shown once, at creation; only its SHA-256 is stored
//! (keys carry 256 bits of randomness, so a fast hash is the right one, as for GitHub tokens).

use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{Db, DbError, db::is_unique_violation, now_ms, with_pool};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub email: String,
    pub role: Role,
}

/// A new user and the only copy of their API key.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedUser {
    pub id: String,
    pub email: String,
    pub role: Role,
    pub api_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("a user with email {0:?} already exists")]
    EmailTaken(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for UserError {
    fn from(e: sqlx::Error) -> Self {
        UserError::Db(DbError::Sqlx(e))
    }
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A fresh API key: `tly_` and 64 hex digits.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("tly_{}", hex::encode(bytes))
}

/// Checks an email address enough to catch mistakes: one `@`, something on each side, a dot in
/// the domain, no spaces, at most 254 characters.
pub fn validate_email(email: &str) -> Result<String, String> {
    let email = email.trim();
    let ok = email.len() <= 254
        && !email.contains(char::is_whitespace)
        && !email.contains(char::is_control)
        && matches!(email.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.') && !d.contains('@'));
    if ok {
        Ok(email.to_ascii_lowercase())
    } else {
        Err(format!("{email:?} is not a valid email address"))
    }
}

pub async fn create(
    db: &Db,
    email: &str,
    role: Role,
    key: Option<&str>,
) -> Result<CreatedUser, UserError> {
    let email = validate_email(email).map_err(UserError::Invalid)?;
    let api_key = key.map(str::to_owned).unwrap_or_else(generate_key);
    let id = uuid::Uuid::now_v7().to_string();
    let sql =
        "INSERT INTO users (id, email, role, key_hash, created_at) VALUES ($1, $2, $3, $4, $5)";
    let res = with_pool!(db, pool => {
        sqlx::query(sql)
            .bind(&id)
            .bind(&email)
            .bind(role.as_str())
            .bind(hash_key(&api_key))
            .bind(now_ms())
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
    });
    match res {
        Ok(_) => Ok(CreatedUser {
            id,
            email,
            role,
            api_key,
        }),
        Err(e) if is_unique_violation(&e) => Err(UserError::EmailTaken(email)),
        Err(e) => Err(e.into()),
    }
}

type UserRow = (String, String, String);

fn to_user(row: UserRow) -> Result<User, DbError> {
    let role = Role::parse(&row.2)
        .ok_or_else(|| DbError::Corrupt(format!("user {} has role {:?}", row.0, row.2)))?;
    Ok(User {
        id: row.0,
        email: row.1,
        role,
    })
}

/// The user an API key belongs to, if any.
pub async fn authenticate(db: &Db, key: &str) -> Result<Option<User>, DbError> {
    let sql = "SELECT id, email, role FROM users WHERE key_hash = $1";
    let hash = hash_key(key);
    let row: Option<UserRow> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(&hash).fetch_optional(pool).await?
    });
    row.map(to_user).transpose()
}

/// The platform's own user (made by a migration): an admin that owns the jobs cron makes, and
/// holds no API key anyone can use.
pub const PLATFORM_USER_ID: &str = "00000000-0000-0000-0000-000000000000";

/// Whether an admin someone can log in as exists (the platform's own user does not count).
pub async fn admin_exists(db: &Db) -> Result<bool, DbError> {
    let sql = "SELECT COUNT(*) FROM users WHERE role = 'admin' AND id <> $1";
    let n: i64 = with_pool!(db, pool => sqlx::query_scalar(sql).bind(PLATFORM_USER_ID).fetch_one(pool).await?);
    Ok(n > 0)
}

/// Makes sure an admin holding exactly `key` exists (for scripts that set `TALLY_ADMIN_KEY`).
/// Returns true when it had to create one.
pub async fn ensure_admin_key(db: &Db, key: &str) -> Result<bool, UserError> {
    if let Some(user) = authenticate(db, key).await? {
        if user.role == Role::Admin {
            return Ok(false);
        }
        return Err(UserError::Invalid(
            "TALLY_ADMIN_KEY belongs to a user who is not an admin".into(),
        ));
    }
    let mut n = 0;
    loop {
        let email = if n == 0 {
            "admin@tally.local".to_owned()
        } else {
            format!("admin{n}@tally.local")
        };
        match create(db, &email, Role::Admin, Some(key)).await {
            Ok(_) => return Ok(true),
            Err(UserError::EmailTaken(_)) if n < 100 => {
                // Another process may have created the same key a moment ago.
                if authenticate(db, key)
                    .await?
                    .is_some_and(|u| u.role == Role::Admin)
                {
                    return Ok(false);
                }
                n += 1
            }
            Err(e) => return Err(e),
        }
    }
}

/// True when a user with this id exists.
pub async fn exists(db: &Db, id: &str) -> Result<bool, DbError> {
    let n: i64 = crate::with_pool!(db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id = $1").bind(id).fetch_one(pool).await?
    });
    Ok(n > 0)
}

//! Generated images: rows here, bytes in the image folder. An image's id derives from the job
//! that made it and its position, so a rerun of the job rewrites the same files and rows.

use crate::kinds::{Input, Kind, PriceRule};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Db, DbError, now_ms, rfc3339, with_pool};

/// `image`: generates images (made by `POST /v1/images`, which holds the estimate).
pub static KIND: Kind = Kind::new::<ImageInput>("image", "ai")
    .made_by("POST /v1/images/generate")
    .priced(PriceRule::Usage);

/// An image job's input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    pub prompt: String,
    pub model: String,
    pub size: String,
    pub n: u32,
    /// The owner, whose folder the images are filed under.
    pub user_id: String,
}
impl Input for ImageInput {}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Image {
    pub id: String,
    pub user_id: String,
    pub job_id: String,
    pub model: String,
    pub provider: String,
    pub prompt: String,
    pub size: String,
    pub content_type: String,
    pub bytes: i64,
    /// The file's name inside the image folder.
    pub file: String,
    pub created_at: i64,
}

const COLUMNS: &str =
    "id, user_id, job_id, model, provider, prompt, size, content_type, bytes, file, created_at";

impl Image {
    /// The id of the `index`th image a job makes.
    pub fn id_for(job_id: &str, index: usize) -> String {
        format!("{job_id}-{index}")
    }

    pub fn view(&self) -> Value {
        json!({
            "id": self.id,
            "job_id": self.job_id,
            "model": self.model,
            "provider": self.provider,
            "prompt": self.prompt,
            "size": self.size,
            "content_type": self.content_type,
            "bytes": self.bytes,
            "content": format!("/v1/images/{}/content", self.id),
            "created_at": rfc3339(self.created_at),
        })
    }
}

/// Records images whose files are written (a rerun's rows already exist and are kept).
pub async fn record(db: &Db, images: &[Image]) -> Result<(), DbError> {
    let sql = format!(
        "INSERT INTO ai_images ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (id) DO NOTHING"
    );
    let mut tx = db.begin().await?;
    for i in images {
        crate::with_tx!(&mut tx, conn => {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(&i.id).bind(&i.user_id).bind(&i.job_id).bind(&i.model).bind(&i.provider)
                .bind(&i.prompt).bind(&i.size).bind(&i.content_type).bind(i.bytes).bind(&i.file)
                .bind(if i.created_at > 0 { i.created_at } else { now_ms() })
                .execute(&mut *conn).await?;
        });
    }
    tx.commit().await
}

/// The image, if it is this user's.
pub async fn get(db: &Db, id: &str, user_id: &str) -> Result<Option<Image>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM ai_images WHERE id = $1 AND user_id = $2");
    let row: Option<Image> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(user_id).fetch_optional(pool).await?
    });
    Ok(row)
}

/// The images a job made, in order.
pub async fn of_job(db: &Db, job_id: &str) -> Result<Vec<Image>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM ai_images WHERE job_id = $1 ORDER BY id");
    let rows: Vec<Image> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(job_id).fetch_all(pool).await?
    });
    Ok(rows)
}

/// The user's images, newest first; `before` is the previous page's last id.
pub async fn list(
    db: &Db,
    user_id: &str,
    before: Option<&str>,
    limit: u32,
) -> Result<(Vec<Image>, Option<String>), DbError> {
    let limit = i64::from(limit.clamp(1, 200));
    let sql = format!(
        "SELECT {COLUMNS} FROM ai_images WHERE user_id = $1 AND ($2 IS NULL OR id < $2) \
         ORDER BY id DESC LIMIT $3"
    );
    let mut rows: Vec<Image> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(user_id).bind(before).bind(limit + 1).fetch_all(pool).await?
    });
    let next = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|i| i.id.clone())
    } else {
        None
    };
    Ok((rows, next))
}

/// Deletes the image's row; returns it, so the caller removes its file.
pub async fn delete(db: &Db, id: &str, user_id: &str) -> Result<Option<Image>, DbError> {
    let sql = format!("DELETE FROM ai_images WHERE id = $1 AND user_id = $2 RETURNING {COLUMNS}");
    let row: Option<Image> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(user_id).fetch_optional(pool).await?
    });
    Ok(row)
}

//! Conversations. A user message is stored in the same transaction as the `chat` job that
//! answers it (which holds the estimated credits); the job stores the reply under an id derived
//! from itself, so a rerun never adds a second reply.

use serde_json::{Value, json};

use crate::{
    Db, DbError,
    db::Tx,
    jobs::{self, Job, JobError, NewJob},
    now_ms, rfc3339, with_pool, with_tx,
};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Conversation {
    pub id: String,
    pub user_id: String,
    pub title: String,
    pub model: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Message {
    pub id: String,
    pub conversation_id: String,
    pub role: String,
    pub content: String,
    pub job_id: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub created_at: i64,
}

const CONVERSATION_COLUMNS: &str = "id, user_id, title, model, created_at, updated_at";
const MESSAGE_COLUMNS: &str = "id, conversation_id, role, content, job_id, model, provider, \
    input_tokens, output_tokens, created_at";

impl Conversation {
    pub fn view(&self) -> Value {
        json!({
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        })
    }
}

impl Message {
    pub fn view(&self) -> Value {
        json!({
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "job_id": self.job_id,
            "model": self.model,
            "provider": self.provider,
            "usage": self.input_tokens.map(|i| json!({
                "input_tokens": i,
                "output_tokens": self.output_tokens,
            })),
            "created_at": rfc3339(self.created_at),
        })
    }
}

pub async fn create(
    db: &Db,
    user_id: &str,
    title: &str,
    model: &str,
) -> Result<Conversation, DbError> {
    let now = now_ms();
    let c = Conversation {
        id: uuid::Uuid::now_v7().to_string(),
        user_id: user_id.to_owned(),
        title: title.to_owned(),
        model: model.to_owned(),
        created_at: now,
        updated_at: now,
    };
    let sql = "INSERT INTO ai_conversations (id, user_id, title, model, created_at, updated_at) \
        VALUES ($1, $2, $3, $4, $5, $6)";
    with_pool!(db, pool => {
        sqlx::query(sql).bind(&c.id).bind(&c.user_id).bind(&c.title).bind(&c.model)
            .bind(c.created_at).bind(c.updated_at).execute(pool).await?;
    });
    Ok(c)
}

/// The conversation, if it is this user's.
pub async fn get(db: &Db, id: &str, user_id: &str) -> Result<Option<Conversation>, DbError> {
    let sql = format!(
        "SELECT {CONVERSATION_COLUMNS} FROM ai_conversations WHERE id = $1 AND user_id = $2"
    );
    let c: Option<Conversation> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(user_id).fetch_optional(pool).await?
    });
    Ok(c)
}

/// What answering a new question in a conversation needs, read in one statement: the
/// conversation (if it is this user's), the user's preferences, and the tokens of its history
/// by the estimate rule ([`crate::ai::tokens::count_messages`], counted by the database).
#[derive(Debug, Clone)]
pub struct QuestionContext {
    pub conversation: Conversation,
    pub preferences: crate::ai::Preferences,
    pub history_tokens: u64,
}

#[derive(sqlx::FromRow)]
struct QuestionContextRow {
    #[sqlx(flatten)]
    conversation: Conversation,
    #[sqlx(flatten)]
    preferences: crate::ai::PreferencesRow,
    history_tokens: i64,
}

pub async fn question_context(
    db: &Db,
    id: &str,
    user_id: &str,
) -> Result<Option<QuestionContext>, DbError> {
    // `(chars + 3) / 4 + 4` per message is `tokens::count` plus framing: LENGTH counts
    // characters on both backends (on a UTF-8 Postgres database).
    let sql = "SELECT c.id, c.user_id, c.title, c.model, c.created_at, c.updated_at, \
        p.chat_model, p.image_model, p.temperature, p.max_tokens, \
        (SELECT COALESCE(SUM((LENGTH(m.content) + 3) / 4 + 4), 0) FROM ai_messages m \
         WHERE m.conversation_id = c.id) AS history_tokens \
        FROM ai_conversations c LEFT JOIN ai_preferences p ON p.user_id = c.user_id \
        WHERE c.id = $1 AND c.user_id = $2";
    let row: Option<QuestionContextRow> = with_pool!(db, pool => {
        sqlx::query_as(sql).bind(id).bind(user_id).fetch_optional(pool).await?
    });
    Ok(row.map(|r| QuestionContext {
        conversation: r.conversation,
        preferences: r.preferences.into(),
        history_tokens: u64::try_from(r.history_tokens).unwrap_or(0),
    }))
}

/// The user's conversations, newest first; `before` is the previous page's last id.
pub async fn list(
    db: &Db,
    user_id: &str,
    before: Option<&str>,
    limit: u32,
) -> Result<(Vec<Conversation>, Option<String>), DbError> {
    let limit = i64::from(limit.clamp(1, 200));
    let sql = format!(
        "SELECT {CONVERSATION_COLUMNS} FROM ai_conversations WHERE user_id = $1 \
         AND ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
    );
    let mut rows: Vec<Conversation> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(user_id).bind(before).bind(limit + 1).fetch_all(pool).await?
    });
    let next = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|c| c.id.clone())
    } else {
        None
    };
    Ok((rows, next))
}

/// A conversation's messages, oldest first.
pub async fn messages(db: &Db, conversation_id: &str) -> Result<Vec<Message>, DbError> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM ai_messages WHERE conversation_id = $1 ORDER BY created_at, id"
    );
    let rows: Vec<Message> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(conversation_id).fetch_all(pool).await?
    });
    Ok(rows)
}

/// A user's question, with the job that will answer it.
#[derive(Debug, Clone)]
pub struct Question {
    pub conversation_id: String,
    pub content: String,
    pub job: NewJob,
}

/// A question stored with the job that answers it (see [`NewJob::asked`]).
#[derive(Debug, Clone)]
pub struct Asked {
    pub conversation_id: String,
    pub content: String,
}

impl Asked {
    /// The stored question of `job`.
    pub(crate) fn message(&self, job: &Job) -> Message {
        Message {
            id: format!("{}:user", job.id),
            conversation_id: self.conversation_id.clone(),
            role: "user".to_owned(),
            content: self.content.clone(),
            job_id: Some(job.id.clone()),
            model: None,
            provider: None,
            input_tokens: None,
            output_tokens: None,
            created_at: job.created_at,
        }
    }
}

/// Stores each question and submits the job that answers it, all in one transaction (the API
/// group-commits concurrent questions): a refused job (402) leaves no message behind. Each
/// question gets its own answer.
pub async fn ask_many(
    db: &Db,
    questions: Vec<Question>,
) -> Result<Vec<Result<(Message, Job), JobError>>, DbError> {
    let mut tx = db.begin().await?;
    let asked: Vec<Asked> = questions
        .iter()
        .map(|q| Asked {
            conversation_id: q.conversation_id.clone(),
            content: q.content.clone(),
        })
        .collect();
    let jobs = questions
        .into_iter()
        .zip(&asked)
        .map(|(q, a)| NewJob {
            asked: Some(a.clone()),
            ..q.job
        })
        .collect();
    let submitted = jobs::submit_in(&mut tx, jobs).await?;
    tx.commit().await?;
    Ok(submitted
        .into_iter()
        .zip(asked)
        .map(|(answer, a)| answer.map(|(job, _)| (a.message(&job), job)))
        .collect())
}

/// SQLite: inserts messages (a message already stored is kept) and touches their
/// conversations. (On Postgres the statement that writes a question's job, or a reply's
/// outcome, inserts them: [`pg_insert_messages`].)
///
/// Every transaction that touches a conversation and a user's accounts touches the
/// conversation first (a question and an outcome both do it in their first statement), so
/// two of them cannot deadlock.
pub(crate) async fn sqlite_insert_many(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    ms: &[Message],
) -> Result<(), DbError> {
    let now = now_ms();
    for chunk in ms.chunks(500) {
        let mut qb =
            sqlx::QueryBuilder::new(format!("INSERT INTO ai_messages ({MESSAGE_COLUMNS}) "));
        qb.push_values(chunk, |mut b, m| {
            b.push_bind(&m.id)
                .push_bind(&m.conversation_id)
                .push_bind(&m.role)
                .push_bind(&m.content)
                .push_bind(&m.job_id)
                .push_bind(&m.model)
                .push_bind(&m.provider)
                .push_bind(m.input_tokens)
                .push_bind(m.output_tokens)
                .push_bind(m.created_at);
        });
        qb.push(" ON CONFLICT (id) DO NOTHING");
        qb.build().execute(&mut **tx).await?;
        let mut qb = sqlx::QueryBuilder::new("UPDATE ai_conversations SET updated_at = ");
        qb.push_bind(now).push(" WHERE id IN (");
        let mut list = qb.separated(", ");
        for m in chunk {
            list.push_bind(&m.conversation_id);
        }
        qb.push(")");
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Deletes the questions of jobs that were refused in the transaction that stored them.
pub(crate) async fn delete_questions(tx: &mut Tx, job_ids: &[&str]) -> Result<(), DbError> {
    if job_ids.is_empty() {
        return Ok(());
    }
    with_tx!(tx, conn => {
        let mut qb = sqlx::QueryBuilder::new("DELETE FROM ai_messages WHERE id IN (");
        let mut list = qb.separated(", ");
        for id in job_ids {
            list.push_bind(format!("{id}:user"));
        }
        qb.push(")");
        qb.build().execute(&mut *conn).await?;
    });
    Ok(())
}

/// Postgres: messages as column arrays, so a statement that writes other rows inserts them
/// too ([`pg_insert_messages`], bound with [`bind_messages!`]).
#[derive(Debug, Default)]
pub(crate) struct PgMessageRows {
    pub ids: Vec<String>,
    pub conversation_ids: Vec<String>,
    pub roles: Vec<String>,
    pub contents: Vec<String>,
    pub job_ids: Vec<Option<String>>,
    pub models: Vec<Option<String>>,
    pub providers: Vec<Option<String>>,
    pub input_tokens: Vec<Option<i64>>,
    pub output_tokens: Vec<Option<i64>>,
    pub created_at: Vec<i64>,
}

impl PgMessageRows {
    pub(crate) fn of<'a>(ms: impl IntoIterator<Item = &'a Message>) -> Self {
        let mut rows = PgMessageRows::default();
        for m in ms {
            rows.ids.push(m.id.clone());
            rows.conversation_ids.push(m.conversation_id.clone());
            rows.roles.push(m.role.clone());
            rows.contents.push(m.content.clone());
            rows.job_ids.push(m.job_id.clone());
            rows.models.push(m.model.clone());
            rows.providers.push(m.provider.clone());
            rows.input_tokens.push(m.input_tokens);
            rows.output_tokens.push(m.output_tokens);
            rows.created_at.push(m.created_at);
        }
        rows
    }
}

/// Binds a [`PgMessageRows`] in the order [`pg_insert_messages`] expects.
macro_rules! bind_messages {
    ($q:expr, $rows:expr) => {
        $q.bind(&$rows.ids)
            .bind(&$rows.conversation_ids)
            .bind(&$rows.roles)
            .bind(&$rows.contents)
            .bind(&$rows.job_ids)
            .bind(&$rows.models)
            .bind(&$rows.providers)
            .bind(&$rows.input_tokens)
            .bind(&$rows.output_tokens)
            .bind(&$rows.created_at)
    };
}
pub(crate) use bind_messages;

/// Writable CTEs `m` and `mc` for a statement's `WITH` list: insert the messages bound from
/// `$first` on (see [`bind_messages!`]) whose row `x` satisfies `keep`, keeping any already
/// stored, and set their conversations' `updated_at` to `now` (a parameter). The
/// conversations are locked in id order: two batches that touch the same ones never
/// deadlock (an `UPDATE ... WHERE id IN (...)` locks them in whatever order it meets them).
pub(crate) fn pg_insert_messages(first: usize, now: &str, keep: &str) -> String {
    let p: Vec<String> = (first..first + 10).map(|i| format!("${i}")).collect();
    format!(
        "m AS (INSERT INTO ai_messages ({MESSAGE_COLUMNS}) SELECT x.* FROM UNNEST({}::text[], \
         {}::text[], {}::text[], {}::text[], {}::text[], {}::text[], {}::text[], {}::bigint[], \
         {}::bigint[], {}::bigint[]) AS x ({MESSAGE_COLUMNS}) WHERE {keep} \
         ON CONFLICT (id) DO NOTHING RETURNING conversation_id), \
         mc AS (UPDATE ai_conversations SET updated_at = {now} FROM (SELECT id FROM \
         ai_conversations WHERE id = ANY(ARRAY(SELECT conversation_id FROM m)) ORDER BY id \
         FOR NO KEY UPDATE) AS l WHERE ai_conversations.id = l.id)",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]
    )
}

/// The conversation as a model sees it when answering each job's question (the message
/// `{job}:user`): every message before (and including) that question; replies to later
/// questions are left out. `None` where the job's question is missing. Keyed by the job alone,
/// so a worker can read it while it claims the job. One statement for them all on Postgres
/// (workers batch the reads of the jobs they run at once).
pub async fn histories_for(
    db: &Db,
    job_ids: Vec<String>,
) -> Result<Vec<Option<Vec<Message>>>, DbError> {
    let questions: Vec<String> = job_ids.iter().map(|j| format!("{j}:user")).collect();
    let rows: Vec<Message> = match db {
        Db::Postgres(pool) => {
            // The conversations are read once, into an array: with `IN (SELECT ...)` a generic
            // plan could probe the questions once per message (16 times slower, seen when the
            // plan was made while the tables were nearly empty).
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM ai_messages WHERE conversation_id = ANY(ARRAY(\
                 SELECT conversation_id FROM ai_messages WHERE id = ANY($1))) \
                 ORDER BY conversation_id, created_at, id"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&questions)
                .fetch_all(pool)
                .await?
        }
        Db::Sqlite(pool) => {
            let mut conn = pool.acquire().await?;
            let head = format!("SELECT {MESSAGE_COLUMNS} FROM ai_messages WHERE id IN (");
            let ids: Vec<&str> = questions.iter().map(String::as_str).collect();
            let asked: Vec<Message> = crate::db::sqlite_select_in(&mut conn, &head, &ids).await?;
            let mut ids: Vec<&str> = asked.iter().map(|m| m.conversation_id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            let head =
                format!("SELECT {MESSAGE_COLUMNS} FROM ai_messages WHERE conversation_id IN (");
            let mut rows: Vec<Message> =
                crate::db::sqlite_select_in(&mut conn, &head, &ids).await?;
            rows.sort_unstable_by(|a, b| {
                (&a.conversation_id, a.created_at, &a.id).cmp(&(
                    &b.conversation_id,
                    b.created_at,
                    &b.id,
                ))
            });
            rows
        }
    };
    let mut by_conversation: std::collections::HashMap<&str, Vec<&Message>> =
        std::collections::HashMap::new();
    let mut conversation_of: std::collections::HashMap<&str, &str> =
        std::collections::HashMap::new();
    for m in &rows {
        by_conversation
            .entry(m.conversation_id.as_str())
            .or_default()
            .push(m);
        conversation_of.insert(m.id.as_str(), m.conversation_id.as_str());
    }
    Ok(job_ids
        .iter()
        .zip(&questions)
        .map(|(job_id, question)| {
            let all = by_conversation.get(conversation_of.get(question.as_str())?)?;
            let end = all.iter().position(|m| &m.id == question)? + 1;
            Some(
                all[..end]
                    .iter()
                    .filter(|m| m.role != "assistant" || m.job_id.as_deref() != Some(job_id))
                    .map(|m| (*m).clone())
                    .collect(),
            )
        })
        .collect())
}

/// The stored form of a model's reply to `job_id`.
pub fn reply_message(conversation_id: &str, job_id: &str, reply: Message) -> Message {
    Message {
        id: format!("{job_id}:reply"),
        conversation_id: conversation_id.to_owned(),
        role: "assistant".to_owned(),
        job_id: Some(job_id.to_owned()),
        created_at: now_ms(),
        ..reply
    }
}

/// The reply stored for `job_id`, if an attempt got that far.
pub async fn reply_of(db: &Db, job_id: &str) -> Result<Option<Message>, DbError> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM ai_messages WHERE id = $1");
    let m: Option<Message> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(format!("{job_id}:reply")).fetch_optional(pool).await?
    });
    Ok(m)
}

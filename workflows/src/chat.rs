//! Conversations. A user message is stored in the same transaction as the `chat` job that
//! answers it (which holds the estimated credits); the job stores the reply under an id derived
//! from itself, so a rerun never adds a second reply.

use crate::kinds::{Input, Kind, PriceRule};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use futures::future::BoxFuture;

use crate::{
    Db, DbError,
    db::Tx,
    effects::{Rows, Table},
    jobs::{self, Job, JobError, NewJob},
    now_ms, rfc3339, with_pool, with_tx,
};

/// `chat`: answers a question in a conversation (made by
/// `POST /v1/chat/conversations/{id}/messages`, which holds the estimate).
pub static KIND: Kind = Kind::new::<ChatInput>("chat", "ai")
    .made_by("POST /v1/chat/conversations/{id}/messages")
    .priced(PriceRule::Usage);

/// A chat job's input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatInput {
    pub conversation_id: String,
    pub model: String,
    pub max_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
}
impl Input for ChatInput {}

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

/// A conversation's columns, read from `ai_conversations c`. Its `updated_at` is its last
/// message's time (or its creation's): derived, so a message never writes its conversation's
/// row (a row every question and reply of the conversation would otherwise update and lock).
const CONVERSATION_COLUMNS: &str = "c.id, c.user_id, c.title, c.model, c.created_at, \
    COALESCE((SELECT MAX(m.created_at) FROM ai_messages m WHERE m.conversation_id = c.id), \
    c.updated_at) AS updated_at";
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
        "SELECT {CONVERSATION_COLUMNS} FROM ai_conversations c WHERE c.id = $1 AND c.user_id = $2"
    );
    let c: Option<Conversation> = with_pool!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(user_id).fetch_optional(pool).await?
    });
    Ok(c)
}

/// What answering a new question in a conversation needs: the conversation (if it is this
/// user's), the user's preferences, and the tokens of its history by the estimate rule
/// ([`crate::ai::tokens::count_messages`], counted by the database).
#[derive(Debug, Clone)]
pub struct QuestionContext {
    pub conversation: Conversation,
    pub preferences: crate::ai::Preferences,
    pub history_tokens: u64,
}

#[derive(sqlx::FromRow)]
struct QuestionContextRow {
    /// The question's place in the batch (0-based).
    at: i64,
    #[sqlx(flatten)]
    conversation: Conversation,
    #[sqlx(flatten)]
    preferences: crate::ai::PreferencesRow,
    history_tokens: i64,
}

/// Who asks in which conversation: a conversation id and the asking user's id.
pub type Asker = (String, String);

/// [`QuestionContext`]s of many questions at once (the API batches the reads of concurrent
/// questions): one statement on Postgres whatever the batch, one per question on SQLite
/// (in-process, where a statement costs no round trip). `None` where the conversation is
/// not that user's.
pub async fn question_contexts(
    db: &Db,
    askers: Vec<Asker>,
) -> Result<Vec<Option<QuestionContext>>, DbError> {
    // `(chars + 3) / 4 + 4` per message is `tokens::count` plus framing: LENGTH counts
    // characters on both backends (on a UTF-8 Postgres database).
    let select = format!(
        "{CONVERSATION_COLUMNS}, p.chat_model, p.image_model, p.temperature, p.max_tokens, \
         (SELECT COALESCE(SUM((LENGTH(m.content) + 3) / 4 + 4), 0) FROM ai_messages m \
         WHERE m.conversation_id = c.id) AS history_tokens"
    );
    let rows: Vec<QuestionContextRow> = match db {
        Db::Postgres(pool) => {
            // Planned at each batch: a generic plan made while the conversations were few
            // would scan them all for every batch (see ARCHITECTURE.md, "planned at each
            // execution").
            let sql = format!(
                "SELECT q.at - 1 AS at, {select} FROM UNNEST($1::text[], $2::text[]) \
                 WITH ORDINALITY AS q (id, user_id, at) \
                 JOIN ai_conversations c ON c.id = q.id AND c.user_id = q.user_id \
                 LEFT JOIN ai_preferences p ON p.user_id = c.user_id"
            );
            let (ids, users): (Vec<&str>, Vec<&str>) =
                askers.iter().map(|(c, u)| (c.as_str(), u.as_str())).unzip();
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .persistent(false)
                .bind(ids)
                .bind(users)
                .fetch_all(pool)
                .await?
        }
        Db::Sqlite(pool) => {
            let sql = format!(
                "SELECT 0 AS at, {select} FROM ai_conversations c \
                 LEFT JOIN ai_preferences p ON p.user_id = c.user_id \
                 WHERE c.id = $1 AND c.user_id = $2"
            );
            let mut conn = pool.acquire().await?;
            let mut rows = Vec::with_capacity(askers.len());
            for (at, (id, user_id)) in askers.iter().enumerate() {
                let row: Option<QuestionContextRow> =
                    sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                        .bind(id)
                        .bind(user_id)
                        .fetch_optional(&mut *conn)
                        .await?;
                rows.extend(row.map(|r| QuestionContextRow { at: at as i64, ..r }));
            }
            rows
        }
    };
    let mut out: Vec<Option<QuestionContext>> = vec![None; askers.len()];
    for r in rows {
        if let Some(slot) = usize::try_from(r.at).ok().and_then(|i| out.get_mut(i)) {
            *slot = Some(QuestionContext {
                conversation: r.conversation,
                preferences: r.preferences.into(),
                history_tokens: u64::try_from(r.history_tokens).unwrap_or(0),
            });
        }
    }
    Ok(out)
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
        "SELECT {CONVERSATION_COLUMNS} FROM ai_conversations c WHERE c.user_id = $1 \
         AND ($2 IS NULL OR c.id < $2) ORDER BY c.id DESC LIMIT $3"
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
#[derive(Debug)]
pub struct Question {
    pub conversation_id: String,
    pub content: String,
    pub job: NewJob,
}

/// The stored form of `job_id`'s question.
fn question_message(conversation_id: &str, content: &str, job_id: &str, at: i64) -> Message {
    Message {
        id: format!("{job_id}:user"),
        conversation_id: conversation_id.to_owned(),
        role: "user".to_owned(),
        content: content.to_owned(),
        job_id: Some(job_id.to_owned()),
        model: None,
        provider: None,
        input_tokens: None,
        output_tokens: None,
        created_at: at,
    }
}

/// Stores each question and submits the job that answers it, all in one transaction (the API
/// group-commits concurrent questions): the question is a row the job stages
/// ([`Messages`]), so a refused job (402) leaves no message behind. Each question gets its own
/// answer.
pub async fn ask_many(
    db: &Db,
    questions: Vec<Question>,
) -> Result<Vec<Result<(Message, Job), JobError>>, DbError> {
    let now = now_ms();
    let mut asked = Vec::with_capacity(questions.len());
    let jobs = questions
        .into_iter()
        .map(|q| {
            let id = uuid::Uuid::now_v7().to_string();
            let message = question_message(&q.conversation_id, &q.content, &id, now);
            let rows = vec![Rows::of::<Messages>(vec![message.clone()])];
            asked.push(message);
            NewJob {
                id: Some(id),
                rows,
                ..q.job
            }
        })
        .collect();
    let mut tx = db.begin().await?;
    let submitted = jobs::submit_in(&mut tx, jobs).await?;
    tx.commit().await?;
    crate::events::publish(submitted.iter().filter_map(|a| match a {
        Ok((job, true)) => Some(job.id.as_str()),
        _ => None,
    }));
    Ok(submitted
        .into_iter()
        .zip(asked)
        .map(|(answer, question)| {
            answer.map(|(job, _)| {
                // A replayed question answers with the first job's question.
                let m = if question.job_id.as_deref() == Some(job.id.as_str()) {
                    question
                } else {
                    question_message(
                        &question.conversation_id,
                        &question.content,
                        &job.id,
                        job.created_at,
                    )
                };
                (m, job)
            })
        })
        .collect())
}

/// The conversations' messages, as rows that jobs stage: a question with its job, a reply
/// with its job's success. A message already stored is kept. Writing messages never writes
/// or locks their conversations (whose `updated_at` is derived from them), so concurrent
/// questions and replies in one conversation never wait on each other.
pub struct Messages;

impl Table for Messages {
    type Row = Message;
    const NAME: &'static str = "ai_messages";

    fn write<'a>(tx: &'a mut Tx, rows: &'a [Message]) -> BoxFuture<'a, Result<(), DbError>> {
        Box::pin(async move {
            match tx {
                Tx::Postgres(conn) => pg_insert_many(conn, rows).await,
                Tx::Sqlite(conn) => sqlite_insert_many(conn, rows).await,
            }
        })
    }

    fn forget<'a>(tx: &'a mut Tx, job_ids: &'a [&'a str]) -> BoxFuture<'a, Result<(), DbError>> {
        Box::pin(delete_questions(tx, job_ids))
    }
}

/// Postgres: [`Messages::write`] in one statement whatever the batch size.
async fn pg_insert_many(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    ms: &[Message],
) -> Result<(), DbError> {
    if ms.is_empty() {
        return Ok(());
    }
    let rows = PgMessageRows::of(ms);
    let sql = format!(
        "INSERT INTO ai_messages ({MESSAGE_COLUMNS}) SELECT * FROM UNNEST($1::text[], \
         $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[], \
         $9::bigint[], $10::bigint[]) ON CONFLICT (id) DO NOTHING"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&rows.ids)
        .bind(&rows.conversation_ids)
        .bind(&rows.roles)
        .bind(&rows.contents)
        .bind(&rows.job_ids)
        .bind(&rows.models)
        .bind(&rows.providers)
        .bind(&rows.input_tokens)
        .bind(&rows.output_tokens)
        .bind(&rows.created_at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// SQLite: [`Messages::write`].
async fn sqlite_insert_many(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    ms: &[Message],
) -> Result<(), DbError> {
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
    }
    Ok(())
}

/// Deletes the questions of jobs that were refused in the transaction that stored them.
async fn delete_questions(tx: &mut Tx, job_ids: &[&str]) -> Result<(), DbError> {
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

/// Postgres: messages as column arrays.
#[derive(Debug, Default)]
struct PgMessageRows {
    ids: Vec<String>,
    conversation_ids: Vec<String>,
    roles: Vec<String>,
    contents: Vec<String>,
    job_ids: Vec<Option<String>>,
    models: Vec<Option<String>>,
    providers: Vec<Option<String>>,
    input_tokens: Vec<Option<i64>>,
    output_tokens: Vec<Option<i64>>,
    created_at: Vec<i64>,
}

impl PgMessageRows {
    fn of<'a>(ms: impl IntoIterator<Item = &'a Message>) -> Self {
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
            // plan was made while the tables were nearly empty). Planned at each batch: a
            // generic plan made while the messages were few scanned them all, twice, at every
            // batch (23 ms a batch at 40,000 messages).
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM ai_messages WHERE conversation_id = ANY(ARRAY(\
                 SELECT conversation_id FROM ai_messages WHERE id = ANY($1))) \
                 ORDER BY conversation_id, created_at, id"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .persistent(false)
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

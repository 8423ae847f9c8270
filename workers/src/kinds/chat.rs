//! `chat`: answers the question a user asked in a conversation. The reply is stored under an id
//! derived from the job (a rerun never adds a second one) and the job's cost is the reply's
//! actual usage, priced by the catalog; the job settles that, at most what it reserved.

use serde_json::{Value, json};
use tally_workflows::chat;

use crate::{
    ai::{AiError, ChatMessage, ChatRequest, Services},
    context::{JobContext, JobFailure},
};

pub async fn run(
    input: Value,
    ctx: &mut JobContext,
    ai: &Services,
) -> Result<(Value, Option<i64>), JobFailure> {
    let field = |name: &str| {
        input
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| JobFailure::Fatal(format!("chat input has no {name}")))
    };
    let conversation = field("conversation_id")?;
    let model_id = field("model")?;
    let max_tokens = input
        .get("max_tokens")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    let temperature = input
        .get("temperature")
        .and_then(Value::as_f64)
        .map(|t| t as f32);
    let model = ai.catalog.get(&model_id).ok_or_else(|| {
        JobFailure::Fatal(format!("model {model_id:?} is no longer in the catalog"))
    })?;
    // A reply stored by an earlier attempt that died before finishing: charge it, do not ask
    // (and pay the provider) again.
    if let Some(reply) = chat::reply_of(ctx.db(), ctx.job_id()).await? {
        let (i, o) = (
            u64::try_from(reply.input_tokens.unwrap_or(0)).unwrap_or(0),
            u64::try_from(reply.output_tokens.unwrap_or(0)).unwrap_or(0),
        );
        let credits = model.chat_cost(i, o);
        return Ok((
            json!({
                "conversation_id": conversation,
                "message_id": reply.id,
                "provider": reply.provider,
                "usage": { "input_tokens": i, "output_tokens": o },
                "credits": credits,
            }),
            Some(credits),
        ));
    }
    let history = match chat::history_for(ctx.db(), &conversation, ctx.job_id()).await {
        Ok(h) => h,
        Err(tally_workflows::DbError::Corrupt(why)) => return Err(JobFailure::Fatal(why)),
        Err(e) => return Err(e.into()),
    };
    ctx.checkpoint().await?;
    let request = ChatRequest {
        model: model_id.clone(),
        messages: history
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect(),
        temperature,
        max_tokens,
    };
    let reply = match ai.providers.chat(&request).await {
        Ok(reply) => reply,
        Err(AiError::Retryable(e)) => return Err(JobFailure::Retryable(e)),
        Err(e @ (AiError::Rejected(_) | AiError::NoProvider(_))) => {
            return Err(JobFailure::Fatal(e.to_string()));
        }
    };
    let (input_tokens, output_tokens) = (reply.usage.input_tokens, reply.usage.output_tokens);
    let credits = model.chat_cost(input_tokens, output_tokens);
    let stored = chat::Message {
        id: String::new(),
        conversation_id: conversation.clone(),
        role: "assistant".to_owned(),
        // Postgres cannot store NUL; nothing else is changed.
        content: reply.content.replace('\0', ""),
        job_id: None,
        model: Some(reply.model),
        provider: Some(reply.provider.clone()),
        input_tokens: i64::try_from(input_tokens).ok(),
        output_tokens: i64::try_from(output_tokens).ok(),
        created_at: 0,
    };
    let stored = chat::reply_message(&conversation, ctx.job_id(), stored);
    match &ai.replies {
        Some(batch) => batch.call(stored).await?,
        None => chat::store_replies(ctx.db(), vec![stored])
            .await
            .map(|_| ())?,
    }
    Ok((
        json!({
            "conversation_id": conversation,
            "message_id": format!("{}:reply", ctx.job_id()),
            "provider": reply.provider,
            "usage": { "input_tokens": input_tokens, "output_tokens": output_tokens },
            "credits": credits,
        }),
        Some(credits),
    ))
}

//! `chat`: answers the question a user asked in a conversation. The reply is stored under an id
//! derived from the job, in the transaction that records the job's success and settles its
//! cost (the reply's actual usage, priced by the catalog, at most what it reserved): a reply
//! exists exactly when it was paid for.

use serde_json::{Value, json};
use tally_workflows::chat;

use crate::{
    ai::{ChatMessage, ChatRequest, Services},
    context::{JobContext, JobFailure},
};

pub async fn run(
    input: Value,
    ctx: &mut JobContext,
    ai: &Services,
    prefetched: super::Prefetched,
) -> Result<(Value, Option<i64>), JobFailure> {
    let conversation = super::text_field(&input, "chat", "conversation_id")?;
    let model_id = super::text_field(&input, "chat", "model")?;
    let max_tokens = super::u32_field(&input, "max_tokens");
    let temperature = input
        .get("temperature")
        .and_then(Value::as_f64)
        .map(|t| t as f32);
    let model = ai.catalog.get(&model_id).ok_or_else(|| {
        JobFailure::Fatal(format!("model {model_id:?} is no longer in the catalog"))
    })?;
    // The reply is stored with the outcome that pays for it, so a job that can run again has
    // none. A reply found anyway (stored by a Tally release that wrote replies before their
    // outcome) is charged, not asked for again. A first attempt cannot have one.
    let earlier = if ctx.attempt > 1 {
        chat::reply_of(ctx.db(), ctx.job_id()).await?
    } else {
        None
    };
    if let Some(reply) = earlier {
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
    // Read while the job was claimed; read now if that was not done or failed.
    let history = match (prefetched, &ai.histories) {
        (super::Prefetched::History(Ok(history)), _) => history,
        (_, Some(batch)) => batch.call(ctx.job_id().to_owned()).await?,
        (_, None) => chat::histories_for(ctx.db(), vec![ctx.job_id().to_owned()])
            .await?
            .pop()
            .flatten(),
    }
    .ok_or_else(|| JobFailure::Fatal("the question is missing from its conversation".to_owned()))?;
    // No cancel check here: the claim that started this attempt just refused cancelled jobs.
    let request = ChatRequest {
        model: model_id.clone(),
        messages: history
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect(),
        temperature,
        max_tokens,
    };
    let reply = ai
        .providers
        .chat(&request)
        .await
        .map_err(super::provider_failure)?;
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
    ctx.store_on_success(stored);
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

//! `chat`: answers the question a user asked in a conversation. The reply is stored under an id
//! derived from the job, in the transaction that records the job's success and settles its
//! cost (the reply's actual usage, priced by the catalog, at most what it reserved): a reply
//! exists exactly when it was paid for.

use serde_json::json;
use tally_workflows::{
    DbError,
    chat::{self, ChatInput, Messages},
    kinds::Kind,
};

use super::{Prefetched, Ran, Runner};
use crate::{
    ai::{ChatMessage, ChatRequest, Services},
    context::{JobContext, JobFailure},
};

pub struct Chat;

/// What a chat job reads first: its conversation up to its question.
type History = Result<Option<Vec<chat::Message>>, DbError>;

impl Runner for Chat {
    type Input = ChatInput;

    fn kind(&self) -> &'static Kind {
        &chat::KIND
    }

    async fn prefetch(&self, job_id: &str, ai: &Services) -> Prefetched {
        let histories = ai.histories.as_ref()?;
        let history: History = histories.call(job_id.to_owned()).await;
        Some(Box::new(history))
    }

    async fn run(
        &self,
        input: ChatInput,
        ctx: &mut JobContext,
        ai: &Services,
        prefetched: Prefetched,
    ) -> Result<Ran, JobFailure> {
        answer(input, ctx, ai, prefetched).await
    }
}

async fn answer(
    input: ChatInput,
    ctx: &mut JobContext,
    ai: &Services,
    prefetched: Prefetched,
) -> Result<Ran, JobFailure> {
    let ChatInput {
        conversation_id: conversation,
        model: model_id,
        max_tokens,
        temperature,
    } = input;
    let max_tokens = Some(max_tokens);
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
        return Ok(Ran::charged(
            json!({
                "conversation_id": conversation,
                "message_id": reply.id,
                "provider": reply.provider,
                "usage": { "input_tokens": i, "output_tokens": o },
                "credits": credits,
            }),
            credits,
        ));
    }
    // Read while the job was claimed; read now if that was not done or failed.
    let read: Option<History> = prefetched
        .and_then(|p| p.downcast::<History>().ok())
        .map(|h| *h);
    let history = match (read, &ai.histories) {
        (Some(Ok(history)), _) => history,
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
    let message_id = stored.id.clone();
    ctx.on_success().row::<Messages>(stored);
    Ok(Ran::charged(
        json!({
            "conversation_id": conversation,
            "message_id": message_id,
            "provider": reply.provider,
            "usage": { "input_tokens": input_tokens, "output_tokens": output_tokens },
            "credits": credits,
        }),
        credits,
    ))
}

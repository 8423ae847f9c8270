//! `agent`: works a goal through in steps: a plan (one step per line, at most the task's
//! budget), each planned step, and a summary. Every step holds its estimate, calls the model,
//! and is stored with the settlement of its actual usage; a resumed task skips stored steps.
//! A cancel is honoured between steps.

use serde_json::json;
use tally_workflows::{
    agents::{self, AgentInput, Step, Task},
    kinds::Kind,
};

use super::{Prefetched, Ran, Runner};
use crate::{
    ai::{AiError, ChatMessage, ChatRequest, Services, tokens},
    context::{JobContext, JobFailure},
};

pub struct Agent;

impl Runner for Agent {
    type Input = AgentInput;

    fn kind(&self) -> &'static Kind {
        &agents::KIND
    }

    async fn run(
        &self,
        input: AgentInput,
        ctx: &mut JobContext,
        ai: &Services,
        _: Prefetched,
    ) -> Result<Ran, JobFailure> {
        work(input, ctx, ai).await
    }
}

async fn work(input: AgentInput, ctx: &mut JobContext, ai: &Services) -> Result<Ran, JobFailure> {
    let max_tokens = input.max_tokens.unwrap_or(256);
    let task = agents::get(ctx.db(), ctx.job_id())
        .await?
        .ok_or_else(|| JobFailure::Fatal("the agent task is missing".to_owned()))?;
    let mut done = agents::steps(ctx.db(), &task.id).await?;

    // The plan is step 0; its lines are the steps.
    if done.is_empty() {
        let prompt = format!(
            "Plan how to reach this goal in at most {} steps. Reply with one short step per line, nothing else.\nGoal: {}",
            task.max_steps, task.goal
        );
        let step = ask(ctx, ai, &task, 0, "plan", "Plan", prompt, max_tokens).await?;
        done.push(step);
    }
    let plan: Vec<String> = done[0]
        .output
        .lines()
        .map(|l| {
            l.trim()
                .trim_start_matches(['-', '*', ' '])
                .trim()
                .to_owned()
        })
        .filter(|l| !l.is_empty())
        .take(usize::try_from(task.max_steps).unwrap_or(0).max(1))
        .collect();
    let total = plan.len() as i32 + 2;
    for (i, title) in plan.iter().enumerate() {
        let idx = i as i32 + 1;
        if done.iter().any(|s| s.idx == idx) {
            continue;
        }
        ctx.progress(json!({ "step": idx, "of": total, "title": title }))
            .await?;
        let so_far: String = done
            .iter()
            .filter(|s| s.kind == "step")
            .map(|s| format!("- {}: {}\n", s.title, s.output))
            .collect();
        let prompt = format!(
            "Goal: {}\nDone so far:\n{so_far}Now do this step and reply with its result: {title}",
            task.goal
        );
        let step = ask(ctx, ai, &task, idx, "step", title, prompt, max_tokens).await?;
        done.push(step);
    }
    let last = total - 1;
    if !done.iter().any(|s| s.idx == last) {
        ctx.progress(json!({ "step": last, "of": total, "title": "Summary" }))
            .await?;
        let results: String = done
            .iter()
            .filter(|s| s.kind == "step")
            .map(|s| format!("- {}: {}\n", s.title, s.output))
            .collect();
        let prompt = format!(
            "Goal: {}\nStep results:\n{results}Summarise the outcome for the user.",
            task.goal
        );
        let step = ask(
            ctx, ai, &task, last, "summary", "Summary", prompt, max_tokens,
        )
        .await?;
        done.push(step);
    }
    // A hold an earlier attempt left when it died mid-step goes back now.
    agents::release_pending(ctx.db(), &task.id).await?;
    let credits: i64 = done.iter().map(|s| s.credits).sum();
    let summary = done.last().map(|s| s.output.clone()).unwrap_or_default();
    // Each step settled its own credits: the job itself holds none.
    Ok(Ran::plain(
        json!({ "steps": done.len(), "summary": summary, "credits": credits }),
    ))
}

/// One durable step: hold the estimate, call the model, store the step with its settlement.
#[allow(clippy::too_many_arguments)]
async fn ask(
    ctx: &mut JobContext,
    ai: &Services,
    task: &Task,
    idx: i32,
    kind: &str,
    title: &str,
    prompt: String,
    max_tokens: u32,
) -> Result<Step, JobFailure> {
    ctx.checkpoint().await?;
    let model = ai.catalog.get(&task.model).ok_or_else(|| {
        JobFailure::Fatal(format!(
            "model {:?} is no longer in the catalog",
            task.model
        ))
    })?;
    let messages = vec![ChatMessage::new("user", prompt)];
    let estimate = model.chat_cost(tokens::count_messages(&messages), u64::from(max_tokens));
    let run = ctx.run_id().to_owned();
    agents::hold(ctx.db(), task, idx, &run, estimate)
        .await
        .map_err(|e| match e {
            tally_workflows::ledger::LedgerError::Db(e) => JobFailure::Db(e),
            other => JobFailure::Fatal(format!("step {idx}: {other}")),
        })?;
    let request = ChatRequest {
        model: task.model.clone(),
        messages,
        temperature: None,
        max_tokens: Some(max_tokens),
    };
    let reply = match ai.providers.chat(&request).await {
        Ok(reply) => reply,
        Err(e) => {
            agents::release(ctx.db(), &task.id, idx, &run).await?;
            return Err(match e {
                AiError::Retryable(m) => JobFailure::Retryable(format!("step {idx}: {m}")),
                other => JobFailure::Fatal(format!("step {idx}: {other}")),
            });
        }
    };
    let step = Step {
        task_id: task.id.clone(),
        idx,
        kind: kind.to_owned(),
        title: title.to_owned(),
        // Postgres cannot store NUL; nothing else is changed.
        output: reply.content.replace('\0', ""),
        provider: reply.provider,
        input_tokens: i64::try_from(reply.usage.input_tokens).unwrap_or(i64::MAX),
        output_tokens: i64::try_from(reply.usage.output_tokens).unwrap_or(i64::MAX),
        // What is settled: the usage, at most the hold.
        credits: model
            .chat_cost(reply.usage.input_tokens, reply.usage.output_tokens)
            .min(estimate),
        created_at: tally_workflows::now_ms(),
    };
    agents::finish_step(ctx.db(), &step, &run).await?;
    Ok(step)
}

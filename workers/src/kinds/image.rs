//! `image`: generates images, writes their bytes to the image folder and records them. File
//! names and ids derive from the job, so a rerun rewrites the same files and adds no rows. The
//! job's cost is the number of images actually made, at the model's price.

use serde_json::json;
use tally_workflows::{
    images::{self, Image, ImageInput},
    kinds::Kind,
};

use super::{Prefetched, Ran, Runner};
use crate::{
    ai::{ImageRequest, Services},
    context::{JobContext, JobFailure},
};

pub struct ImageKind;

impl Runner for ImageKind {
    type Input = ImageInput;

    fn kind(&self) -> &'static Kind {
        &images::KIND
    }

    async fn run(
        &self,
        input: ImageInput,
        ctx: &mut JobContext,
        ai: &Services,
        _: Prefetched,
    ) -> Result<Ran, JobFailure> {
        generate(input, ctx, ai).await
    }
}

async fn generate(
    input: ImageInput,
    ctx: &mut JobContext,
    ai: &Services,
) -> Result<Ran, JobFailure> {
    let ImageInput {
        prompt,
        model: model_id,
        size,
        n,
        user_id,
    } = input;
    let model = ai.catalog.get(&model_id).ok_or_else(|| {
        JobFailure::Fatal(format!("model {model_id:?} is no longer in the catalog"))
    })?;
    // Images an earlier attempt stored before it died: charge them, do not generate (and pay
    // the provider) again.
    let stored = images::of_job(ctx.db(), ctx.job_id()).await?;
    if !stored.is_empty() {
        let credits = model.image_cost(u32::try_from(stored.len()).unwrap_or(u32::MAX));
        return Ok(Ran::charged(
            json!({
                "images": stored.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
                "provider": stored[0].provider,
                "credits": credits,
            }),
            credits,
        ));
    }
    ctx.checkpoint().await?;
    let request = ImageRequest {
        model: model_id.clone(),
        prompt: prompt.clone(),
        size: size.clone(),
        n,
    };
    let reply = ai
        .providers
        .image(&request)
        .await
        .map_err(super::provider_failure)?;
    let ext = match reply.content_type.as_str() {
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        _ => "png",
    };
    tokio::fs::create_dir_all(&ai.image_dir)
        .await
        .map_err(|e| JobFailure::Retryable(format!("{}: {e}", ai.image_dir.display())))?;
    let mut made = Vec::with_capacity(reply.images.len());
    for (i, bytes) in reply.images.iter().enumerate() {
        let id = Image::id_for(ctx.job_id(), i);
        let file = format!("{id}.{ext}");
        // Write then rename: a reader never sees half an image.
        let tmp = ai.image_dir.join(format!(".{file}.tmp"));
        let path = ai.image_dir.join(&file);
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| JobFailure::Retryable(format!("{}: {e}", tmp.display())))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| JobFailure::Retryable(format!("{}: {e}", path.display())))?;
        made.push(Image {
            id,
            user_id: user_id.clone(),
            job_id: ctx.job_id().to_owned(),
            model: model_id.clone(),
            provider: reply.provider.clone(),
            prompt: prompt.clone(),
            size: size.clone(),
            content_type: reply.content_type.clone(),
            bytes: bytes.len() as i64,
            file,
            created_at: 0,
        });
    }
    images::record(ctx.db(), &made).await?;
    let credits = model.image_cost(u32::try_from(made.len()).unwrap_or(u32::MAX));
    Ok(Ran::charged(
        json!({
            "images": made.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
            "provider": reply.provider,
            "credits": credits,
        }),
        credits,
    ))
}

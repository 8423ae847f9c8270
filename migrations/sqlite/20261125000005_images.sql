-- Generated images. The bytes live in the image folder (`ai.image_dir`), not the database.
CREATE TABLE ai_images (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id),
    job_id       TEXT NOT NULL,
    model        TEXT NOT NULL,
    provider     TEXT NOT NULL,
    prompt       TEXT NOT NULL,
    size         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    bytes        BIGINT NOT NULL,
    file         TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX ai_images_user ON ai_images (user_id, id DESC);
CREATE INDEX ai_images_job ON ai_images (job_id);

-- Each user's default models and generation settings.
CREATE TABLE ai_preferences (
    user_id     TEXT PRIMARY KEY REFERENCES users (id),
    chat_model  TEXT,
    image_model TEXT,
    temperature DOUBLE PRECISION,
    max_tokens  BIGINT,
    updated_at  BIGINT NOT NULL
);

-- Conversations and their messages. A message answered by a model names the job that made it.
CREATE TABLE ai_conversations (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id),
    title      TEXT NOT NULL,
    model      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX ai_conversations_user ON ai_conversations (user_id, id DESC);

CREATE TABLE ai_messages (
    id              TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES ai_conversations (id),
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT NOT NULL,
    job_id          TEXT,
    model           TEXT,
    provider        TEXT,
    input_tokens    BIGINT,
    output_tokens   BIGINT,
    created_at      BIGINT NOT NULL
);
CREATE INDEX ai_messages_conversation ON ai_messages (conversation_id, created_at, id);

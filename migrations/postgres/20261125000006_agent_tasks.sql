-- Agent tasks: a goal worked through in steps (plan, each step, summary). The task's id is the
-- id of the job that runs it. A finished step is stored with its usage in the same transaction
-- that settles its credits, so a resumed task never runs (or pays for) it again.
CREATE TABLE ai_agent_tasks (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id),
    goal       TEXT NOT NULL,
    model      TEXT NOT NULL,
    max_steps  INTEGER NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX ai_agent_tasks_user ON ai_agent_tasks (user_id, id DESC);

CREATE TABLE ai_agent_steps (
    task_id       TEXT NOT NULL REFERENCES ai_agent_tasks (id),
    idx           INTEGER NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('plan', 'step', 'summary')),
    title         TEXT NOT NULL,
    output        TEXT NOT NULL,
    provider      TEXT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    credits       BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (task_id, idx)
);

-- The platform's own accounts exist from the start, so a batch that touches them (every
-- settlement reaches `platform:revenue`) only has to lock them, never to create them first.
INSERT INTO ledger_accounts (id, balance, no_overdraft, updated_at)
VALUES
    ('platform:revenue', 0, FALSE, (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT),
    ('platform:grants', 0, FALSE, (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT),
    ('platform:bonuses', 0, FALSE, (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT),
    ('platform:adjustments', 0, FALSE, (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT)
ON CONFLICT (id) DO NOTHING;

-- The signed credit ledger. Amounts are whole credits (BIGINT); a transfer of `amount` from
-- `debit` to `credit` subtracts it from the first balance and adds it to the second, so the
-- balances always sum to zero.

CREATE TABLE ledger_accounts (
    id           TEXT PRIMARY KEY,
    balance      BIGINT NOT NULL DEFAULT 0,
    no_overdraft BOOLEAN NOT NULL,
    updated_at   BIGINT NOT NULL,
    CHECK (NOT no_overdraft OR balance >= 0)
);

-- Every transfer. `seq` is its index in the Merkle log, set when a signing process integrates it.
-- `(ord, pos)` is the order it was made in: `ord` is drawn by its batch while holding the locks
-- of every account the batch touches, `pos` is its place in the batch. Two batches that share an
-- account therefore get their `ord` in commit order, and the log follows `(ord, pos)`, so a
-- replay of the log never spends credits before they arrive.
CREATE TABLE ledger_transfers (
    id             TEXT PRIMARY KEY,
    seq            BIGINT UNIQUE,
    ord            BIGINT NOT NULL,
    pos            INTEGER NOT NULL,
    debit          TEXT NOT NULL,
    credit         TEXT NOT NULL,
    amount         BIGINT NOT NULL CHECK (amount > 0),
    kind           TEXT NOT NULL,
    user_id        TEXT,
    reservation_id TEXT,
    job_id         TEXT,
    memo           TEXT,
    created_at     BIGINT NOT NULL,
    CHECK (debit <> credit)
);
CREATE INDEX ledger_transfers_pending ON ledger_transfers (ord, pos) WHERE seq IS NULL;
CREATE INDEX ledger_transfers_user ON ledger_transfers (user_id, created_at, id);
CREATE INDEX ledger_transfers_job ON ledger_transfers (job_id) WHERE job_id IS NOT NULL;

-- SQLite has one writer at a time, so a counter row costs nothing.
CREATE TABLE ledger_order (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    next BIGINT NOT NULL
);
INSERT INTO ledger_order (id, next) VALUES (1, 0);

-- Two-phase holds: pending → settled | released | expired.
CREATE TABLE ledger_reservations (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    amount     BIGINT NOT NULL CHECK (amount > 0),
    settled    BIGINT,
    state      TEXT NOT NULL,
    job_id     TEXT,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    closed_at  BIGINT
);
CREATE INDEX ledger_reservations_expiry ON ledger_reservations (expires_at)
    WHERE state = 'pending' AND expires_at IS NOT NULL;
CREATE INDEX ledger_reservations_job ON ledger_reservations (job_id) WHERE job_id IS NOT NULL;

-- Complete subtrees of the RFC 6962 tree: node (level, idx) covers leaves
-- [idx * 2^level, (idx + 1) * 2^level). Level 0 holds the leaf hashes.
CREATE TABLE ledger_nodes (
    level INTEGER NOT NULL,
    idx   BIGINT NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
);

-- Signed checkpoints (C2SP tlog-checkpoint in a signed note).
CREATE TABLE ledger_checkpoints (
    size       BIGINT PRIMARY KEY,
    root       BLOB NOT NULL,
    note       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- The log's size: one row, locked by the integrating process.
CREATE TABLE ledger_log (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    size BIGINT NOT NULL
);
INSERT INTO ledger_log (id, size) VALUES (1, 0);

ALTER TABLE tally_jobs ADD COLUMN reservation_id TEXT;

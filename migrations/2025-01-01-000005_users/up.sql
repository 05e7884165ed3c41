-- Users of the entry API. Only a hash of each API token is kept.
CREATE TABLE users (
    name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
    token_hash TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX accounts_owner_idx ON accounts (owner);

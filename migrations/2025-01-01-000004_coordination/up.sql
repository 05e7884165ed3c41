-- Work sharing between processes: accounts flagged for reconciliation, and
-- account leases for sharding the user-data gateways.

CREATE TABLE reconcile_flags (
    account_id BIGINT PRIMARY KEY REFERENCES accounts (id),
    reason     TEXT NOT NULL,
    flagged_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX reconcile_flags_flagged_at_idx ON reconcile_flags (flagged_at);

-- expires_at is on the database clock (now()), the one clock all nodes share.
CREATE TABLE account_leases (
    account_id BIGINT PRIMARY KEY REFERENCES accounts (id),
    holder     TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX account_leases_holder_idx ON account_leases (holder);

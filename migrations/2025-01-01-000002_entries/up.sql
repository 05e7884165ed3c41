-- Entry orders, their trades and their append-only history.

CREATE SEQUENCE entry_ids;

CREATE TABLE entries (
    -- Taken from entry_ids before the insert: the client order id derives from it.
    id                BIGINT PRIMARY KEY DEFAULT nextval('entry_ids'),
    account_id        BIGINT NOT NULL REFERENCES accounts (id),
    symbol            TEXT NOT NULL,
    base_asset        TEXT NOT NULL,
    quote_asset       TEXT NOT NULL,
    client_order_id   TEXT NOT NULL,
    exchange_order_id BIGINT,
    order_type        TEXT NOT NULL,
    limit_price       NUMERIC,
    requested_qty     NUMERIC,
    requested_quote   NUMERIC,
    status            TEXT NOT NULL,
    executed_qty      NUMERIC NOT NULL DEFAULT 0,
    cumulative_quote  NUMERIC NOT NULL DEFAULT 0,
    average_price     NUMERIC GENERATED ALWAYS AS (
        CASE WHEN executed_qty > 0 THEN cumulative_quote / executed_qty END) STORED,
    base_commission   NUMERIC NOT NULL DEFAULT 0,
    fills_qty         NUMERIC NOT NULL DEFAULT 0,
    -- tp1, tp2, sl, finalSignalId, portfolioId: strings, absent when unset.
    metadata          JSONB NOT NULL DEFAULT '{}'::jsonb,
    filled_at         TIMESTAMPTZ,
    protection        TEXT NOT NULL DEFAULT 'not_needed',
    protection_reason TEXT,
    protected_at      TIMESTAMPTZ,
    protected_by      TEXT,
    realized_quote    NUMERIC,
    closed_at         TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL,
    CONSTRAINT entries_client_order_id_unique UNIQUE (client_order_id),
    CONSTRAINT entries_order_type CHECK (
        (order_type = 'market' AND limit_price IS NULL)
        OR (order_type = 'limit' AND limit_price IS NOT NULL AND limit_price > 0)),
    CONSTRAINT entries_size_one_of CHECK ((requested_qty IS NULL) <> (requested_quote IS NULL)),
    CONSTRAINT entries_status CHECK (status IN
        ('pending_new', 'new', 'partially_filled', 'filled', 'canceled', 'expired', 'rejected')),
    CONSTRAINT entries_amounts_not_negative CHECK (
        executed_qty >= 0 AND cumulative_quote >= 0 AND base_commission >= 0 AND fills_qty >= 0),
    -- protected_at/protected_by stay once set (history); the state decides what they mean.
    CONSTRAINT entries_protection CHECK (
        protection IN ('not_needed', 'unprotected', 'closed')
        OR (protection = 'protected' AND protected_at IS NOT NULL AND protected_by IS NOT NULL)
        OR (protection IN ('unprotectable', 'exited') AND protection_reason IS NOT NULL)),
    CONSTRAINT entries_protected_by CHECK (protected_by IN ('websocket', 'sync', 'direct'))
);

CREATE INDEX entries_account_idx ON entries (account_id);
CREATE INDEX entries_metadata_gin ON entries USING GIN (metadata);

CREATE TABLE fills (
    account_id       BIGINT NOT NULL REFERENCES accounts (id),
    symbol           TEXT NOT NULL,
    trade_id         BIGINT NOT NULL,
    entry_id         BIGINT NOT NULL REFERENCES entries (id),
    price            NUMERIC NOT NULL,
    qty              NUMERIC NOT NULL,
    commission       NUMERIC NOT NULL,
    commission_asset TEXT NOT NULL,
    traded_at        TIMESTAMPTZ NOT NULL,
    CONSTRAINT fills_trade_unique PRIMARY KEY (account_id, symbol, trade_id),
    CONSTRAINT fills_amounts CHECK (price > 0 AND qty >= 0)
);

CREATE INDEX fills_entry_idx ON fills (entry_id);

CREATE TABLE entry_events (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entry_id BIGINT NOT NULL REFERENCES entries (id),
    kind     TEXT NOT NULL,
    detail   TEXT NOT NULL,
    source   TEXT CHECK (source IN ('websocket', 'sync', 'direct')),
    at       TIMESTAMPTZ NOT NULL
);

CREATE INDEX entry_events_entry_idx ON entry_events (entry_id, id);

-- The history is append-only: updates and deletes are refused.
CREATE FUNCTION entry_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'entry_events is append-only (% refused)', TG_OP;
END;
$$;

CREATE TRIGGER entry_events_append_only
    BEFORE UPDATE OR DELETE ON entry_events
    FOR EACH ROW EXECUTE FUNCTION entry_events_append_only();

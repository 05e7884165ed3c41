-- Protective OCOs ("legs"): claimed before they are sent, one per entry + leg + generation.

CREATE TABLE protection_legs (
    entry_id              BIGINT NOT NULL REFERENCES entries (id),
    leg                   SMALLINT NOT NULL CHECK (leg IN (1, 2)),
    generation            INTEGER NOT NULL CHECK (generation >= 0),
    list_client_id        TEXT NOT NULL,
    take_profit_client_id TEXT NOT NULL,
    stop_loss_client_id   TEXT NOT NULL,
    -- orderListId once the exchange acknowledged it; kept when the leg moves on.
    order_list_id         BIGINT,
    symbol                TEXT NOT NULL,
    qty                   NUMERIC NOT NULL CHECK (qty >= 0),
    take_profit_price     NUMERIC NOT NULL CHECK (take_profit_price > 0),
    stop_price            NUMERIC NOT NULL CHECK (stop_price > 0),
    stop_limit_price      NUMERIC CHECK (stop_limit_price > 0),
    state                 TEXT NOT NULL,
    -- not_placed: exchange code (may be null) and reason; unprotectable: reason.
    not_placed_code       INTEGER,
    state_reason          TEXT,
    -- canceled_externally: how it ended.
    external_end          TEXT,
    sold_take_profit      NUMERIC NOT NULL DEFAULT 0,
    sold_take_profit_quote NUMERIC NOT NULL DEFAULT 0,
    sold_stop_loss        NUMERIC NOT NULL DEFAULT 0,
    sold_stop_loss_quote  NUMERIC NOT NULL DEFAULT 0,
    source                TEXT NOT NULL CHECK (source IN ('websocket', 'sync', 'direct')),
    attempts              INTEGER NOT NULL DEFAULT 1,
    last_error            TEXT,
    claimed_at            TIMESTAMPTZ NOT NULL,
    updated_at            TIMESTAMPTZ NOT NULL,
    CONSTRAINT protection_legs_pkey PRIMARY KEY (entry_id, leg, generation),
    CONSTRAINT protection_legs_list_client_id_unique UNIQUE (list_client_id),
    CONSTRAINT protection_legs_state CHECK (
        (state IN ('claimed', 'unknown', 'take_profit_filled', 'stop_loss_filled', 'replaced')
            AND not_placed_code IS NULL AND state_reason IS NULL AND external_end IS NULL)
        OR (state = 'placed' AND order_list_id IS NOT NULL
            AND not_placed_code IS NULL AND state_reason IS NULL AND external_end IS NULL)
        OR (state = 'not_placed' AND state_reason IS NOT NULL AND external_end IS NULL)
        OR (state = 'unprotectable' AND state_reason IS NOT NULL
            AND not_placed_code IS NULL AND external_end IS NULL)
        OR (state = 'canceled_externally'
            AND external_end IN ('canceled', 'stop_expired', 'take_profit_partial')
            AND not_placed_code IS NULL AND state_reason IS NULL))
);

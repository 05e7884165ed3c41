//! Diesel's view of the tables in `migrations/`, written in `diesel print-schema`'s
//! shape; keep it in step with the SQL (the migration test reads it back).
#![allow(missing_docs)]

diesel::table! {
    accounts (id) {
        id -> Int8,
        owner -> Text,
        exchange -> Text,
        api_key -> Text,
        secret_ciphertext -> Bytea,
        tp1_pct -> Nullable<Numeric>,
        tp2_pct -> Nullable<Numeric>,
        sl_pct -> Nullable<Numeric>,
        split -> Numeric,
        stop_kind -> Text,
        stop_offset_pct -> Nullable<Numeric>,
        late_policy -> Text,
        active -> Bool,
        created_at -> Timestamptz,
        version -> Int8,
    }
}

diesel::table! {
    secret_key_check (id) {
        id -> Int2,
        check_blob -> Bytea,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    entries (id) {
        id -> Int8,
        account_id -> Int8,
        symbol -> Text,
        base_asset -> Text,
        quote_asset -> Text,
        client_order_id -> Text,
        exchange_order_id -> Nullable<Int8>,
        order_type -> Text,
        limit_price -> Nullable<Numeric>,
        requested_qty -> Nullable<Numeric>,
        requested_quote -> Nullable<Numeric>,
        status -> Text,
        executed_qty -> Numeric,
        cumulative_quote -> Numeric,
        average_price -> Nullable<Numeric>,
        base_commission -> Numeric,
        fills_qty -> Numeric,
        metadata -> Jsonb,
        filled_at -> Nullable<Timestamptz>,
        protection -> Text,
        protection_reason -> Nullable<Text>,
        protected_at -> Nullable<Timestamptz>,
        protected_by -> Nullable<Text>,
        realized_quote -> Nullable<Numeric>,
        closed_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        fees -> Jsonb,
        fees_complete -> Bool,
        idempotency_key -> Nullable<Text>,
    }
}

diesel::table! {
    fills (account_id, symbol, trade_id) {
        account_id -> Int8,
        symbol -> Text,
        trade_id -> Int8,
        entry_id -> Int8,
        price -> Numeric,
        qty -> Numeric,
        commission -> Numeric,
        commission_asset -> Text,
        traded_at -> Timestamptz,
    }
}

diesel::table! {
    entry_events (id) {
        id -> Int8,
        entry_id -> Int8,
        kind -> Text,
        detail -> Text,
        source -> Nullable<Text>,
        at -> Timestamptz,
    }
}

diesel::table! {
    protection_legs (entry_id, leg, generation) {
        entry_id -> Int8,
        leg -> Int2,
        generation -> Int4,
        list_client_id -> Text,
        take_profit_client_id -> Text,
        stop_loss_client_id -> Text,
        order_list_id -> Nullable<Int8>,
        symbol -> Text,
        qty -> Numeric,
        take_profit_price -> Numeric,
        stop_price -> Numeric,
        stop_limit_price -> Nullable<Numeric>,
        state -> Text,
        not_placed_code -> Nullable<Int4>,
        state_reason -> Nullable<Text>,
        external_end -> Nullable<Text>,
        sold_take_profit -> Numeric,
        sold_take_profit_quote -> Numeric,
        sold_stop_loss -> Numeric,
        sold_stop_loss_quote -> Numeric,
        source -> Text,
        attempts -> Int4,
        last_error -> Nullable<Text>,
        claimed_at -> Timestamptz,
        updated_at -> Timestamptz,
        traded_take_profit -> Numeric,
        traded_stop_loss -> Numeric,
        fees -> Jsonb,
    }
}

diesel::table! {
    leg_trades (account_id, symbol, trade_id) {
        account_id -> Int8,
        symbol -> Text,
        trade_id -> Int8,
        entry_id -> Int8,
        leg -> Int2,
        generation -> Int4,
        side -> Text,
        price -> Numeric,
        qty -> Numeric,
        commission -> Numeric,
        commission_asset -> Text,
        traded_at -> Timestamptz,
    }
}

diesel::table! {
    reconcile_flags (account_id) {
        account_id -> Int8,
        reason -> Text,
        flagged_at -> Timestamptz,
    }
}

diesel::table! {
    account_leases (account_id) {
        account_id -> Int8,
        holder -> Text,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    reconcile_schedule (account_id) {
        account_id -> Int8,
        last_reconciled_at -> Nullable<Timestamptz>,
        taken_by -> Nullable<Text>,
        taken_until -> Nullable<Timestamptz>,
        retry_at -> Nullable<Timestamptz>,
        retry_written_at -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(entries -> accounts (account_id));
diesel::joinable!(fills -> entries (entry_id));
diesel::joinable!(entry_events -> entries (entry_id));
diesel::joinable!(protection_legs -> entries (entry_id));
diesel::joinable!(leg_trades -> accounts (account_id));
diesel::joinable!(reconcile_flags -> accounts (account_id));
diesel::joinable!(account_leases -> accounts (account_id));
diesel::joinable!(reconcile_schedule -> accounts (account_id));

diesel::allow_tables_to_appear_in_same_query!(
    accounts,
    secret_key_check,
    entries,
    fills,
    entry_events,
    protection_legs,
    leg_trades,
    reconcile_flags,
    account_leases,
    reconcile_schedule,
);

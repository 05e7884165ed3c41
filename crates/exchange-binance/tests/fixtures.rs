//! Every recorded payload in `shared/binance/fixtures` goes through the
//! adapter's parsers; a fixture added later without a check here fails the
//! `every_fixture_is_checked` test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use exchange_binance::error::{Op, map_code};
use exchange_binance::wire::{
    AccountWire, ApiErrorBody, Decoded, ExchangeInfo, Filter, ListCancelWire, OrderListWire,
    OrderWire, SymbolInfo, TradeWire, WsFrame, decode_event, from_json,
};
use oco_core::ports::{Side, StreamEvent};
use oco_core::state::LegSold;
use oco_core::symbol::OrderTypes;
use oco_core::{EntryStatus, ExchangeError};
use rust_decimal_macros::dec;
use serde_json::Value;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/binance/fixtures"
);

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{DIR}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn value(name: &str) -> Value {
    serde_json::from_str(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn event(name: &str, v: Value) -> Decoded {
    decode_event(v).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The inner event of an enveloped (`event`), legacy combined (`data`) or bare payload.
fn inner(v: Value) -> Value {
    if let Some(e) = v.get("event") {
        e.clone()
    } else if let Some(d) = v.get("data") {
        d.clone()
    } else {
        v
    }
}

fn execution(name: &str) -> oco_core::ports::ExecutionUpdate {
    match event(name, inner(value(name))) {
        Decoded::Event(StreamEvent::Execution(u)) => u,
        other => panic!("{name}: {other:?}"),
    }
}

/// Checks one fixture; returns false for a file this test does not know.
fn check(name: &str) -> bool {
    match name {
        // ---------------------------------------------------------------- errors
        n if n.ends_with(".json") && n.contains("error") && !n.starts_with("ws_") => {
            let body: ApiErrorBody = from_json(&read(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
            let write = map_code(Op::Write, body.code, &body.msg);
            let expected_ok = match body.code {
                -1003 | -1015 => matches!(write, ExchangeError::RateLimited { .. }),
                -1007 => {
                    matches!(write, ExchangeError::UnknownOutcome(_))
                        && matches!(
                            map_code(Op::Read, body.code, &body.msg),
                            ExchangeError::Transient(_)
                        )
                }
                -1021 => matches!(write, ExchangeError::Transient(_)),
                -1022 => matches!(write, ExchangeError::Auth(_)),
                -2013 | -2018 => write == ExchangeError::NotFound,
                code => {
                    write
                        == ExchangeError::Rejected {
                            code: i32::try_from(code).unwrap_or(0),
                            msg: body.msg.clone(),
                        }
                }
            };
            assert!(expected_ok, "{n}: mapped to {write:?}");
            // The domain's predicates read Binance's words.
            if n.contains("duplicate") {
                assert!(write.is_duplicate());
            }
            if n.contains("insufficient") {
                assert!(write.is_insufficient_balance());
            }
            if n.contains("bad_prices")
                || n.contains("trigger_immediately")
                || n.contains("match_and_take")
            {
                assert!(write.is_bad_prices(), "{n}");
            }
            if n.contains("max_num") {
                assert!(write.is_stop_budget(), "{n}");
            }
        }
        "ws_api_error_-1003_418_banned.json" => {
            let f: WsFrame = from_json(&read(name)).unwrap();
            assert_eq!(f.status, Some(418));
            let e = f.error.unwrap();
            assert_eq!(e.code, -1003);
            assert_eq!(e.data.unwrap().retry_after, Some(1_659_146_400_000));
        }
        "ws_api_error_-2015_session_revoked.json" => {
            let f: WsFrame = from_json(&read(name)).unwrap();
            assert!(f.id.is_none_or(|v| v.is_null()), "id is null");
            let e = f.error.unwrap();
            assert!(matches!(
                map_code(Op::Read, e.code, &e.msg),
                ExchangeError::Auth(_)
            ));
        }
        "ws_api_response_error_-2010.json" => {
            let f: WsFrame = from_json(&read(name)).unwrap();
            let e = f.error.unwrap();
            assert!(map_code(Op::Write, e.code, &e.msg).is_insufficient_balance());
        }
        // ---------------------------------------------------------------- exchangeInfo
        "DERIVED_exchange_info_btcusdt.json" => {
            let info: ExchangeInfo = from_json(&read(name)).unwrap();
            let r = info.symbols[0].to_rules().unwrap();
            assert_eq!(r.symbol.name, "BTCUSDT");
            assert_eq!(r.symbol.base.0, "BTC");
            assert!(r.trading && r.oco_allowed);
            assert_eq!(r.tick.get(), dec!(0.01));
            assert_eq!(r.min_price.unwrap().get(), dec!(0.01));
            assert_eq!(r.max_price.unwrap().get(), dec!(1000000));
            assert_eq!(r.step.get(), dec!(0.00001));
            assert_eq!(r.min_qty.get(), dec!(0.00001));
            assert_eq!(r.max_qty.unwrap().get(), dec!(9000));
            assert_eq!(r.min_notional, dec!(5));
            assert_eq!(r.max_notional, Some(dec!(9000000)));
            let pp = r.percent_price_by_side.unwrap();
            assert_eq!(
                (pp.ask_up, pp.ask_down, pp.bid_up, pp.bid_down),
                (dec!(5), dec!(0.2), dec!(5), dec!(0.2))
            );
            assert_eq!(r.max_num_orders, Some(200));
            assert_eq!(r.max_num_algo_orders, Some(5));
            assert_eq!(r.max_num_order_lists, Some(20));
            // LIMIT, LIMIT_MAKER, MARKET, STOP_LOSS_LIMIT, TAKE_PROFIT_LIMIT:
            // no market stop (STOP_LOSS) on BTCUSDT.
            assert_eq!(r.order_types, OrderTypes::MAJOR);
            assert!(!r.order_types.stop_loss);
            // Market orders stop far below LOT_SIZE's 9000; stepSize and
            // minQty 0 are disabled, not a zero grid.
            let m = r.market_lot_size.unwrap();
            assert_eq!(m.max_qty.unwrap().get(), dec!(128.52621715));
            assert_eq!((m.min_qty, m.step), (None, None));
        }
        "exchange_info_skeleton.json" => {
            // The official skeleton lists no filters: parsed, but no usable rules.
            let info: ExchangeInfo = from_json(&read(name)).unwrap();
            assert_eq!(info.symbols[0].symbol, "ETHBTC");
            assert!(info.symbols[0].to_rules().is_err());
            // The documentation's example symbol lists every order type.
            let names = info.symbols[0].order_types.as_deref().unwrap_or_default();
            let types = OrderTypes::from_names(names.iter().map(String::as_str));
            assert_eq!(types, OrderTypes::ALL);
        }
        "ws_exchange_info_response.json" => {
            let f: WsFrame = from_json(&read(name)).unwrap();
            let info: ExchangeInfo = serde_json::from_value(f.result.unwrap()).unwrap();
            let r = info.symbols[0].to_rules().unwrap();
            assert_eq!(r.symbol.name, "BNBBTC");
            assert_eq!(r.min_notional, dec!(0), "no NOTIONAL filter in this sample");
            assert_eq!(r.order_types, OrderTypes::MAJOR, "no STOP_LOSS listed");
        }
        "filters_examples_assembled.json" => {
            let v = value(name);
            let filters: Vec<Filter> = serde_json::from_value(v["filters"].clone()).unwrap();
            assert!(
                filters.iter().any(|f| matches!(f, Filter::Other)),
                "unknown filters tolerated"
            );
            let sym = SymbolInfo {
                symbol: "X".into(),
                status: "CANCEL_ONLY".into(),
                base_asset: "A".into(),
                quote_asset: "B".into(),
                oco_allowed: true,
                order_types: None,
                filters,
            };
            let r = sym.to_rules().unwrap();
            assert!(!r.trading, "an unknown status is tolerated and not trading");
            assert_eq!(
                r.order_types,
                OrderTypes::MAJOR,
                "no orderTypes: no market stop"
            );
            assert_eq!(r.min_notional, dec!(10), "NOTIONAL wins over MIN_NOTIONAL");
            assert_eq!(r.percent_price_by_side.unwrap().ask_down, dec!(0.8));
            assert_eq!(r.max_num_orders, Some(25));
            let m = r.market_lot_size.unwrap();
            assert_eq!(
                (m.min_qty.unwrap().get(), m.max_qty.unwrap().get()),
                (dec!(0.001), dec!(100000))
            );
            assert_eq!(m.step.unwrap().get(), dec!(0.001));
        }
        // ---------------------------------------------------------------- orders
        "order_result_response.json" | "order_query_response.json" => {
            let o: OrderWire = from_json(&read(name)).unwrap();
            let s = o.to_snapshot().unwrap();
            assert!(s.order_id > 0 && !s.client_id.is_empty());
        }
        "order_full_response_market_buy_expired_partial.json" => {
            let o: OrderWire = from_json(&read(name)).unwrap();
            let s = o.to_snapshot().unwrap();
            assert_eq!(s.status, EntryStatus::Expired);
            assert_eq!(s.executed_qty.get(), dec!(4));
            assert_eq!(s.fills.len(), 2);
            assert_eq!(s.fills[1].trade_id, 8);
            assert_eq!(s.fills[1].commission_asset.0, "BNB");
        }
        "order_full_response.json" => {
            // This file holds a 24 h ticker, not an order (SOURCES.md says
            // "POST /api/v3/order, FULL"): strict parsing refuses it.
            assert!(from_json::<OrderWire>(&read(name)).is_err());
            assert!(value(name).get("lastPrice").is_some());
        }
        "order_ack_response.json" => {
            // ACK answers lack the state; the adapter always asks for RESULT/FULL.
            assert!(from_json::<OrderWire>(&read(name)).is_err());
        }
        "order_cancel_response.json" => {
            let o: OrderWire = from_json(&read(name)).unwrap();
            assert_eq!(
                o.own_client_id(),
                "myOrder1",
                "the order's id, not the cancel's"
            );
            assert_eq!(o.to_snapshot().unwrap().status, EntryStatus::Canceled);
        }
        "open_orders_response.json" => {
            let v: Vec<OrderWire> = from_json(&read(name)).unwrap();
            assert!(!v.is_empty());
            v.iter().for_each(|o| drop(o.to_snapshot().unwrap()));
        }
        "ws_api_response_success.json" => {
            let f: WsFrame = from_json(&read(name)).unwrap();
            let o: OrderWire = serde_json::from_value(f.result.unwrap()).unwrap();
            assert_eq!(o.to_snapshot().unwrap().status, EntryStatus::New);
        }
        "my_trades_response.json" => {
            let v: Vec<TradeWire> = from_json(&read(name)).unwrap();
            let f = v[0].to_fill().unwrap();
            assert_eq!(
                (f.trade_id, f.qty.get(), f.commission),
                (28457, dec!(12), dec!(10.1))
            );
        }
        "account_response.json" => {
            let a: AccountWire = from_json(&read(name)).unwrap();
            let b = a.to_balances().unwrap();
            assert_eq!(b[0].asset, "BTC");
            assert_eq!(b[0].free.get(), dec!(4723846.89208129));
        }
        // ---------------------------------------------------------------- order lists
        "oco_orderlist_oco_response.json" => {
            let l: OrderListWire = from_json(&read(name)).unwrap();
            // Legs identified by client id, whatever their position.
            let ack = l
                .to_ack("NuMp0nVYnciDiFmVqfpBqK", "44nZvqpemY7sVYgPYbvPih")
                .unwrap();
            assert_eq!(
                (ack.list_id, ack.take_profit_order_id, ack.stop_order_id),
                (1, 11, 10)
            );
            let s = l.to_snapshot(None, None).unwrap();
            assert!(s.executing);
            assert_eq!(s.stop_loss.unwrap().client_id, "44nZvqpemY7sVYgPYbvPih");
            assert_eq!(s.take_profit.unwrap().client_id, "NuMp0nVYnciDiFmVqfpBqK");
        }
        "oco_legacy_order_oco_response.json" | "ws_api_orderlist_place_oco_response.json" => {
            let text = read(name);
            let l: OrderListWire = match from_json::<WsFrame>(&text) {
                Ok(WsFrame {
                    result: Some(r), ..
                }) => serde_json::from_value(r).unwrap(),
                _ => from_json(&text).unwrap(),
            };
            let s = l.to_snapshot(None, None).unwrap();
            assert!(s.take_profit.is_some() && s.stop_loss.is_some(), "{name}");
        }
        "orderlist_query_response.json" => {
            let l: OrderListWire = from_json(&read(name)).unwrap();
            let s = l.to_snapshot(None, None).unwrap();
            assert_eq!((s.list_id, s.executing), (27, true));
            assert!(s.take_profit.is_none(), "GET orderList carries no reports");
        }
        "orderlist_cancel_response.json" => {
            let l: OrderListWire = from_json(&read(name)).unwrap();
            let s = l.to_snapshot(None, None).unwrap();
            assert!(!s.executing);
            let sl = s.stop_loss.unwrap();
            assert_eq!(sl.client_id, "pO9ufTiFGg3nw2fOdgeOXa", "the leg's own id");
            assert_eq!(sl.status, EntryStatus::Canceled);
            // What each order had executed, by type, never by position.
            let sold = |v: Value| {
                serde_json::from_value::<ListCancelWire>(v)
                    .unwrap()
                    .to_sold()
                    .unwrap()
            };
            assert_eq!(sold(value(name)), Some(LegSold::default()));
            // The same answer for a list whose take-profit (the second
            // report) had sold 4 of its 10 before the cancel, its stop
            // expired by that fill.
            let mut v = value(name);
            v["orderReports"][1]["executedQty"] = "4.00000000".into();
            v["orderReports"][1]["cummulativeQuoteQty"] = "12.00000000".into();
            v["orderReports"][0]["status"] = "EXPIRED".into();
            let s = sold(v.clone()).unwrap();
            assert_eq!(
                (
                    s.take_profit.get(),
                    s.take_profit_quote,
                    s.stop_loss.get(),
                    s.stop_loss_quote
                ),
                (dec!(4), dec!(12), dec!(0), dec!(0))
            );
            // An answer that does not report both orders says nothing.
            v["orderReports"].as_array_mut().unwrap().pop();
            assert_eq!(sold(v), None);
        }
        "open_orderlist_response.json" | "all_orderlist_response.json" => {
            let v: Vec<OrderListWire> = from_json(&read(name)).unwrap();
            assert!(!v.is_empty());
            v.iter()
                .for_each(|l| drop(l.to_snapshot(None, None).unwrap()));
        }
        // ---------------------------------------------------------------- user data events
        "ws_execution_report_new.json" | "legacy_execution_report_new_unwrapped.json" => {
            let u = execution(name);
            assert_eq!(
                (u.status, u.side, u.fill.is_none()),
                (EntryStatus::New, Side::Buy, true)
            );
        }
        "ws_execution_report_market_new_raw.json" => {
            assert_eq!(execution(name).status, EntryStatus::New);
        }
        "ws_execution_report_trade_partial_1_raw.json"
        | "ws_execution_report_trade_partial_2_raw.json" => {
            let u = execution(name);
            assert_eq!(u.status, EntryStatus::PartiallyFilled);
            let f = u.fill.unwrap();
            assert_eq!(
                (f.qty.get(), f.commission, f.commission_asset.0.as_str()),
                (dec!(2), dec!(0.001), "BNB")
            );
        }
        "ws_execution_report_expired_raw.json" => {
            let u = execution(name);
            assert_eq!(
                (u.status, u.executed_qty.get()),
                (EntryStatus::Expired, dec!(4))
            );
            assert!(u.fill.is_none());
        }
        "THIRDPARTY_execution_report_trade_filled_base_commission.json" => {
            let u = execution(name);
            assert_eq!(u.status, EntryStatus::Filled);
            let f = u.fill.unwrap();
            assert_eq!(f.trade_id, 726_946_523);
            assert_eq!(
                (f.commission, f.commission_asset.0.as_str()),
                (dec!(0.00000029), "BTC")
            );
            assert_eq!(u.cumulative_quote, dec!(14.99693910));
        }
        "DERIVED_ws_execution_report_trade_filled.json" => {
            let u = execution(name);
            assert_eq!(
                (u.status, u.executed_qty.get()),
                (EntryStatus::Filled, dec!(4))
            );
            assert_eq!(u.fill.unwrap().trade_id, 8);
        }
        "ws_sequence_market_buy_partial_then_expired_raw.json" => {
            let Value::Array(items) = value(name) else {
                panic!("{name}: not an array")
            };
            let decoded: Vec<Decoded> = items.into_iter().map(|v| event(name, v)).collect();
            let fills = decoded
                .iter()
                .filter(
                    |d| matches!(d, Decoded::Event(StreamEvent::Execution(u)) if u.fill.is_some()),
                )
                .count();
            assert_eq!(fills, 2);
            assert!(matches!(
                decoded.last(),
                Some(Decoded::Event(StreamEvent::Balances(_)))
            ));
        }
        "ws_list_status.json" | "THIRDPARTY_list_status_oco_all_done.json" => {
            let Decoded::Event(StreamEvent::List(l)) = event(name, inner(value(name))) else {
                panic!("{name}")
            };
            assert_eq!(l.executing, name == "ws_list_status.json");
        }
        "ws_outbound_account_position.json" | "ws_outbound_account_position_market_raw.json" => {
            let Decoded::Event(StreamEvent::Balances(b)) = event(name, inner(value(name))) else {
                panic!("{name}")
            };
            assert!(!b.is_empty());
        }
        "ws_balance_update.json"
        | "ws_external_lock_update.json"
        | "legacy_listen_key_expired.json" => {
            assert!(
                matches!(event(name, inner(value(name))), Decoded::Ignored(_)),
                "{name}"
            );
        }
        "ws_server_shutdown.json" | "ws_event_stream_terminated.json" => {
            let f: WsFrame = from_json(&read(name)).unwrap();
            assert!(matches!(
                event(name, f.event.unwrap()),
                Decoded::Reconnect(_)
            ));
        }
        // ---------------------------------------------------------------- WebSocket API plumbing
        "ws_api_user_data_stream_subscribe_signature_request.json" => {
            let v = value(name);
            assert_eq!(v["method"], "userDataStream.subscribe.signature");
            let keys: BTreeSet<&str> = v["params"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(keys, BTreeSet::from(["apiKey", "signature", "timestamp"]));
        }
        "ws_api_user_data_stream_subscribe_signature_response.json"
        | "ws_api_user_data_stream_subscribe_response.json" => {
            // No `rateLimits` here: the adapter must not require it.
            let f: WsFrame = from_json(&read(name)).unwrap();
            assert_eq!(f.status, Some(200));
            assert_eq!(f.result.unwrap()["subscriptionId"], 0);
        }
        "ws_api_user_data_stream_subscribe_request.json"
        | "ws_api_user_data_stream_unsubscribe_response.json"
        | "ws_api_session_subscriptions_response.json"
        | "ws_api_session_logon_request.json"
        | "ws_api_session_logon_response.json"
        | "ws_api_orderlist_place_oco_request.json" => {
            // Requests and answers the adapter does not send or expect; they
            // must still read as frames without an event or an error.
            let f: WsFrame = from_json(&read(name)).unwrap();
            assert!(f.event.is_none() && f.error.is_none(), "{name}");
        }
        "legacy_listen_key_create_response.json" => {
            // The listenKey flow is retired; nothing parses it any more.
            assert!(value(name).get("listenKey").is_some());
        }
        _ => return false,
    }
    true
}

#[test]
fn every_fixture_is_checked() {
    let mut unknown = Vec::new();
    let mut n = 0;
    for entry in std::fs::read_dir(DIR).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.ends_with(".json") {
            continue;
        }
        n += 1;
        if !check(&name) {
            unknown.push(name);
        }
    }
    assert!(n >= 70, "fixtures not found at {DIR}");
    assert!(unknown.is_empty(), "fixtures without a check: {unknown:?}");
}

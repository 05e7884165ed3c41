//! The loop: startup pass after the delay, flagged accounts within 2 s.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use std::time::{Duration, Instant};

use common::*;
use oco_core::model::{EntryKind, Protection};
use oco_core::ports::{Clock, Store};
use rust_decimal_macros::dec;
use tokio::sync::oneshot;

#[tokio::test]
async fn a_flagged_account_is_reconciled_within_two_seconds() {
    let w = world();
    let a = w.account("k1").await;
    let mut c = config();
    // No periodic pass during the test: only the flag can trigger the work.
    c.startup_delay = Duration::from_secs(3600);
    c.interval = Duration::from_secs(3600);
    c.flag_poll = Duration::from_millis(250);
    let sync = w.reconciler(c);
    let (stop, stopped) = oneshot::channel::<()>();
    let runner = sync.run(async {
        let _ = stopped.await;
    });
    let scenario = async {
        let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        let flagged_at = Instant::now();
        let protected = wait_until(Duration::from_secs(2), || async {
            matches!(
                w.store.entry(id).await.unwrap().protection,
                Protection::Protected { .. }
            )
        })
        .await;
        let took = flagged_at.elapsed();
        let _ = stop.send(());
        (protected, took)
    };
    let ((), (protected, took)) = tokio::join!(runner, scenario);
    assert!(protected, "not protected within 2 s of the flag");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(w.open_qty("k1"), dec!(1));
    let m = sync.metrics();
    assert_eq!(m.flagged_taken, 1);
    assert_eq!(m.passes, 0, "no full pass ran");
}

/// A ring of the flag bell takes the flags at once: with a poll that never
/// comes again, the flagged account waits until the bell rings.
#[tokio::test]
async fn the_flag_bell_takes_the_flags_before_the_next_poll() {
    let w = world();
    let a = w.account("k1").await;
    // The loop polls once as it starts, then not for an hour.
    let sync = w.reconciler(flags_only(Duration::from_secs(3600)));
    let (before, after) = while_running(&sync, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        // Without a ring, nothing takes the flag.
        let before = protected_within(&w, id, Duration::from_millis(500)).await;
        sync.flag_bell().notify_one();
        (
            before,
            protected_within(&w, id, Duration::from_secs(2)).await,
        )
    })
    .await;
    assert!(!before, "protected before the bell rang: the poll took it");
    assert!(after, "not protected within 2 s of the ring");
    assert_eq!(sync.metrics().flagged_taken, 1);
}

/// A burst of flags (a failover flags every account of a gateway) is taken
/// batch after batch on one ring, not a batch per poll.
#[tokio::test]
async fn a_burst_of_flags_is_taken_whole_on_one_ring() {
    let w = world();
    let mut accounts = Vec::new();
    for i in 0..100 {
        accounts.push(w.account(&format!("k{i}")).await);
    }
    let c = flags_only(Duration::from_secs(3600));
    let batch = c.concurrency.max(1) * 4;
    assert!(
        accounts.len() > 2 * batch,
        "a burst larger than two batches"
    );
    let sync = w.reconciler(c);
    let all = while_running(&sync, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for a in &accounts {
            w.store
                .flag_reconcile(a.id, "stream opened", w.clock.now())
                .await
                .unwrap();
        }
        sync.flag_bell().notify_one();
        wait_until(Duration::from_secs(5), || async {
            sync.metrics().flagged_taken == 100
        })
        .await
    })
    .await;
    assert!(all, "taken {} of 100", sync.metrics().flagged_taken);
    assert!(w.store.take_flagged(1000).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_first_full_pass_follows_the_startup_delay() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let mut c = config();
    c.startup_delay = Duration::from_millis(200);
    c.interval = Duration::from_secs(3600);
    let sync = w.reconciler(c);
    let (stop, stopped) = oneshot::channel::<()>();
    let started = Instant::now();
    let runner = sync.run(async {
        let _ = stopped.await;
    });
    let scenario = async {
        let protected = wait_until(Duration::from_secs(5), || async {
            matches!(
                w.store.entry(id).await.unwrap().protection,
                Protection::Protected { .. }
            )
        })
        .await;
        let took = started.elapsed();
        let _ = stop.send(());
        (protected, took)
    };
    let ((), (protected, took)) = tokio::join!(runner, scenario);
    assert!(
        protected,
        "cold start: the fill is protected by the startup pass"
    );
    assert!(
        took >= Duration::from_millis(200),
        "not before the delay: {took:?}"
    );
    assert_eq!(sync.metrics().passes, 1);
}

/// Sync with only its flag loop live: no full pass within a test, retries
/// fast.
fn flags_only(flag_poll: Duration) -> sync::SyncConfig {
    let mut c = config();
    c.startup_delay = Duration::from_secs(3600);
    c.interval = Duration::from_secs(3600);
    c.flag_poll = flag_poll;
    c.retry.after_protection = Duration::from_millis(200);
    c.retry.after_errors = Duration::from_millis(500);
    c
}

/// Runs `sync` until `scenario` ends; what the scenario returns.
async fn while_running<T>(
    sync: &sync::Reconciler,
    scenario: impl std::future::Future<Output = T>,
) -> T {
    let (stop, stopped) = oneshot::channel::<()>();
    let runner = sync.run(async {
        let _ = stopped.await;
    });
    let scenario = async {
        let out = scenario.await;
        let _ = stop.send(());
        out
    };
    tokio::join!(runner, scenario).1
}

/// Whether entry `id` is protected within `limit`.
async fn protected_within(w: &World, id: oco_core::EntryId, limit: Duration) -> bool {
    wait_until(limit, || async {
        matches!(
            w.store.entry(id).await.unwrap().protection,
            Protection::Protected { .. }
        )
    })
    .await
}

/// The work came from one flag and the retries it led to, never a full pass.
fn one_flag_and_no_pass(sync: &sync::Reconciler) {
    let m = sync.metrics();
    assert_eq!(m.flagged_taken, 1, "one flag; the retries did the rest");
    assert_eq!(m.passes, 0, "no full pass ran");
}

/// Sends a MARKET entry of `k1` that nobody protected, flags the account
/// under a flags-only sync and waits up to 5 s for the entry's protection.
/// Returns the reconciler and whether it was protected.
async fn flag_and_wait(w: &World, flag_poll: Duration) -> (sync::Reconciler, bool) {
    let a = w.account("k1").await;
    let sync = w.reconciler(flags_only(flag_poll));
    let protected = while_running(&sync, async {
        let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        protected_within(w, id, Duration::from_secs(5)).await
    })
    .await;
    (sync, protected)
}

#[tokio::test]
async fn a_flagged_account_whose_reconcile_fails_is_retried_after_a_backoff() {
    let w = world();
    // The first reconcile fails once on its first read; the flag it took must not be lost.
    w.exchange.fail_open_lists(
        1,
        oco_core::ExchangeError::Transient("connection reset".into()),
    );
    let (sync, protected) = flag_and_wait(&w, Duration::from_millis(250)).await;
    assert!(
        protected,
        "the failed reconcile was retried and the retry protected it"
    );
    assert_eq!(
        w.exchange.calls("k1", "open_order_lists"),
        2,
        "one failed read, one retry"
    );
    one_flag_and_no_pass(&sync);
}

#[tokio::test]
async fn a_refused_protection_is_retried_after_a_backoff_not_at_the_next_pass() {
    let w = world();
    // One of the two lists is refused for a reason a retry can overcome.
    w.fake.push_oco_fault(oco_core::testing::OcoFault::Fail(
        oco_core::ExchangeError::Transient("503 service unavailable".into()),
    ));
    let (sync, protected) = flag_and_wait(&w, Duration::from_millis(100)).await;
    assert!(protected, "the refused half was protected on a retry");
    assert_eq!(w.open_qty("k1"), dec!(1), "the whole position is covered");
    one_flag_and_no_pass(&sync);
}

#[tokio::test]
async fn a_claim_left_by_a_dead_claimant_is_retried_until_it_goes_stale() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    // Another process claimed the first leg and died before sending it.
    let key = oco_core::LegKey {
        entry: id,
        leg: oco_core::LegIndex::First,
        generation: 0,
    };
    let won = w
        .store
        .claim_legs(&[oco_core::model::LegClaim {
            key,
            ids: w.ids.oco(key).unwrap(),
            symbol: "BTCUSDT".into(),
            qty: q(dec!(0.5)),
            take_profit: p(dec!(101)),
            stop: p(dec!(99)),
            stop_limit: None,
            source: oco_core::model::Source::Direct,
            at: w.clock.now(),
        }])
        .await
        .unwrap();
    assert_eq!(won, vec![true]);
    let mut c = flags_only(Duration::from_millis(50));
    c.retry.after_protection = Duration::from_millis(100);
    c.retry.max = Duration::from_millis(200);
    let sync = w.reconciler(c);
    let (before, protected) = while_running(&sync, async {
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        // While the claim is fresh, sync finds it in flight and places nothing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = w.fake.oco_calls();
        // The claim goes stale (the claim timeout is 30 s on the protector's clock).
        w.clock.advance(Duration::from_secs(31));
        (
            before,
            protected_within(&w, id, Duration::from_secs(5)).await,
        )
    })
    .await;
    assert_eq!(before, 0, "nothing sent over a fresh claim");
    assert!(
        protected,
        "the stale claim was resolved and the entry protected"
    );
    assert_eq!(w.open_qty("k1"), dec!(1));
    one_flag_and_no_pass(&sync);
}

/// A list canceled by hand while nobody listened, whose lookup lags its end
/// (the exchange reads lists from a database): after the flagged pass its
/// leg still reads placed, and `protect` counts its coins covered. That pass
/// is no reconciliation: a retry looks the list up again and the coins get a
/// stop, not at the next full pass.
#[tokio::test]
async fn a_list_gone_whose_lookup_lags_its_end_is_looked_up_again_on_a_retry() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(flags_only(Duration::from_millis(50)));
    sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(w.open_qty("k1"), dec!(1));
    let gone = w.store.legs(id).await.unwrap().remove(0);
    w.fake.cancel_externally(gone.ids.list.as_str());
    w.fake.lag_next_lookups(1);
    let again = while_running(&sync, async {
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        wait_until(Duration::from_secs(5), || async {
            w.open_qty("k1") == dec!(1)
        })
        .await
    })
    .await;
    assert!(again, "the coins of the list canceled by hand have a stop");
    let ended = w.store.legs(id).await.unwrap();
    assert!(
        ended.iter().any(|l| l.key == gone.key
            && matches!(l.state, oco_core::LegState::CanceledExternally { .. })),
        "{ended:?}"
    );
    one_flag_and_no_pass(&sync);
}

/// While a lookup has not shown the end of a list that left the book, its
/// stop counts as gone: the pass that finds it does not label the entry
/// protected for it, and says why in its history.
#[tokio::test]
async fn a_list_gone_whose_end_is_unread_leaves_the_entry_labelled_unprotected() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(flags_only(Duration::from_millis(50)));
    sync.reconcile_account(a.id).await.unwrap();
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
    let gone = w.store.legs(id).await.unwrap().remove(0);
    w.fake.cancel_externally(gone.ids.list.as_str());
    w.fake.lag_next_lookups(100);
    let report = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(report.lists_unread, vec![gone.key]);
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        !matches!(entry.protection, Protection::Protected { .. }),
        "{entry:?}"
    );
    let history = w.store.events(id).await.unwrap();
    assert_eq!(
        history
            .iter()
            .filter(|e| e.kind == oco_core::protect::LIST_END_UNREAD)
            .count(),
        1,
        "{history:?}"
    );
    // Said once per list, however often the pass finds it unread.
    sync.reconcile_account(a.id).await.unwrap();
    let history = w.store.events(id).await.unwrap();
    assert_eq!(
        history
            .iter()
            .filter(|e| e.kind == oco_core::protect::LIST_END_UNREAD)
            .count(),
        1
    );
}

#[tokio::test]
async fn a_refusal_that_persists_is_retried_a_bounded_number_of_times() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    for _ in 0..100 {
        w.fake.push_oco_fault(oco_core::testing::OcoFault::Fail(
            oco_core::ExchangeError::Rejected {
                code: -2010,
                msg: "This symbol is not permitted for this account.".into(),
            },
        ));
    }
    let mut c = flags_only(Duration::from_millis(20));
    c.retry.after_protection = Duration::from_millis(20);
    c.retry.max = Duration::from_millis(40);
    c.retry.attempts = 3;
    let sync = w.reconciler(c);
    while_running(&sync, async {
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        // Far longer than the three retries take.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    })
    .await;
    assert!(!matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
    // The flagged pass and three retries, each sending its two lists.
    assert_eq!(
        w.fake.oco_calls(),
        8,
        "retries stop after the configured attempts"
    );
}

/// An account with many entries to protect under a tight order budget takes
/// a while; a flag of another account set meanwhile is not held up by it.
#[tokio::test]
async fn a_slow_account_does_not_hold_up_the_flag_of_another() {
    let w = world();
    let slow = w.account("slow").await;
    for _ in 0..4 {
        w.sent_entry(&slow, EntryKind::Market, dec!(0.1)).await;
    }
    let quick = w.account("quick").await;
    let mut c = flags_only(Duration::from_millis(50));
    // One protection (two lists, four orders at most) per account per 10 s:
    // the slow account's pass takes 30 s.
    c.order_budget_per_10s = 4;
    let sync = w.reconciler(c);
    let (slow_started, quick_protected) = while_running(&sync, async {
        w.store
            .flag_reconcile(slow.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        let slow_started = wait_until(Duration::from_secs(2), || async {
            w.open_qty("slow") > dec!(0)
        })
        .await;
        let id = w.sent_entry(&quick, EntryKind::Market, dec!(1)).await;
        w.store
            .flag_reconcile(quick.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        (
            slow_started,
            protected_within(&w, id, Duration::from_secs(2)).await,
        )
    })
    .await;
    assert!(slow_started, "the slow account's pass began");
    assert!(
        quick_protected,
        "the other account's flag waited behind the slow account"
    );
    assert!(
        w.open_qty("slow") < dec!(0.4),
        "the slow pass was still going"
    );
}

/// A flag taken while the account's breaker is open is not dropped: the
/// account is reconciled once the breaker lets a trial pass through.
#[tokio::test]
async fn a_flag_taken_while_the_breaker_is_open_is_reconciled_when_it_closes() {
    let w = world();
    let a = w.account("k1").await;
    let mut c = flags_only(Duration::from_millis(50));
    c.breaker.open_for = Duration::from_millis(800);
    let sync = w.reconciler(c);
    // A resting entry: a pass has something to ask the exchange.
    w.sent_entry(&a, EntryKind::Limit { price: p(dec!(90)) }, dec!(1))
        .await;
    let (opened, protected) = while_running(&sync, async {
        // Refused keys open the breaker at once.
        w.exchange.revoke("k1");
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        let opened = wait_until(Duration::from_secs(2), || async {
            !sync.open_breakers().is_empty()
        })
        .await;
        // The keys work again; a fill comes and is flagged while the breaker is open.
        w.exchange.restore("k1");
        let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        (
            opened,
            protected_within(&w, id, Duration::from_secs(4)).await,
        )
    })
    .await;
    assert!(opened, "the refused keys opened the breaker");
    assert!(protected, "the flag was dropped by the open breaker");
    assert!(sync.open_breakers().is_empty(), "the trial pass closed it");
    assert_eq!(sync.metrics().passes, 0, "no full pass ran");
}

/// An acknowledged entry the exchange no longer knows is an error that
/// persists: after its retries the account is left to one pass per
/// interval, not a new series of retries every interval.
#[tokio::test]
async fn an_account_whose_retries_ran_out_is_not_retried_again_every_interval() {
    let w = world();
    let a = w.account("k1").await;
    forgotten_entry(&w, &a).await;
    let mut c = config();
    c.startup_delay = Duration::ZERO;
    c.interval = Duration::from_millis(400);
    c.due_poll = Duration::from_millis(20);
    c.flag_poll = Duration::from_millis(20);
    c.retry.after_errors = Duration::from_millis(20);
    c.retry.max = Duration::from_millis(40);
    c.retry.attempts = 2;
    let sync = w.reconciler(c);
    let (early, late) = while_running(&sync, async {
        // The first pass and its two retries take about 100 ms.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let early = w.exchange.calls("k1", "query_order");
        tokio::time::sleep(Duration::from_millis(2000)).await;
        (early, w.exchange.calls("k1", "query_order") - early)
    })
    .await;
    assert!(early >= 3, "the first pass and its retries ran: {early}");
    // Five intervals: one pass each, and some slack for a slow machine.
    assert!(
        late <= 7,
        "{late} passes in 2 s: the retries started again every interval"
    );
    assert!(
        late >= 3,
        "the account is still reconciled every interval: {late}"
    );
}

/// Once the retries ran out, a change of the account's entries (a new one)
/// starts them again.
#[tokio::test]
async fn ran_out_retries_start_again_when_the_entries_change() {
    let w = world();
    let a = w.account("k1").await;
    forgotten_entry(&w, &a).await;
    let mut c = flags_only(Duration::from_millis(20));
    c.retry.after_errors = Duration::from_millis(20);
    c.retry.max = Duration::from_millis(40);
    c.retry.attempts = 2;
    let sync = w.reconciler(c);
    let calls = || w.exchange.calls("k1", "query_order");
    let (first, unchanged, changed) = while_running(&sync, async {
        let flag = || async {
            w.store
                .flag_reconcile(a.id, "stream gap", w.clock.now())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        flag().await;
        let first = calls();
        flag().await;
        let unchanged = calls() - first;
        w.sent_entry(&a, EntryKind::Limit { price: p(dec!(90)) }, dec!(1))
            .await;
        let before = calls();
        flag().await;
        (first, unchanged, calls() - before)
    })
    .await;
    assert_eq!(first, 3, "the flagged pass and two retries");
    assert_eq!(unchanged, 1, "nothing changed: the flag's pass alone");
    // Each pass looks up both entries: the flagged pass and two retries.
    assert_eq!(changed, 6, "a new entry starts the retries again");
}

/// Once the retries ran out over an entry the exchange no longer knows, a
/// new failure of another entry (a list of it canceled by hand, its
/// replacement refused by a 503) gets retries of its own, not one pass per
/// interval: the entries' figures did not change, the reasons did.
#[tokio::test]
async fn a_new_failing_entry_is_retried_after_another_ran_out_of_retries() {
    let w = world();
    let a = w.account("k1").await;
    forgotten_entry(&w, &a).await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let mut c = flags_only(Duration::from_millis(20));
    c.retry.after_errors = Duration::from_millis(20);
    c.retry.max = Duration::from_millis(40);
    c.retry.attempts = 2;
    let sync = w.reconciler(c);
    let (first, covered) = while_running(&sync, async {
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        // The flagged pass protects the fill; it and two retries report the
        // forgotten entry, and the retries run out.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let first = w.exchange.calls("k1", "query_order");
        let gone = w.store.legs(id).await.unwrap().remove(0);
        w.fake.cancel_externally(gone.ids.list.as_str());
        w.fake.push_oco_fault(oco_core::testing::OcoFault::Fail(
            oco_core::ExchangeError::Transient("503 service unavailable".into()),
        ));
        w.store
            .flag_reconcile(a.id, "stream gap", w.clock.now())
            .await
            .unwrap();
        let covered = wait_until(Duration::from_secs(2), || async {
            w.open_qty("k1") == dec!(1)
        })
        .await;
        (first, covered)
    })
    .await;
    // Both entries looked up by the flagged pass, the forgotten one alone
    // (the other filled) by each retry.
    assert_eq!(first, 4, "the flagged pass and two retries");
    assert!(
        covered,
        "the refused replacement waited for the interval behind the forgotten entry"
    );
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
}

/// A pass that read the account before another process's pass of it failed
/// and deferred it completes after that: its mark keeps the retry, which
/// is due after its backoff, not an interval later.
#[tokio::test]
async fn a_pass_that_began_before_a_retry_was_written_keeps_it() {
    let w = world();
    let a = w.account("k1").await;
    // Something to read: a pass of an account with nothing open asks nothing.
    w.sent_entry(&a, EntryKind::Limit { price: p(dec!(90)) }, dec!(1))
        .await;
    let sync = w.reconciler(config());
    let bell = w.exchange.hold_next_open_lists();
    let other_failed = async {
        // This pass is reading the account.
        assert!(
            wait_until(Duration::from_secs(2), || async {
                w.exchange.calls("k1", "open_order_lists") == 1
            })
            .await
        );
        // Another process's pass of the account leaves work undone.
        w.store.defer_reconcile(a.id, Duration::ZERO).await.unwrap();
        bell.notify_one();
    };
    let (report, ()) = tokio::join!(sync.pass(), other_failed);
    let report = report.unwrap();
    assert_eq!(report.reconciled.len(), 1, "{report:?}");
    assert!(report.reconciled[0].entry_errors.is_empty(), "{report:?}");
    let hour = Duration::from_secs(3600);
    assert_eq!(
        w.store.take_due_retries("sync-b", hour, 10).await.unwrap(),
        [a.id],
        "the other process's retry was cleared by a pass that began before it"
    );
}

/// An entry the exchange acknowledged once and no longer knows: every pass
/// reports it as an entry error.
async fn forgotten_entry(w: &World, a: &Acct) -> oco_core::EntryId {
    let id = w
        .sent_entry(a, EntryKind::Limit { price: p(dec!(90)) }, dec!(1))
        .await;
    let entry = w.store.entry(id).await.unwrap();
    w.store
        .record_evidence(
            id,
            &oco_core::Evidence {
                order_id: Some(1),
                status: oco_core::EntryStatus::New,
                executed_qty: oco_core::Qty::ZERO,
                cumulative_quote: rust_decimal::Decimal::ZERO,
                fills: Vec::new(),
                holding: None,
                observed_at: w.clock.now(),
            },
        )
        .await
        .unwrap();
    w.exchange
        .fail_queries_of(entry.client_id.as_str(), oco_core::ExchangeError::NotFound);
    id
}

//! Notifications on connections of their own (outside the pool).
//!
//! - Waking a reconcile worker at once when an account is flagged:
//!   `flag_reconcile` sends `NOTIFY oco_reconcile, '<account id>'` in the
//!   same statement that stores the flag, and [`ReconcileListener`] receives
//!   it.
//! - Reading a new entry ahead of its fill: `create_entry` announces each
//!   new entry on `oco_entry` once it is committed, and [`learn_announced_entries`] reads those of the
//!   accounts the process follows.
//!
//! Notifications are a wake-up, not a queue: one sent while no listener was
//! connected is lost, so a worker still takes flags with
//! [`Store::take_flagged`](oco_core::Store::take_flagged) after each wake-up
//! and on a timer, and an entry not read ahead is read at its fill.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::stream::{self, StreamExt as _};
use oco_core::{AccountId, EntryId, StoreError};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::{debug, warn};

use crate::store::PgStore;

/// The channel `flag_reconcile` notifies; the payload is the account id.
pub const RECONCILE_CHANNEL: &str = "oco_reconcile";

/// A live `LISTEN oco_reconcile` connection.
pub struct ReconcileListener {
    rx: mpsc::UnboundedReceiver<Result<AccountId, StoreError>>,
    // Dropping the client closes the connection and ends its task.
    _client: tokio_postgres::Client,
}

impl std::fmt::Debug for ReconcileListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconcileListener").finish_non_exhaustive()
    }
}

impl ReconcileListener {
    /// The next flagged account.
    ///
    /// # Errors
    /// `Unavailable` once the connection is lost (flags may have been missed:
    /// take them with `take_flagged`, then listen again); `Corrupt` for a
    /// payload that is not an account id.
    pub async fn recv(&mut self) -> Result<AccountId, StoreError> {
        match self.rx.recv().await {
            Some(item) => item,
            None => Err(StoreError::Unavailable(
                "reconcile listener connection closed".to_owned(),
            )),
        }
    }
}

impl PgStore {
    /// Opens a connection that listens for reconcile flags.
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached.
    pub async fn listen_reconcile(&self) -> Result<ReconcileListener, StoreError> {
        let (client, rx) = self
            .listen_on(RECONCILE_CHANNEL, "reconcile flags", |payload| {
                payload.parse().map(AccountId).map_err(|_| {
                    StoreError::Corrupt(format!("reconcile notification payload '{payload}'"))
                })
            })
            .await?;
        Ok(ReconcileListener {
            rx,
            _client: client,
        })
    }

    /// A connection of its own (outside the pool) that listens on `channel`;
    /// each notification's payload is read with `parse`. The receiver ends
    /// with an `Unavailable` error when the connection is lost.
    async fn listen_on<T: Send + 'static>(
        &self,
        channel: &'static str,
        what: &'static str,
        parse: fn(&str) -> Result<T, StoreError>,
    ) -> Result<
        (
            tokio_postgres::Client,
            mpsc::UnboundedReceiver<Result<T, StoreError>>,
        ),
        StoreError,
    > {
        let unavailable = |e: tokio_postgres::Error| {
            StoreError::Unavailable(format!("connecting to listen for {what}: {e}"))
        };
        let mut config: tokio_postgres::Config = self.url().parse().map_err(unavailable)?;
        // The connection only ever reads: without keepalives, a server gone
        // without closing it (a host lost, a partition) would leave it waiting
        // for hours while notifications go unheard. These notice it in about 25 s.
        config
            .connect_timeout(LISTEN_CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(25));
        let (client, mut connection) = config.connect(NoTls).await.map_err(unavailable)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let item = match message {
                    Ok(AsyncMessage::Notification(n)) if n.channel() == channel => {
                        parse(n.payload())
                    }
                    Ok(_) => continue,
                    Err(e) => Err(StoreError::Unavailable(format!("{what} listener: {e}"))),
                };
                let failed = matches!(item, Err(StoreError::Unavailable(_)));
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(|e| StoreError::Unavailable(format!("listening for {what}: {e}")))?;
        Ok((client, rx))
    }

    /// Opens a connection that listens for new entries (announced by
    /// `create_entry` once committed).
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached.
    pub async fn listen_entries(&self) -> Result<EntryListener, StoreError> {
        let (client, rx) = self
            .listen_on(ENTRY_CHANNEL, "new entries", parse_entry_payload)
            .await?;
        Ok(EntryListener {
            rx,
            _client: client,
        })
    }
}

/// `'<account id> <entry id>'`, as `create_entry` announces it.
fn parse_entry_payload(payload: &str) -> Result<(AccountId, EntryId), StoreError> {
    let corrupt = || StoreError::Corrupt(format!("new entry notification payload '{payload}'"));
    let (account, entry) = payload.split_once(' ').ok_or_else(corrupt)?;
    Ok((
        AccountId(account.parse().map_err(|_| corrupt())?),
        EntryId(entry.parse().map_err(|_| corrupt())?),
    ))
}

/// The channel every new entry is announced on, with the payload
/// `'<account id> <entry id>'`: after its commit, in a later transaction
/// that announces up to 255 others with it, best effort
/// (`PgStore::create_entry`).
pub const ENTRY_CHANNEL: &str = "oco_entry";

/// A live `LISTEN oco_entry` connection.
pub struct EntryListener {
    rx: mpsc::UnboundedReceiver<Result<(AccountId, EntryId), StoreError>>,
    // Dropping the client closes the connection and ends its task.
    _client: tokio_postgres::Client,
}

impl std::fmt::Debug for EntryListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryListener").finish_non_exhaustive()
    }
}

impl EntryListener {
    /// The next new entry, with its account.
    ///
    /// # Errors
    /// `Unavailable` once the connection is lost (entries announced since
    /// are read at their fills); `Corrupt` for a payload that is not two ids.
    pub async fn recv(&mut self) -> Result<(AccountId, EntryId), StoreError> {
        match self.rx.recv().await {
            Some(item) => item,
            None => Err(StoreError::Unavailable(
                "new entry listener connection closed".to_owned(),
            )),
        }
    }
}

/// Entries announced and waiting to be read ahead of their fills; past it,
/// announcements are dropped (those entries are read at their fills).
const LEARN_QUEUE: usize = 1024;

/// Reads of announced entries at once: each holds a connection of the pool
/// that the fills' own reads use, and must leave them the most of it.
const LEARN_READERS: usize = 2;

/// Reads every new entry of an account `store`'s process follows (see
/// [`Store::following`](oco_core::Store::following)) as it is announced,
/// ahead of its fill ([`PgStore::learn_announced`]), on a `LISTEN`
/// connection of its own that the task opens again whenever it is lost,
/// after a backoff of 250 ms doubling to 30 s. At most
/// [`LEARN_READERS`] reads run at once, so that a burst of new entries does
/// not take the connections their fills need; announcements beyond
/// [`LEARN_QUEUE`] waiting are dropped.
///
/// Only a gateway gains from it: its fills are the ones written from what
/// was read. An entry announced while the connection is down, or dropped,
/// is read at its fill, as without this task. Runs until the guard is
/// dropped.
#[must_use = "the task ends when the guard is dropped"]
pub fn learn_announced_entries(store: Arc<PgStore>) -> EntryLearner {
    let listening = Arc::new(AtomicBool::new(false));
    let up = listening.clone();
    let (queue, queued) = mpsc::channel::<(AccountId, EntryId)>(LEARN_QUEUE);
    let queued = Arc::new(tokio::sync::Mutex::new(queued));
    let readers: Vec<JoinHandle<()>> = (0..LEARN_READERS)
        .map(|_| {
            let (store, queued) = (store.clone(), queued.clone());
            tokio::spawn(async move {
                loop {
                    // One reader waits on the queue at a time; the others on the lock.
                    let next = queued.lock().await.recv().await;
                    let Some((account, entry)) = next else { break };
                    if let Err(err) = store.learn_announced(account, entry).await {
                        debug!(account = %account, entry = %entry, error = %err, "new entry not read ahead of its fill");
                    }
                }
            })
        })
        .collect();
    let task = tokio::spawn(async move {
        let mut wait = RELISTEN_FIRST;
        loop {
            match store.listen_entries().await {
                Ok(mut listener) => {
                    wait = RELISTEN_FIRST;
                    up.store(true, Ordering::Relaxed);
                    loop {
                        match listener.recv().await {
                            // Only the accounts followed here; the others' are not ours to read.
                            Ok((account, entry)) if store.follows(account) => {
                                if queue.try_send((account, entry)).is_err() {
                                    debug!(account = %account, entry = %entry, "new entries queued past the bound: read at its fill");
                                }
                            }
                            Ok(_) => {}
                            Err(StoreError::Corrupt(what)) => {
                                warn!(what = %what, "unreadable new entry notification");
                            }
                            Err(err) => {
                                up.store(false, Ordering::Relaxed);
                                warn!(error = %err, "new entry listener lost: new entries are read at their fills until it is back");
                                break;
                            }
                        }
                    }
                }
                Err(err) => {
                    warn!(error = %err, retry_in_ms = wait.as_millis(), "cannot listen for new entries");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RELISTEN_MAX);
        }
    });
    EntryLearner {
        task,
        readers,
        listening,
    }
}

/// The task of [`learn_announced_entries`]; dropping it stops the task (and
/// closes its connection).
#[derive(Debug)]
pub struct EntryLearner {
    task: JoinHandle<()>,
    readers: Vec<JoinHandle<()>>,
    listening: Arc<AtomicBool>,
}

impl EntryLearner {
    /// True while the task listens; false before its first `LISTEN` and
    /// from a loss until it listens again (each loss is also logged).
    pub fn listening(&self) -> Arc<AtomicBool> {
        self.listening.clone()
    }
}

impl Drop for EntryLearner {
    fn drop(&mut self) {
        self.task.abort();
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// Longest wait for the listening connection to open, as the pools' own.
const LISTEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// First wait before listening again after the connection was lost or
/// refused; doubled up to [`RELISTEN_MAX`].
const RELISTEN_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between two attempts to listen again.
const RELISTEN_MAX: Duration = Duration::from_secs(30);

/// Rings `bell` for every reconcile flag announced on `store`'s database (by
/// any process), on a `LISTEN` connection of its own that the task opens
/// again whenever it is lost, after a backoff of 250 ms doubling to 30 s.
/// It also rings once each time it starts listening: flags set while nobody
/// listened were announced to no one. Runs until aborted.
///
/// This is how `sync` reconciles a flagged account at once rather than at
/// its next poll (`sync::Reconciler::flag_bell`); the poll remains for the
/// time the connection is down. The task ends when the returned guard is
/// dropped, however its owner ends.
#[must_use = "the task ends when the guard is dropped"]
pub fn ring_on_flags(store: Arc<PgStore>, bell: Arc<Notify>) -> FlagRinger {
    let listening = Arc::new(AtomicBool::new(false));
    let up = listening.clone();
    let task = tokio::spawn(async move {
        let mut wait = RELISTEN_FIRST;
        loop {
            match store.listen_reconcile().await {
                Ok(mut listener) => {
                    wait = RELISTEN_FIRST;
                    up.store(true, Ordering::Relaxed);
                    bell.notify_one();
                    loop {
                        match listener.recv().await {
                            Ok(account) => {
                                debug!(account = %account, "reconcile flag announced");
                                bell.notify_one();
                            }
                            // Still a flag: whatever it names, the flags are taken.
                            Err(StoreError::Corrupt(what)) => {
                                warn!(what = %what, "unreadable reconcile notification");
                                bell.notify_one();
                            }
                            Err(err) => {
                                up.store(false, Ordering::Relaxed);
                                warn!(error = %err, "reconcile listener lost: flags are polled until it is back");
                                break;
                            }
                        }
                    }
                }
                Err(err) => {
                    warn!(error = %err, retry_in_ms = wait.as_millis(), "cannot listen for reconcile flags");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RELISTEN_MAX);
        }
    });
    FlagRinger { task, listening }
}

/// The task of [`ring_on_flags`]; dropping it stops the task (and closes
/// its connection).
#[derive(Debug)]
pub struct FlagRinger {
    task: JoinHandle<()>,
    listening: Arc<AtomicBool>,
}

impl FlagRinger {
    /// True while the task listens; false before its first `LISTEN` and
    /// from a loss until it listens again (flags are then only polled). For
    /// a gauge read at each scrape.
    pub fn listening(&self) -> Arc<AtomicBool> {
        self.listening.clone()
    }
}

impl Drop for FlagRinger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_payload_is_two_ids_or_a_named_error() {
        assert_eq!(
            parse_entry_payload("12 345").ok(),
            Some((AccountId(12), EntryId(345)))
        );
        for bad in ["", "12", "12 x", "x 345", "12 345 6", "12  345"] {
            match parse_entry_payload(bad) {
                Err(StoreError::Corrupt(what)) => {
                    assert!(what.contains(&format!("'{bad}'")), "{what}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}

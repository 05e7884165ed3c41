//! Waking a reconcile worker at once when an account is flagged:
//! `flag_reconcile` sends `NOTIFY oco_reconcile, '<account id>'` in the same
//! statement that stores the flag, and [`ReconcileListener`] receives it on a
//! dedicated connection (outside the pool).
//!
//! Notifications are a wake-up, not a queue: one sent while no listener was
//! connected is lost, so a worker still takes flags with
//! [`Store::take_flagged`](oco_core::Store::take_flagged) after each wake-up
//! and on a timer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::stream::{self, StreamExt as _};
use oco_core::{AccountId, StoreError};
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
        let unavailable = |e: tokio_postgres::Error| {
            StoreError::Unavailable(format!("connecting to listen for reconcile flags: {e}"))
        };
        let mut config: tokio_postgres::Config = self.url().parse().map_err(unavailable)?;
        // The connection only ever reads: without keepalives, a server gone
        // without closing it (a host lost, a partition) would leave it waiting
        // for hours while flags go unannounced. These notice it in about 25 s.
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
                    Ok(AsyncMessage::Notification(n)) if n.channel() == RECONCILE_CHANNEL => {
                        n.payload().parse().map(AccountId).map_err(|_| {
                            StoreError::Corrupt(format!(
                                "reconcile notification payload '{}'",
                                n.payload()
                            ))
                        })
                    }
                    Ok(_) => continue,
                    Err(e) => Err(StoreError::Unavailable(format!("reconcile listener: {e}"))),
                };
                let failed = matches!(item, Err(StoreError::Unavailable(_)));
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {RECONCILE_CHANNEL}"))
            .await
            .map_err(|e| StoreError::Unavailable(format!("listening for reconcile flags: {e}")))?;
        Ok(ReconcileListener {
            rx,
            _client: client,
        })
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

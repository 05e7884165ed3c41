//! The three layers' command lines over one database and one simulator.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::bins::binary;
use crate::pg::free_port;
use crate::process::{Proc, Spec};
use crate::sim::SimProc;

/// Knobs of the layers, passed as the environment variables the binaries read.
#[derive(Debug, Clone)]
pub struct LayerSettings {
    /// `SYNC_INTERVAL_SECS`.
    pub sync_interval_secs: u64,
    /// `SYNC_STARTUP_DELAY_SECS`.
    pub sync_startup_delay_secs: u64,
    /// `OCO_LEASE_TTL_SECS`.
    pub lease_ttl_secs: u64,
    /// `OCO_LEASE_RENEW_SECS`.
    pub lease_renew_secs: u64,
    /// `RUST_LOG` of every layer.
    pub log: String,
}

/// What a wait adds to the configured intervals: process start-up, a
/// connection, a few requests, on a 2-core machine shared with builds.
pub const MARGIN: Duration = Duration::from_secs(20);

impl LayerSettings {
    /// The longest a process may take to start and answer: no interval
    /// applies, so the margin alone.
    pub fn start_deadline(&self) -> Duration {
        MARGIN
    }

    /// The longest a gateway may take to hold an account's stream: a dead
    /// holder's lease running out (TTL), one renew tick, twice for a retry.
    pub fn stream_deadline(&self) -> Duration {
        Duration::from_secs(2 * (self.lease_ttl_secs + self.lease_renew_secs)) + MARGIN
    }

    /// The longest a gateway may take to reopen a stream that was refused:
    /// its reopen backoff doubles up to 30 s (`GatewayConfig::standard`, not
    /// configurable), then the stream deadline.
    pub fn reopen_deadline(&self) -> Duration {
        Duration::from_secs(30) + self.stream_deadline()
    }

    /// The longest sync may take to act on something it can see: its
    /// start-up delay and two passes (the one under way may have read the
    /// exchange before the change).
    pub fn sync_deadline(&self) -> Duration {
        Duration::from_secs(self.sync_startup_delay_secs + 2 * self.sync_interval_secs) + MARGIN
    }

    /// Short periods, so that recovery fits in a test.
    pub fn quick() -> LayerSettings {
        LayerSettings {
            sync_interval_secs: 2,
            sync_startup_delay_secs: 0,
            lease_ttl_secs: 3,
            lease_renew_secs: 1,
            log: "info".into(),
        }
    }
}

/// Where the layers find the database, the key and the simulator, and how
/// to start each of them.
#[derive(Debug, Clone)]
pub struct Layers {
    /// Logs go here.
    pub dir: PathBuf,
    /// `DATABASE_URL`.
    pub db_url: String,
    /// `OCO_SECRET_KEY` (hex).
    pub key_hex: String,
    /// The simulator's REST base.
    pub rest_url: String,
    /// The simulator's WebSocket API.
    pub ws_url: String,
    /// The API's port (kept across restarts).
    pub api_port: u16,
    /// Knobs.
    pub settings: LayerSettings,
}

impl Layers {
    /// Layers over `db_url` and `sim`, logging into `dir`.
    ///
    /// # Errors
    /// When no free port is found.
    pub fn new(
        dir: &Path,
        db_url: &str,
        sim: &SimProc,
        settings: LayerSettings,
    ) -> anyhow::Result<Layers> {
        Ok(Layers {
            dir: dir.to_owned(),
            db_url: db_url.to_owned(),
            key_hex: "5e".repeat(32),
            rest_url: sim.rest_url(),
            ws_url: sim.ws_url(),
            api_port: free_port()?,
            settings,
        })
    }

    fn env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        [
            ("DATABASE_URL", self.db_url.clone()),
            ("OCO_SECRET_KEY", self.key_hex.clone()),
            ("OCO_EXCHANGE", "sim".into()),
            ("BINANCE_REST_URL", self.rest_url.clone()),
            ("BINANCE_WS_URL", self.ws_url.clone()),
            ("OCO_API_LISTEN", format!("127.0.0.1:{}", self.api_port)),
            ("OCO_DB_POOL_SIZE", "4".into()),
            // Several stacks run at once: each exporter takes a free port.
            ("OCO_METRICS_LISTEN", "127.0.0.1:0".into()),
            ("OCO_LEASE_TTL_SECS", s.lease_ttl_secs.to_string()),
            ("OCO_LEASE_RENEW_SECS", s.lease_renew_secs.to_string()),
            ("SYNC_INTERVAL_SECS", s.sync_interval_secs.to_string()),
            (
                "SYNC_STARTUP_DELAY_SECS",
                s.sync_startup_delay_secs.to_string(),
            ),
            ("SYNC_DB_POOL", "4".into()),
            ("RUST_LOG", s.log.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// `api serve`.
    ///
    /// # Errors
    /// A missing binary.
    pub fn api_spec(&self) -> anyhow::Result<Spec> {
        Ok(Spec {
            name: "api".into(),
            program: binary("api")?,
            args: vec!["serve".into()],
            env: self.env(),
        })
    }

    /// `ws-gateway` number `n` (its holder name is the default, host-pid, so
    /// that a restarted gateway is a new holder and waits out the dead one's lease).
    ///
    /// # Errors
    /// A missing binary.
    pub fn gateway_spec(&self, n: u32) -> anyhow::Result<Spec> {
        Ok(Spec {
            name: format!("ws-gateway-{n}"),
            program: binary("ws-gateway")?,
            args: vec![],
            env: self.env(),
        })
    }

    /// `sync`.
    ///
    /// # Errors
    /// A missing binary.
    pub fn sync_spec(&self) -> anyhow::Result<Spec> {
        Ok(Spec {
            name: "sync".into(),
            program: binary("sync")?,
            args: vec![],
            env: self.env(),
        })
    }

    /// Starts `spec` with its log in this stack's directory.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn start(&self, spec: anyhow::Result<Spec>) -> anyhow::Result<Proc> {
        Proc::start(spec?, &self.dir)
    }

    /// The API's base URL.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// Registers `name` with `api users add NAME` and returns the token it prints.
    ///
    /// # Errors
    /// When the command fails or prints no token.
    pub fn add_user(&self, name: &str) -> anyhow::Result<String> {
        let mut cmd = Command::new(binary("api")?);
        cmd.args(["users", "add", name]);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        let out = cmd.output().context("running api users add")?;
        if !out.status.success() {
            bail!(
                "api users add {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !token.starts_with("ogt_") {
            bail!("api users add {name} printed no token");
        }
        Ok(token)
    }
}

/// A fresh directory under the system's temp dir, unique to this process.
///
/// # Errors
/// When it cannot be created.
pub fn scratch_dir(what: &str) -> anyhow::Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "ocoguard-e2e-{what}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

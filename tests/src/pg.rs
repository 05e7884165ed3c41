//! A private PostgreSQL cluster (`initdb` + `postgres`) that a test may stop and
//! restart at will, without touching the shared server other tests use.
//!
//! The postmaster is a child of the test (not daemonised by `pg_ctl`), under
//! the same guard as every other process: it dies with the test, and its
//! backends exit when they see the postmaster gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::{ChildGuard, guarded_command, open_log};

/// How long a start (crash recovery included) may take on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where Debian's PostgreSQL 15 server programs are.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A cluster in a temporary directory on a free port. Drop kills the server
/// and removes the directory.
#[derive(Debug)]
pub struct PrivatePg {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    server: Mutex<Option<ChildGuard>>,
}

impl PrivatePg {
    /// Creates the cluster (`initdb`, trust auth, user `postgres`) and starts it.
    /// As root, the server programs run as the `postgres` user (initdb refuses root).
    ///
    /// # Errors
    /// When PostgreSQL's server programs are missing or the cluster does not start.
    pub fn start() -> anyhow::Result<PrivatePg> {
        let bin = Path::new(PG_BIN);
        if !bin.join("initdb").is_file() {
            bail!(
                "{PG_BIN}/initdb not found: the chaos suite needs PostgreSQL 15's server programs (apt-get install postgresql-15)"
            );
        }
        let as_postgres = is_root();
        let dir = crate::stack::scratch_dir("pg")?;
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir))?;
        }
        let port = free_port()?;
        let pg = PrivatePg {
            dir,
            port,
            as_postgres,
            server: Mutex::new(None),
        };
        pg.pg(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-instructions",
                "--no-sync",
            ],
        )?;
        pg.start_server()?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn command(&self, program: &str) -> anyhow::Result<Command> {
        let user = self.as_postgres.then_some("postgres");
        guarded_command(&Path::new(PG_BIN).join(program), user)
    }

    fn pg(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = self.command(program)?;
        cmd.args(args);
        run(&mut cmd)
    }

    fn server(&self) -> std::sync::MutexGuard<'_, Option<ChildGuard>> {
        self.server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the server and waits (polling `pg_isready`) until it accepts
    /// connections.
    ///
    /// # Errors
    /// When it is already running, cannot be spawned, exits, or is not
    /// ready within a minute.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let mut server = self.server();
        if server.is_some() {
            bail!("the private PostgreSQL is already running");
        }
        let log = open_log(&self.dir.join("server.log"))?;
        let mut cmd = self.command("postgres")?;
        let port = self.port.to_string();
        let socket_dir = self.dir.display().to_string();
        cmd.args(["-D", &self.data(), "-p", &port, "-k", &socket_dir])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let child = server.insert(ChildGuard::spawn(&mut cmd).context("starting postgres")?);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.child().try_wait() {
                server.take();
                bail!(
                    "postgres exited ({status}) while starting; see {}",
                    self.dir.join("server.log").display()
                );
            }
            let ready = Command::new(Path::new(PG_BIN).join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port, "-t", "1"])
                .status()
                .context("running pg_isready")?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the private PostgreSQL was not ready within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server at once, as a crash would (`SIGQUIT`: what
    /// `pg_ctl stop -m immediate` sends), and reaps it.
    ///
    /// # Errors
    /// When it is not running, or `kill` or waiting fails.
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        let child = self
            .server()
            .take()
            .context("the private PostgreSQL is not running")?;
        run(Command::new("kill").args(["-QUIT", &child.id().to_string()]))?;
        child.wait().context("waiting for postgres to exit")?;
        Ok(())
    }

    /// `postgres://postgres@127.0.0.1:PORT/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `database`.
    ///
    /// # Errors
    /// When `createdb` fails.
    pub fn create_database(&self, database: &str) -> anyhow::Result<()> {
        let port = self.port.to_string();
        run(Command::new(Path::new(PG_BIN).join("createdb")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            database,
        ]))
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        // A clean immediate stop first, so that its backends go at once;
        // the guard kills whatever is left.
        let _ = self.stop_immediate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A port nothing listens on right now.
///
/// # Errors
/// When no socket can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

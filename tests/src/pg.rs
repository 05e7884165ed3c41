//! A private PostgreSQL cluster (`initdb` + `pg_ctl`) that a test may stop and
//! restart at will, without touching the shared server other tests use.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Where Debian's PostgreSQL 15 server programs are.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A cluster in a temporary directory on a free port. Drop stops it
/// (`-m immediate`) and removes the directory.
#[derive(Debug)]
pub struct PrivatePg {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
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
        };
        pg.pg(
            &["initdb"],
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

    fn pg(&self, program: &[&str], args: &[&str]) -> anyhow::Result<()> {
        let path = Path::new(PG_BIN).join(program[0]);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.args(args);
        run(&mut cmd)
    }

    /// Starts the server and waits until it accepts connections.
    ///
    /// # Errors
    /// When `pg_ctl start` fails.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.pg(
            &["pg_ctl"],
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        )
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`).
    ///
    /// # Errors
    /// When `pg_ctl stop` fails.
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        self.pg(
            &["pg_ctl"],
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
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

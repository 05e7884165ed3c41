//! A child process that can be killed (`SIGKILL`) and started again with the
//! same command line; its stdout and stderr go to one log file.
//!
//! Every process the harness starts dies with the test: [`ChildGuard`] kills
//! it on Drop (also while a panic unwinds), and [`guarded_command`] runs it
//! under `setpriv --pdeathsig KILL`, so that the kernel kills it when the
//! test process itself dies without unwinding (`kill -9`, a timeout, abort).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::Context;

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name, for logs and messages (`api`, `gateway-1`).
    pub name: String,
    /// Program path.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment (on top of the inherited one, minus `DATABASE_URL`
    /// and `OCO_*`, which only come from here).
    pub env: Vec<(String, String)>,
}

/// Where util-linux's `setpriv` is; without it, children are killed on Drop
/// only.
const SETPRIV: &str = "/usr/bin/setpriv";

/// A command that runs `program` so that it gets `SIGKILL` when the thread
/// that spawned it exits, whatever the reason; as `run_as` (a user name) when
/// given, which needs root. The workspace forbids `unsafe`, so `prctl` is
/// reached through `setpriv`, which execs `program` in place (same pid).
///
/// # Errors
/// `run_as` without `setpriv`.
pub fn guarded_command(program: &Path, run_as: Option<&str>) -> anyhow::Result<Command> {
    if !Path::new(SETPRIV).is_file() {
        if let Some(user) = run_as {
            anyhow::bail!(
                "{SETPRIV} not found: needed to run {} as {user}",
                program.display()
            );
        }
        return Ok(Command::new(program));
    }
    let mut cmd = Command::new(SETPRIV);
    if let Some(user) = run_as {
        cmd.args(["--reuid", user, "--regid", user, "--clear-groups"]);
    }
    cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
    Ok(cmd)
}

/// A spawned child that is killed (`SIGKILL`) and reaped on Drop. Wrap a
/// [`Child`] in it on the line that spawns it, so that no early return or
/// panic can leave the process running.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Spawns `cmd` and guards the child at once.
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<ChildGuard> {
        cmd.spawn().map(ChildGuard)
    }

    /// The child, to take its pipes or poll it.
    pub fn child(&mut self) -> &mut Child {
        &mut self.0
    }

    /// Its pid.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits for it to exit by itself and reaps it.
    ///
    /// # Errors
    /// When waiting fails.
    pub fn wait(mut self) -> std::io::Result<ExitStatus> {
        self.0.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running (or killed) process of a [`Spec`]. Drop kills it.
#[derive(Debug)]
pub struct Proc {
    spec: Spec,
    log: PathBuf,
    child: Option<ChildGuard>,
    starts: u32,
}

impl Proc {
    /// Starts `spec`, logging into `dir/<name>.log`.
    ///
    /// # Errors
    /// When the program cannot be started.
    pub fn start(spec: Spec, dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{}.log", spec.name));
        let mut p = Proc {
            spec,
            log,
            child: None,
            starts: 0,
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(out, "==== start {} of {}", self.starts + 1, self.spec.name)?;
        let err = out.try_clone()?;
        let mut cmd = guarded_command(&self.spec.program, None)?;
        cmd.args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (k, _) in std::env::vars() {
            // Only the harness says which database and key a process uses.
            if k == "DATABASE_URL" || k.starts_with("OCO_") || k.starts_with("SYNC_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        let child = ChildGuard::spawn(&mut cmd).with_context(|| {
            format!(
                "starting {} ({})",
                self.spec.name,
                self.spec.program.display()
            )
        })?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// The name given in the spec.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Sends `SIGKILL` (as `kill -9`) and reaps it; nothing if not running.
    pub fn kill9(&mut self) {
        // Dropping the guard kills and reaps it.
        self.child.take();
    }

    /// Sends `SIGTERM` and waits for the exit.
    ///
    /// # Errors
    /// When `kill` cannot be run or waiting fails.
    pub fn terminate(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.child.take() else {
            return Ok(None);
        };
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("running kill -TERM")?;
        Ok(Some(child.wait()?))
    }

    /// Starts it again (after [`Proc::kill9`], or after it exited by itself).
    ///
    /// # Errors
    /// When the program cannot be started.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// `Some(status)` once the process has exited by itself (it stays
    /// reported until [`Proc::restart`]); `None` while it runs or was killed.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.child().try_wait().ok().flatten())
    }

    /// Whether a process is up (started and not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// The last `n` lines of its log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- {} ({}), last {} lines:\n{}",
            self.spec.name,
            self.log.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The URL of its `/metrics`, as announced in its log since its last
    /// start (each start binds a free port); `None` until it is logged.
    pub fn metrics_url(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        crate::metrics::metrics_url_in_log(&text)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A log file to append to.
///
/// # Errors
/// When it cannot be opened.
pub fn open_log(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

//! A child process that can be killed (`SIGKILL`) and started again with the
//! same command line; its stdout and stderr go to one log file.

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

/// A running (or killed) process of a [`Spec`]. Drop kills it.
#[derive(Debug)]
pub struct Proc {
    spec: Spec,
    log: PathBuf,
    child: Option<Child>,
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
        let mut cmd = Command::new(&self.spec.program);
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
        let child = cmd.spawn().with_context(|| {
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `SIGTERM` and waits for the exit.
    ///
    /// # Errors
    /// When `kill` cannot be run or waiting fails.
    pub fn terminate(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
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
            .and_then(|c| c.try_wait().ok().flatten())
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

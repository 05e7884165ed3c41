//! How fast this machine's CPUs wake from idle, held for the life of the
//! process (Linux PM QoS, `/dev/cpu_dma_latency`).
//!
//! A fill's path to its protection crosses several processes that sleep
//! between events: the gateway, PostgreSQL's backend and its WAL flush, the
//! exchange client. At tens of fills per second every one of them finds its
//! CPU idle, and an idle CPU that has halted takes its time to come back: on a
//! virtual machine whose idle vCPUs halt at once, each wake-up is a trip
//! through the hypervisor. Measured on the bench's machine (BENCHMARKS.md,
//! two pairs per mode), holding 0 µs quarters a loopback `SELECT 1`, shortens
//! the order round trip (p50 0.10 → 0.06 ms in the LIMIT runs, 0.09–0.11 →
//! 0.07–0.09 ms in the MARKET ones), and takes the p99 of resting LIMIT fills at
//! 100/s from 4.6–5.0 ms to 3.4–4.3 ms. It did nothing for MARKET fills, and
//! at saturation it cost throughput: polling vCPUs leave the host less for
//! the work.
//!
//! The price is power and CPU: the CPUs poll instead of halting, machine-wide,
//! for as long as the request is held. So it is an operator's choice, off
//! unless asked for. It needs write access to the device: root, or a group a
//! udev rule gives it to (the gateway need not run as root for it).

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The kernel's PM QoS device for CPU wake-up latency.
pub const CPU_LATENCY_DEVICE: &str = "/dev/cpu_dma_latency";

/// Why a wake-up latency could not be held or read.
#[derive(Debug, thiserror::Error)]
#[error("cannot {doing} {path}: {source} (needs Linux and write access to it)")]
pub struct WakeupError {
    doing: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// A held request that no CPU of this machine take longer than the given
/// latency to wake from idle. The kernel keeps it while the file stays open:
/// dropping this (or the process ending, however it ends) releases it.
#[derive(Debug)]
pub struct CpuWakeupLatency {
    // Held only to keep the request alive.
    _device: File,
    held: Duration,
}

impl CpuWakeupLatency {
    /// Requests at most `max` (whole microseconds, capped at `i32::MAX`)
    /// through [`CPU_LATENCY_DEVICE`].
    ///
    /// # Errors
    /// The device is missing (not Linux, or no PM QoS) or not writable by
    /// this process; the error names it.
    pub fn hold(max: Duration) -> Result<Self, WakeupError> {
        Self::hold_at(Path::new(CPU_LATENCY_DEVICE), max)
    }

    fn hold_at(path: &Path, max: Duration) -> Result<Self, WakeupError> {
        let us = i32::try_from(max.as_micros()).unwrap_or(i32::MAX);
        let fail = |doing| {
            move |source| WakeupError {
                doing,
                path: path.to_owned(),
                source,
            }
        };
        let mut device = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(fail("open"))?;
        // The device takes the value as one binary s32 in a single write.
        device
            .write_all(&us.to_ne_bytes())
            .map_err(fail("write to"))?;
        Ok(Self {
            _device: device,
            held: Duration::from_micros(u64::try_from(us).unwrap_or(0)),
        })
    }

    /// [`Self::hold`], for a process whose operator asked for it: the outcome
    /// is logged, and a refusal only costs latency. A gateway that did not
    /// start over a tuning knob would protect nothing.
    pub fn hold_or_warn(max_us: u64) -> Option<Self> {
        match Self::hold(Duration::from_micros(max_us)) {
            Ok(held) => {
                tracing::info!(
                    held_us = u64::try_from(held.held.as_micros()).unwrap_or(u64::MAX),
                    "CPU wake-up latency held"
                );
                Some(held)
            }
            Err(err) => {
                tracing::warn!(error = %err, "running without the CPU wake-up latency asked for");
                None
            }
        }
    }

    /// The latency this request asks for.
    pub fn held(&self) -> Duration {
        self.held
    }

    /// The latency the machine currently honours: the strictest request any
    /// process holds, or the kernel's default when none does.
    ///
    /// # Errors
    /// The device is missing or not readable; the error names it.
    pub fn effective() -> Result<Duration, WakeupError> {
        Self::effective_at(Path::new(CPU_LATENCY_DEVICE))
    }

    fn effective_at(path: &Path) -> Result<Duration, WakeupError> {
        let fail = |doing| {
            move |source| WakeupError {
                doing,
                path: path.to_owned(),
                source,
            }
        };
        let mut value = [0u8; 4];
        File::open(path)
            .map_err(fail("open"))?
            .read_exact(&mut value)
            .map_err(fail("read"))?;
        let us = i32::from_ne_bytes(value);
        Ok(Duration::from_micros(u64::try_from(us).unwrap_or(0)))
    }
}

/// How many files this process has open on [`CPU_LATENCY_DEVICE`]: each is
/// a request held (at the kernel's default until written), for tests of the
/// release; Linux `/proc`.
#[doc(hidden)]
pub fn open_requests() -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target == Path::new(CPU_LATENCY_DEVICE))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_request_is_honoured_until_dropped() {
        match CpuWakeupLatency::hold(Duration::ZERO) {
            Ok(held) => {
                assert_eq!(held.held(), Duration::ZERO);
                assert_eq!(CpuWakeupLatency::effective().unwrap(), Duration::ZERO);
                assert_eq!(open_requests(), 1);
                drop(held);
                // Released: the kernel drops a request with its file. Another
                // process may hold one of its own, so the effective value
                // says nothing here; this process's open files do.
                assert_eq!(open_requests(), 0);
            }
            // Without the device or the right to it, the error says which.
            Err(err) => assert!(err.to_string().contains(CPU_LATENCY_DEVICE), "{err}"),
        }
    }

    #[test]
    fn a_missing_device_is_named_in_the_error() {
        let path = Path::new("/nonexistent/cpu_dma_latency");
        let err = CpuWakeupLatency::hold_at(path, Duration::ZERO).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cannot open /nonexistent/cpu_dma_latency"),
            "{text}"
        );
        let err = CpuWakeupLatency::effective_at(path).unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }

    #[test]
    fn the_request_is_capped_to_what_the_device_takes() {
        // A plain file stands in for the device: it records the bytes written.
        let dir = std::env::temp_dir().join(format!("oco-wakeup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("device");
        std::fs::write(&path, []).unwrap();
        let held = CpuWakeupLatency::hold_at(&path, Duration::from_secs(10_000)).unwrap();
        assert_eq!(held.held(), Duration::from_micros(i32::MAX as u64));
        drop(held);
        assert_eq!(std::fs::read(&path).unwrap(), i32::MAX.to_ne_bytes());
        let held = CpuWakeupLatency::hold_at(&path, Duration::from_micros(25)).unwrap();
        drop(held);
        assert_eq!(
            CpuWakeupLatency::effective_at(&path).unwrap(),
            Duration::from_micros(25)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Stopping a run cleanly on a signal: Ctrl-C (SIGINT), SIGTERM (what `docker stop`, Slurm and
//! `timeout` send) and SIGHUP. The first one asks the run to stop at the end of its current unit
//! of work — a training step (then a checkpoint), the evaluation, a sample — and to mark itself
//! `interrupted`; a second one ends the process at once (its lock then shows it as crashed).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Result;

use crate::error::Interrupted;

/// The signals a run stops on.
#[cfg(unix)]
const SIGNALS: [i32; 3] = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP];

/// Which stop signal has arrived, if any.
#[derive(Clone, Default)]
pub struct StopSignal {
    requested: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

impl StopSignal {
    /// Listen for the stop signals from now on.
    pub fn register() -> Result<Self> {
        let stop = Self::default();
        #[cfg(unix)]
        for signal in SIGNALS {
            // Registered first, so it sees the flag as the previous signal left it.
            signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&stop.requested))?;
            signal_hook::flag::register(signal, Arc::clone(&stop.requested))?;
            signal_hook::flag::register_usize(signal, Arc::clone(&stop.signal), signal as usize)?;
        }
        Ok(stop)
    }

    /// The signal that asked to stop, if one has.
    pub fn requested(&self) -> Option<i32> {
        self.requested.load(Ordering::SeqCst).then(|| self.signal.load(Ordering::SeqCst) as i32)
    }

    /// An [`Interrupted`] error for `what` was stopping, if a stop signal has arrived.
    pub fn check(&self, what: &str) -> Result<()> {
        match self.requested() {
            Some(signal) => Err(Interrupted { signal, message: format!("stopped by {} {what}", name(signal)) }.into()),
            None => Ok(()),
        }
    }
}

/// A signal as a user knows it.
pub fn name(signal: i32) -> String {
    match signal {
        2 => "Ctrl-C (SIGINT)".into(),
        15 => "SIGTERM".into(),
        1 => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}

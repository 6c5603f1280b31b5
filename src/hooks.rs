//! Points in a run where a program embedding pipe may act: a stage beginning, a checkpoint
//! written but not yet moved into place, a data-parallel peer beginning a step, a loss or
//! gradient norm measured. The `pipe`
//! binary installs no hooks, so these do nothing there; the test build's `pipe-faults` binary
//! installs hooks that kill, signal or stall the process at these points, or spoil a measured
//! value, to test recovery.

use std::sync::OnceLock;

use anyhow::Result;

/// What runs at each point; every method does nothing unless a program overrides it.
pub trait Hooks: Send + Sync {
    /// The stage named `stage` (`train`, `eval`, `generate`) is about to begin.
    fn stage_begins(&self, _stage: &str) {}
    /// The checkpoint of `step` is written in full but not yet renamed into place.
    fn checkpoint_written(&self, _step: usize) {}
    /// The data-parallel peer of `rank` begins optimizer step `step`; an error fails the peer.
    fn peer_step_begins(&self, _rank: usize, _step: usize) -> Result<()> {
        Ok(())
    }
    /// A figure training acts on was measured: `loss` (a step's training loss), `grad_norm` (its
    /// gradient norm) or `val_loss` (an evaluation's); the value returned is the one used.
    fn measured(&self, _quantity: &str, value: f64) -> f64 {
        value
    }
}

static INSTALLED: OnceLock<Box<dyn Hooks>> = OnceLock::new();

/// Install the process's hooks, once, before anything runs; a second call is refused.
pub fn install(hooks: Box<dyn Hooks>) -> Result<()> {
    INSTALLED.set(hooks).map_err(|_| anyhow::anyhow!("hooks are installed already"))
}

/// The installed hooks, if a program installed any.
pub fn installed() -> Option<&'static dyn Hooks> {
    INSTALLED.get().map(|hooks| hooks.as_ref())
}

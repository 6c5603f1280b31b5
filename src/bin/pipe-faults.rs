//! The test build's `pipe`: the same command line, with hooks that make faults where a test
//! asks through the environment. Built only with the `fault-injection` feature (the test build
//! turns it on), never installed; `pipe` itself carries none of this.
//!
//! - `PIPEFAULT_SIGNAL_AT_STAGE=STAGE:SIGNAL` raises SIGNAL as STAGE begins (`eval:15`);
//! - `PIPEFAULT_KILL_IN_CHECKPOINT=STEP` SIGKILLs the process once the checkpoint of STEP is
//!   written but not yet moved into place;
//! - `PIPEFAULT_PEER=fail:RANK:STEP` or `hang:RANK:STEP` fails or stalls a data-parallel peer
//!   as it begins STEP;
//! - `PIPEFAULT_NAN=QUANTITY:N` makes the Nth measured `loss`, `grad_norm` or `val_loss` of the
//!   process NaN (`val_loss:2`: the second evaluation).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
struct FaultsFromEnv {
    /// How many times each quantity has been measured.
    measured: Mutex<HashMap<String, usize>>,
}

impl pipe::hooks::Hooks for FaultsFromEnv {
    fn stage_begins(&self, stage: &str) {
        let Ok(asked) = std::env::var("PIPEFAULT_SIGNAL_AT_STAGE") else { return };
        if let Some((name, Ok(signal))) = asked.split_once(':').map(|(name, signal)| (name, signal.parse())) {
            if name == stage {
                // SAFETY: raising a signal in this process, as `kill` from outside would deliver it.
                unsafe {
                    libc::raise(signal);
                }
            }
        }
    }

    fn checkpoint_written(&self, step: usize) {
        if std::env::var("PIPEFAULT_KILL_IN_CHECKPOINT").is_ok_and(|s| s == step.to_string()) {
            // SAFETY: sending SIGKILL to this very process, as an outside `kill -9` would.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    fn peer_step_begins(&self, rank: usize, step: usize) -> anyhow::Result<()> {
        let Ok(asked) = std::env::var("PIPEFAULT_PEER") else { return Ok(()) };
        let mut parts = asked.split(':');
        let (what, at_rank, at_step) = (parts.next(), parts.next(), parts.next());
        if at_rank != Some(&rank.to_string()) || at_step != Some(&step.to_string()) {
            return Ok(());
        }
        match what {
            Some("fail") => anyhow::bail!("an injected failure at step {step}"),
            Some("hang") => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            _ => Ok(()),
        }
    }

    fn measured(&self, quantity: &str, value: f64) -> f64 {
        let mut counts = self.measured.lock().expect("no panics while counting");
        let count = counts.entry(quantity.to_string()).or_default();
        *count += 1;
        let asked = std::env::var("PIPEFAULT_NAN").unwrap_or_default();
        match asked == format!("{quantity}:{count}") {
            true => f64::NAN,
            false => value,
        }
    }
}

fn main() -> ExitCode {
    pipe::hooks::install(Box::<FaultsFromEnv>::default()).expect("the only installation");
    pipe::cli::main()
}

//! The `pipe` command line: parses arguments, calls the library, maps errors to exit codes
//! (2 for bad input, 1 for a failed run).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pipe::error::is_bad_input;
use pipe::{pipeline, spec};

#[derive(Parser)]
#[command(
    name = "pipe",
    version,
    about = "Declarative supervised fine-tuning pipelines for GPT-2-style models",
    long_about = "pipe runs the supervised fine-tuning pipeline a TOML spec describes — tokenizer, \
data, model, optimizer, then the train, eval and generate stages — and writes everything a run \
produces into a new folder runs/<name>/<run-id>/.\n\nEvery spec field can be overridden: \
PIPE_SECTION__FIELD=value in the environment, then --set section.field=value on the command \
line (later wins). Set RUST_LOG=debug for per-step logs.",
    after_help = "Start with:  pipe run pipelines/sft.toml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: train, evaluate and sample as the spec says, into a new run folder.
    Run {
        /// The pipeline spec (TOML).
        spec: PathBuf,
        /// Override a field: --set optimizer.lr=3e-4 (repeatable; wins over PIPE_* variables).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        sets: Vec<String>,
    },
    /// Validate a spec and print every resolved value with where it came from.
    Check {
        spec: PathBuf,
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        sets: Vec<String>,
    },
}

fn main() -> ExitCode {
    restore_default_sigpipe();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if is_bad_input(&error) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { spec, sets } => {
            let loaded = spec::load(&spec, &sets)?;
            let run = pipeline::run(&loaded)?;
            println!("run completed: {}", run.display());
        }
        Command::Check { spec, sets } => {
            let loaded = spec::load(&spec, &sets)?;
            println!("{}: valid", loaded.path.display());
            let rows = loaded.provenance();
            let width = rows.iter().map(|(k, v, _)| k.len() + v.len() + 3).filter(|&w| w <= 60).max().unwrap_or(0);
            for (key, value, source) in rows {
                println!("{:width$}  # {source}", format!("{key} = {value}"));
            }
        }
    }
    Ok(())
}

/// Die quietly on a closed pipe (`pipe check spec.toml | head`), as command-line tools do,
/// instead of Rust's default of panicking on the failed write.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

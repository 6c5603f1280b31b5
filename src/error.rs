//! The one distinction the CLI needs from an error: was it the user's input (exit code 2) or
//! did a run fail (exit code 1)? Everything else travels as `anyhow::Error` with context.

/// A mistake in what the user gave pipe: a spec, a data file, a model directory, a flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Make a [`BadInput`] error from a message.
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    BadInput(message.into()).into()
}

/// Whether any error in the chain is a [`BadInput`].
pub fn is_bad_input(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<BadInput>())
}

/// A signal stopped a run at a clean point (after a checkpoint, when training); `pipe resume`
/// continues it. The process exits with 128 + the signal's number, as a shell reports it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Interrupted {
    pub signal: i32,
    pub message: String,
}

/// The signal of the [`Interrupted`] in the error's chain, if there is one.
pub fn interrupted_by(error: &anyhow::Error) -> Option<i32> {
    error.chain().find_map(|e| e.downcast_ref::<Interrupted>()).map(|i| i.signal)
}

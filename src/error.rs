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

/// The user stopped a run (Ctrl-C); it was checkpointed and can be resumed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

/// Whether any error in the chain is an [`Interrupted`].
pub fn is_interrupted(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<Interrupted>())
}

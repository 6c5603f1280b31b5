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

/// Run code of another crate that panics on some malformed inputs instead of returning an
/// error (tokenizers' decoder section, for one): a panic becomes `Err` with its message, and is
/// not printed. Panics elsewhere, on any thread, are reported as usual.
pub fn without_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    use std::cell::Cell;
    use std::sync::Once;
    thread_local!(static QUIET: Cell<bool> = const { Cell::new(false) });
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    result.map_err(|payload| panic_message(&payload))
}

/// What a caught panic said.
pub fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    (payload.downcast_ref::<String>().cloned())
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

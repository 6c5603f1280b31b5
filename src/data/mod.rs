//! The data path: records from disk, the tokenizer, token sequences with their loss masks,
//! and padded batches.

pub mod batch;
pub mod records;
pub mod tokenizer;

pub use batch::{Batch, Sequence};
pub use records::Example;

/// Lay a prompt out as `template` says (`{prompt}` stands for the prompt).
pub fn apply_template(template: &str, prompt: &str) -> String {
    template.replace("{prompt}", prompt)
}
pub use tokenizer::Tok;

//! The data path: records from disk, the tokenizer, token sequences with their loss masks,
//! and padded batches.

pub mod batch;
pub mod records;
pub mod tokenizer;

pub use batch::{Batch, Sequence};
pub use records::Example;
pub use tokenizer::Tok;

//! The data path: records from disk, the tokenizer, rendering records into token sequences
//! with their loss masks, the tokenized cache, a spec's prepared data, and padded batches.

pub mod batch;
pub mod cache;
pub mod prepare;
pub mod records;
pub mod render;
pub mod tokenizer;

pub use batch::{Batch, Sequence};
pub use prepare::PreparedData;
pub use records::{Example, Record};
pub use render::{apply_template, prompt_layout, tokenize, TokenizeReport};
pub use tokenizer::Tok;

//! The data path: records from disk, the tokenizer, rendering records into token sequences
//! with their loss masks, the tokenized cache, a spec's prepared data, and padded batches.

pub mod batch;
pub mod cache;
pub mod chat_template;
pub mod columnar;
pub mod examples;
pub mod preference;
pub mod prepare;
pub mod records;
pub mod render;
pub mod sources;
pub mod tokenizer;

pub use batch::{best_fit, pack, Batch, Sequence};
pub use chat_template::{JinjaTemplate, RenderLimits};
pub use examples::Examples;
pub use preference::{PreferenceData, PreferencePair};
pub use prepare::PreparedData;
pub use records::{Example, Record};
pub use render::{apply_template, prompt_layout, tokenize, PromptLayout, TokenizeReport, TokenizeSettings, Tokenizing};
pub use tokenizer::Tok;

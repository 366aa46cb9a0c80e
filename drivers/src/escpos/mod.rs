//! ESC/POS: the byte stream a POS sends to its receipt printer, as tokens and receipts.

pub mod codepage;
pub mod segment;
pub mod tokenizer;

pub use codepage::CodePage;
pub use segment::{EndReason, PrintedCode, Receipt, Segmenter, SegmenterConfig};
pub use tokenizer::{Token, Tokenizer};

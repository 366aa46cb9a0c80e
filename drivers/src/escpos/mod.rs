//! ESC/POS: the byte stream a POS sends to its receipt printer, as tokens and receipts, and the
//! status the printer sends back.

pub mod codepage;
pub mod segment;
pub mod status;
pub mod tokenizer;

pub use codepage::CodePage;
pub use segment::{EndReason, PrintedCode, Receipt, Segmenter, SegmenterConfig};
pub use status::{Fault, Faults, StatusReader, StatusReply};
pub use tokenizer::{Token, Tokenizer};

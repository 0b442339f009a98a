//! Model files: reading safetensors headers and tensor bytes, writing Hugging Face folders.
//!
//! - [`adapter`]: a PEFT LoRA adapter folder read from its config and header: which
//!   modules it changes, with which factors and scaling.
//! - [`decoder_config`]: the decoder shape a `config.json` describes (for the MoE forward
//!   pass).
//! - [`header`]: parse and fully validate one safetensors header (no tensor data read).
//! - [`input_file`]: open only regular files, name FIFOs, devices and broken links, and read
//!   small files with a size cap.
//! - [`model`]: resolve a model reference (folder, file, `hf:org/name[@rev]`) into a
//!   [`ModelInfo`]: every tensor's dtype, shape and place, plus config.json and donor files.
//! - [`reader`]: memory-mapped access to tensor bytes.
//! - [`sigbus`]: a model file truncated under a map is reported, not a silent SIGBUS.
//! - [`tokenizer`]: a model's tokenizer and the length limit of routing prompts.
//! - [`writer`]: a streaming, sharded, atomic writer of a Hugging Face model folder.
//!
//! A leaf module every stage may use; it imports only `diag`.

pub mod adapter;
pub mod decoder_config;
pub mod dtype;
pub mod header;
pub mod input_file;
pub mod model;
pub mod reader;
pub mod sigbus;
pub mod tokenizer;
pub mod vocab;
pub mod writer;

pub use adapter::{AdapterError, AdapterInfo};
pub use dtype::DType;
pub use model::{ModelError, ModelIndex, ModelInfo, TensorInfo};
pub use reader::TensorReader;
pub use writer::{ModelWriter, OutputSpec, WriteError, WrittenModel};

//! mergec: a compiler for model-merge recipes.
//!
//! ```text
//!  source ──parse──▶ ast::Script ──check──▶ hir::Program ──lower──▶ Graph
//!  (syntax)      (+ io::ModelIndex, headers only)  (sema)     (graph)
//!        ──optimize──▶ Graph ──schedule──▶ Plan ──run──▶ Hugging Face folders + RunReport
//!          (opt)                (plan)           (exec + io)
//! ```
//!
//! Each stage is one module with one entry point, its own output type and its own errors;
//! data flows forward only. [`driver::compile`] chains parse..schedule.
//!
//! A stage imports earlier stages and the leaf modules, never a later stage:
//!
//! | module | may import |
//! |---|---|
//! | leaves: `source`, `diag`, `ids`, `io`, `ops`, `moe_spec` | each other's lower layers only (`diag` <- `source`; `io` <- `diag`; `ops`, `moe_spec` <- `io`, `ids`) |
//! | `syntax` | leaves |
//! | `sema` | `syntax`, leaves |
//! | `graph` | `sema::hir`, leaves |
//! | `opt` | `graph`, leaves |
//! | `plan` | `graph`, `sema::hir`, leaves |
//! | `kernels` | `plan`, leaves |
//! | `exec` | `plan`, `kernels`, leaves |
//! | `driver`, `import`, `cli` | everything (they chain the stages) |
//! | `lora_extract` | `io`, `diag`, `sema` (the output-folder check), `exec::cpu` (dtype conversion) |
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod diag;
pub mod driver;
pub mod exec;
pub mod graph;
pub mod ids;
pub mod import;
pub mod io;
pub mod kernels;
pub mod lora_extract;
pub mod lsp;
pub mod moe_spec;
pub mod ops;
pub mod opt;
pub mod plan;
pub mod sema;
pub mod source;
pub mod syntax;
pub mod synth;
pub mod units;

pub use exec::run;
pub use graph::lower;
pub use opt::optimize;
pub use plan::schedule;
pub use sema::check;
pub use syntax::parse;

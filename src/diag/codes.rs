//! Every diagnostic code, with its one-line summary. `spec/diagnostics.md` mirrors this
//! table, and a test fails when the two disagree or when a code has no `tests/ui` fixture.

use super::Severity;

macro_rules! codes {
    ($($code:ident => $summary:literal,)*) => {
        /// A stable diagnostic code: E01xx syntax, E02xx names and calls, E03xx types and
        /// tensors, E04xx models and files, E05xx plan and memory, E06xx mergekit YAML
        /// import, E07xx mixtures of experts, E08xx vocabularies, E09xx adapters, W0xxx
        /// warnings.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $($code,)*
        }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$code,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$code => stringify!($code),)*
                }
            }

            /// One line saying what the code means.
            pub fn summary(self) -> &'static str {
                match self {
                    $(Code::$code => $summary,)*
                }
            }
        }
    };
}

codes! {
    E0001 => "internal compiler error",
    E0101 => "syntax error",
    E0102 => "invalid literal",
    E0103 => "expression nested too deeply",
    E0104 => "source file is not valid UTF-8",
    E0201 => "unknown name",
    E0202 => "name defined twice",
    E0203 => "unknown function",
    E0204 => "unknown named argument",
    E0205 => "missing argument",
    E0206 => "wrong number of arguments",
    E0207 => "argument given twice",
    E0208 => "unknown save option",
    E0209 => "unknown or misplaced setting",
    E0210 => "model expression nested too deeply",
    E0211 => "model expression too large",
    E0301 => "type mismatch",
    E0302 => "tensor sets differ",
    E0303 => "shape mismatch",
    E0304 => "layer range out of bounds",
    E0305 => "value out of range",
    E0306 => "no table entry matches a tensor",
    E0307 => "unsupported tensor dtype",
    E0401 => "model not found",
    E0402 => "corrupt or unreadable model file",
    E0403 => "model not in the Hugging Face cache",
    E0404 => "invalid config.json",
    E0405 => "output folder conflict",
    E0406 => "not a regular file",
    E0407 => "model has no tensors",
    E0408 => "empty tensor name",
    E0409 => "tensor listed twice",
    E0410 => "routing prompt too long",
    E0413 => "output folder is or contains the current folder",
    E0414 => "output folder holds the script",
    E0415 => "output folder is the home or root folder",
    E0416 => "output exists and was not written by mergec",
    E0417 => "output folder name too long",
    E0501 => "over the memory budget",
    E0601 => "YAML syntax error",
    E0602 => "unknown key in a mergekit config",
    E0603 => "invalid value in a mergekit config",
    E0604 => "unknown merge method",
    E0605 => "parameter not taken by the merge method",
    E0606 => "mergekit feature not supported yet",
    E0607 => "chain of mergekit-multi documents too long",
    E0608 => "YAML nested too deeply",
    E0701 => "no mixture-of-experts architecture fits",
    E0702 => "expert prompts missing or identical",
    E0703 => "every expert is the same model",
    E0704 => "the gate cannot read the base model",
    E0801 => "inputs' vocabularies differ without a tokenizer policy",
    E0802 => "vocabulary options without vocabulary tensors",
    E0803 => "vocabulary source is not an input of the save",
    E0804 => "cannot build the output vocabulary",
    E0805 => "malformed `tokens` entry",
    E0806 => "inputs of different tokenizer families",
    E0901 => "adapter not found or not readable",
    E0902 => "invalid adapter config",
    E0903 => "unsupported adapter",
    E0904 => "adapter module not in the model",
    E0905 => "adapter shapes do not fit the model",
    E0906 => "adapter resizes the vocabulary",
    // Adapters: extraction (E0920-E0939).
    E0920 => "invalid LoRA extraction option",
    E0921 => "fine-tune and base have different tensors",
    E0922 => "fine-tune and base tensor shapes differ",
    E0923 => "nothing to extract",
    E0924 => "a module's SVD is over the memory budget",
    E0925 => "NaN or infinite weights in a delta",
    W0001 => "unused binding",
    W0002 => "input tensors not written by any output",
    W0003 => "per-model parameters are ignored here",
    W0004 => "expert count is not a power of two",
    W0005 => "mergekit ignores or tolerates this",
    W0010 => "inputs' tokenizers differ, embeddings the same size",
    W0011 => "vocabulary tensors truncated",
    W0020 => "adapter factors not applied",
    W0021 => "adapter changes nothing",
    // Adapters: extraction (W0030-W0039).
    W0030 => "differences left out of the adapter",
}

impl Code {
    pub fn severity(self) -> Severity {
        if self.as_str().starts_with('W') {
            Severity::Warning
        } else {
            Severity::Error
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

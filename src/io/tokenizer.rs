//! A model's tokenizer, for the routing prompts of `moe(...)`: loading `tokenizer.json`
//! (size capped), its BOS text, and how many tokens a prompt may have.
//!
//! The `hidden` gates run the base model over every prompt, at a cost that grows with the
//! prompt's length (linearly for the weights, quadratically for attention), so a prompt
//! has at most [`MAX_PROMPT_TOKENS`] tokens. Checking a script must stay fast, so it does
//! not load the tokenizer for short prompts: [`token_bound`] is an upper bound on the
//! tokens of a prompt from its length in bytes, and only a prompt whose bound is over the
//! limit is tokenised to count exactly. The run counts again after tokenising.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::io::input_file::{self, InputError, MAX_JSON_BYTES, MAX_TOKENIZER_BYTES};

/// The most tokens (BOS included) one routing prompt may have.
pub const MAX_PROMPT_TOKENS: usize = 2048;

/// Why a tokenizer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    File(#[from] InputError),
    #[error("the model has no tokenizer `{}`", path.display())]
    Missing { path: PathBuf },
    #[error("cannot load the tokenizer `{}`: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// Loads `tokenizer.json` of the model folder `root`.
pub fn load(root: &Path) -> Result<Tokenizer, TokenizerError> {
    let path = root.join("tokenizer.json");
    let bytes = input_file::read_capped(&path, MAX_TOKENIZER_BYTES)?
        .ok_or_else(|| TokenizerError::Missing { path: path.clone() })?;
    Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Invalid {
        path,
        message: e.to_string(),
    })
}

/// `bos_token` of `tokenizer_config.json` in `root`: a string, or an object with
/// `content`. `None` when there is none or the file cannot be read.
pub fn bos_token(root: &Path) -> Option<String> {
    let bytes = input_file::read_capped(&root.join("tokenizer_config.json"), MAX_JSON_BYTES)
        .ok()
        .flatten()?;
    let config: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match config.get("bos_token")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// An upper bound on the tokens of `bos + prompt` tokenised without added special
/// tokens: every token covers at least one byte of the text, and a tokenizer may add one
/// (a leading `▁` or space). The run checks the real count too.
pub fn token_bound(bos: &str, prompt: &str) -> usize {
    bos.len() + prompt.len() + 1
}

/// An upper bound on the tokens of `prompts` of a model whose BOS text is `bos`, once
/// the script is checked (so that no prompt has more than [`MAX_PROMPT_TOKENS`]).
pub fn checked_prompts_bound<'a>(bos: &str, prompts: impl IntoIterator<Item = &'a String>) -> usize {
    prompts
        .into_iter()
        .map(|p| token_bound(bos, p).min(MAX_PROMPT_TOKENS))
        .fold(0, usize::saturating_add)
}

/// The tokens of `bos + prompt`, as the gates tokenise it.
pub fn count_tokens(tokenizer: &Tokenizer, bos: &str, prompt: &str) -> Result<usize, String> {
    tokenizer
        .encode(format!("{bos}{prompt}"), false)
        .map(|e| e.get_ids().len())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance/models/micro-llama-base-f32")
    }

    #[test]
    fn bound_is_above_the_count() {
        let root = fixture();
        let tokenizer = load(&root).unwrap();
        let bos = bos_token(&root).unwrap();
        assert_eq!(bos, "<s>");
        for prompt in [
            "",
            "a",
            "the cat sat on the mat",
            "émoji 🙂 and \n newlines",
            "<s><s>",
        ] {
            let n = count_tokens(&tokenizer, &bos, prompt).unwrap();
            assert!(n <= token_bound(&bos, prompt), "{prompt:?}: {n}");
        }
    }

    #[test]
    fn missing_and_broken_tokenizers() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load(dir.path()), Err(TokenizerError::Missing { .. })));
        assert_eq!(bos_token(dir.path()), None);
        std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(matches!(e, TokenizerError::Invalid { .. }), "{e}");
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        std::fs::create_dir(dir.path().join("tokenizer.json")).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("is a directory, not a file"), "{e}");
    }
}

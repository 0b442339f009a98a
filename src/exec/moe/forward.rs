//! A forward pass of a dense decoder (Llama, Mistral, Qwen2, Qwen3) for the `hidden`
//! gate mode: the per-layer hidden states of prompts.

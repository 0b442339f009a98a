//! Mixture-of-experts outputs: the router (gate) vectors and the expert tensors of a
//! `moe(...)` model.

pub mod forward;

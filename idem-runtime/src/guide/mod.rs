//! Guides: how to do a whole job with idem, step by step. Every code block compiles.

#[doc = include_str!("adoption.md")]
pub mod adoption {}

//! Integration tests across the workspace crates live in `tests/tests/`.

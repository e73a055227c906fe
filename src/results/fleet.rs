//! Fleet test analytics (placeholder).

//! Placeholder: replaced by the breaker work before it lands.

//! Placeholder: replaced by the client work before it lands.

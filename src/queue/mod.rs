//! Placeholder: replaced by the queue work before it lands.

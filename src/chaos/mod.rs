//! Placeholder: replaced by the chaos work before it lands.

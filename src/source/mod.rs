//! Changefeed requests: the webhook decoding and the hand-off to staging.

pub mod webhook;

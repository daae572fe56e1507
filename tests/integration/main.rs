//! The one integration-test binary: everything that touches a database or a socket.

mod support;

mod apply;
mod crash;
mod harness;
mod pipeline;
mod script;
mod server;

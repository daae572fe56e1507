//! The one integration-test binary: everything that touches a database or a socket.

mod support;

mod apply;
mod harness;

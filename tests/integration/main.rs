//! The one integration-test binary: everything that touches a database or a socket.

mod support;

mod apply;
mod auth;
mod bench;
mod best_effort;
mod conflicts;
mod crash;
mod dbfail;
mod demo;
mod deploy;
mod fault;
mod feed;
mod guards;
mod harness;
mod hostile;
mod integrity;
mod ops;
mod pipeline;
mod script;
mod server;
mod staging;
mod verify;
mod workload;

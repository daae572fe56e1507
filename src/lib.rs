//! cdc-sink: the webhook target of CockroachDB changefeeds, for active-active replication.
//!
//! ```text
//! changefeed ──HTTPS──▶ server ──▶ source::webhook ──▶ (script dispatch) ──▶ stage ──▶ 200 OK
//!                                      │ resolved ts                        (durable first)
//!                                      ▼
//!                                  checkpoint ──▶ sequence (lease holder per schema)
//!                                                   read staged window ≤ resolved, HLC order
//!                                                   ──▶ apply: upsert/delete (CAS, merge, DLQ)
//!                                                   ──▶ retire staged rows + commit checkpoint
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the command tree |
//! | [`sink`] | a whole sink: the `start` flags, the userscript's `setOptions`, the wiring of every part below, launch and stop |
//! | [`server`] | listener, TLS, HTTP/1.1 + HTTP/2, diagnostic routes, graceful shutdown |
//! | [`source`] | changefeed requests: URL routes, payload decoding, hand-off to the schema's mode |
//! | [`auth`] | request authentication |
//! | [`target`] | database connections, dialect detection, retries |
//! | [`stage`] | the `_cdc_sink` staging tables |
//! | [`checkpoint`] | resolved timestamps and leases |
//! | [`sequence`] | consistent, best-effort and immediate modes, the choice between them, concurrent apply transactions, poison search |
//! | [`apply`] | the writer of target rows (`Applier`: mapping, upsert/delete SQL, compare-and-set, merge, dead-letter queue); the target schema cache it and the others read (`SchemaCache`); the `TableConfigs` it asks for each table's options |
//! | [`script`] | the userscript: loading (TS→JS, imports), the engine and its hooks, the worker threads and their watchdog, the `cdc-sink@v1` module, the `getTX()` bridge |
//! | [`hlc`], [`ident`], [`mutation`] | shared vocabulary |
//! | [`metrics`] | the catalogue of metric names |
//! | [`bench`] | the `cdc-sink bench` measurement; the userscript dispatch benchmark and the one bench userscript |
//! | [`cluster`] | throwaway PostgreSQL clusters (demo, bench, tests) |
//! | [`feed`] | a changefeed emulator reading a PostgreSQL source (local demo, tests) |
//! | [`workload`] | the kv write workload |
//! | [`verify`] | compares a table on two databases |
//! | [`demo`] | the local active-active demo's schema, scripts and summary |
//! | [`config`], [`civil`] | flag value parsers; calendar arithmetic for time spellings |

pub mod apply;
pub mod auth;
pub mod bench;
pub mod checkpoint;
pub mod civil;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod feed;
pub mod hlc;
pub mod ident;
pub mod metrics;
pub mod mutation;
pub mod script;
pub mod sequence;
pub mod server;
pub mod sink;
pub mod source;
pub mod stage;
pub mod target;
pub mod verify;
pub mod workload;

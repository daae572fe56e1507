//! cdc-sink: the webhook target of CockroachDB changefeeds, for active-active replication.
//!
//! A batch travels one way, each step handing it to the next and never back:
//!
//! ```text
//! changefeed ─HTTPS─▶ server ─▶ source: route, decode, auth, (script dispatch)
//!                                  │ mutations                 │ resolved timestamp
//!                                  ▼                           ▼
//!                               sequence::accept            sequence::resolved
//!                               drop rows ≤ checkpoint,     consistent/best-effort: record it
//!                               then by the schema's mode:  (checkpoint) and wake the pipeline;
//!                               consistent  ─▶ stage        immediate: commit it at once
//!                               immediate   ─▶ apply
//!                               best-effort ─▶ apply, or stage where a key has staged rows
//!                                  ▼
//!                               200 OK once durable
//!
//! sequence::consistent (lease holder per schema): read the staged window ≤ resolved in HLC
//! order ─▶ apply: upsert/delete (CAS, merge, DLQ) ─▶ retire staged rows + commit checkpoint,
//! in one target transaction per flush
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the command tree |
//! | [`sink`] | a whole sink: the `start` flags, the userscript's `setOptions`, the wiring of every part below, launch and stop |
//! | [`server`] | listener, TLS, HTTP/1.1 + HTTP/2, diagnostic routes, graceful shutdown |
//! | [`source`] | changefeed requests: URL routes, payload decoding, authentication, the userscript's dispatch, hand-off to the sequencer |
//! | [`auth`] | request authentication |
//! | [`target`] | database connections, dialect detection, retries |
//! | [`stage`] | the `_cdc_sink` staging tables |
//! | [`checkpoint`] | resolved timestamps and leases |
//! | [`sequence`] | the front door after decoding: drops redeliveries, picks each schema's mode (consistent, best-effort, immediate) and stages or applies; the consistent pipeline (lease, windows, concurrent flush transactions), the foreign-key write order, poison search, its part of `/_/status` |
//! | [`apply`] | the writer of target rows (`Applier`: mapping, upsert/delete SQL, compare-and-set, merge, dead-letter queue); the target schema cache it and the others read (`SchemaCache`); the `TableConfigs` it asks for each table's options |
//! | [`script`] | the userscript: loading (TS→JS, imports), the engine and its hooks, the worker threads and their watchdog, the `cdc-sink@v1` module, the `getTX()` bridge |
//! | [`hlc`], [`ident`], [`mutation`] | shared vocabulary |
//! | [`metrics`] | the catalogue of metric names |
//! | [`bench`](mod@bench) | the `cdc-sink bench` measurement; the userscript dispatch benchmark and the one bench userscript |
//! | [`cluster`] | throwaway PostgreSQL clusters (demo, bench, tests) |
//! | [`feed`] | a changefeed emulator reading a PostgreSQL source (local demo, tests) |
//! | [`workload`] | the kv write workload |
//! | [`verify`] | compares a table on two databases |
//! | [`demo`] | the local active-active demo's schema, scripts and summary |
//! | [`config`], [`civil`] | flag value parsers; calendar arithmetic for time spellings |
//! | [`error`] | [`error::ErrorChain`], the one printer of an error with its causes (CLI, logs) |

pub mod apply;
pub mod auth;
pub mod bench;
pub mod checkpoint;
pub mod civil;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod error;
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

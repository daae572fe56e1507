//! Write workloads that stand in for `cockroach workload run …` on one machine.
//!
//! | workload | what it does |
//! |---|---|
//! | [`kv`] | upserts into `kv(k INT8 PRIMARY KEY, v BYTEA)`, sequential or random keys |

pub mod kv;

mod histogram;

pub(crate) use histogram::Histogram;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{0}")]
    Config(String),
    #[error("invalid --table")]
    Table(#[source] crate::ident::IdentError),
    #[error("invalid --conn")]
    Conn(#[source] crate::target::TargetError),
    #[error("could not connect to {what}")]
    Connect {
        what: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not {what}")]
    Sql {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

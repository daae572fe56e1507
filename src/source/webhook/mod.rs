//! Changefeed requests → mutations. Pure logic, no I/O: [`parse_path`] routes a request by its
//! URL path, [`decode`] turns its body into a [`Payload`].
//!
//! Deliberate differences from the reference (DESIGN §3): path errors are 404 and bad bodies
//! 400 (see [`WebhookError::status`]); webhook elements accept every field CockroachDB can emit
//! (`mvcc_timestamp` is ignored) and still refuse unknown ones; `after`/`before` must be objects
//! or null and `key` an array; duplicate properties and trailing data after the envelope are
//! refused rather than silently resolved.

mod element;
mod error;
mod json;
mod ndjson;
mod path;
mod payload;
mod resolved;

pub use error::WebhookError;
pub use path::{parse_path, Route, MAX_SEGMENTS};
pub use resolved::parse_resolved_digits;

use crate::hlc::Hlc;
use crate::ident::{Ident, Table};
use crate::mutation::Mutation;
use std::collections::{BTreeMap, HashMap};

/// What a request body carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Row changes in arrival order, each with its target table. May be empty (e.g.
    /// `{"payload":[]}`, or only phantom deletes).
    Mutations(Vec<(Table, Mutation)>),
    /// A resolved timestamp for the route's schema.
    Resolved(Hlc),
    /// A body with nothing but whitespace.
    Empty,
}

/// Primary-key column names of a target table, PK order; None if the table is unknown.
pub trait PrimaryKeys {
    fn primary_key(&self, table: &Table) -> Option<Vec<Ident>>;
}

impl PrimaryKeys for HashMap<Table, Vec<Ident>> {
    fn primary_key(&self, table: &Table) -> Option<Vec<Ident>> {
        self.get(table).cloned()
    }
}

impl PrimaryKeys for BTreeMap<Table, Vec<Ident>> {
    fn primary_key(&self, table: &Table) -> Option<Vec<Ident>> {
        self.get(table).cloned()
    }
}

/// Knows no table: for table feeds, which never need primary keys.
impl PrimaryKeys for () {
    fn primary_key(&self, _: &Table) -> Option<Vec<Ident>> {
        None
    }
}

/// Bounds on what one request may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Longest accepted ndjson line, in bytes without its line ending (`--ndjsonBufferSize`).
    pub ndjson_line_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            ndjson_line_bytes: 65_536,
        }
    }
}

/// Decodes a request body for `route`. A `.RESOLVED` route never looks at the body.
pub fn decode(
    route: &Route,
    body: &[u8],
    pks: &dyn PrimaryKeys,
    limits: &DecodeLimits,
) -> Result<Payload, WebhookError> {
    match route {
        Route::Resolved { time, .. } => Ok(Payload::Resolved(*time)),
        Route::Webhook { schema, table } => {
            payload::decode_webhook(schema, table.as_ref(), body, pks)
        }
        Route::Ndjson {
            schema,
            table,
            query,
        } => ndjson::decode_ndjson(schema, table, *query, body, pks, limits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESOLVED_PATH: &str = "/db/public/2020-04-04/202004042351304139680000000000000.RESOLVED";

    #[test]
    fn a_resolved_file_route_ignores_its_body() {
        let route = parse_path(RESOLVED_PATH).unwrap();
        for body in [&b""[..], b"garbage {", b"\xff\xfe"] {
            assert_eq!(
                decode(&route, body, &(), &DecodeLimits::default()).unwrap(),
                Payload::Resolved(Hlc::new(1_586_044_290_413_968_000, 0))
            );
        }
    }

    #[test]
    fn decode_dispatches_on_the_route() {
        let limits = DecodeLimits::default();
        let webhook = parse_path("/db/public").unwrap();
        let body = br#"{"payload":[{"after":{"k":1},"key":[1],"topic":"t","updated":"5.0"}]}"#;
        let Payload::Mutations(rows) = decode(&webhook, body, &(), &limits).unwrap() else {
            panic!("expected mutations");
        };
        assert_eq!(rows[0].0, Table::new(crate::ident::Schema::new("db", "public"), "t"));

        let ndjson = parse_path("/db/public/2020-04-02/a-b-c-d-e-lines-1.ndjson").unwrap();
        let body = br#"{"after":{"k":1},"key":[1],"updated":"5.0"}"#;
        let Payload::Mutations(rows) = decode(&ndjson, body, &(), &limits).unwrap() else {
            panic!("expected mutations");
        };
        assert_eq!(rows[0].0.name.raw(), "lines");
    }

    #[test]
    fn the_default_ndjson_line_limit_is_64_kib() {
        assert_eq!(DecodeLimits::default().ndjson_line_bytes, 65_536);
    }

    #[test]
    fn routing_errors_are_404_and_body_errors_are_400() {
        assert_eq!(WebhookError::NoMatch.status(), http::StatusCode::NOT_FOUND);
        assert_eq!(
            WebhookError::NoMatch.at("x").status(),
            http::StatusCode::NOT_FOUND
        );
        assert_eq!(
            WebhookError::ZeroTime.at("payload[0]").status(),
            http::StatusCode::BAD_REQUEST
        );
        assert_eq!(
            WebhookError::UnknownField("x".into()).status(),
            http::StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn error_messages_are_one_line() {
        let route = parse_path("/db/public").unwrap();
        for body in [
            "{\n\"payload\": [\n{\"after\": {\"a\":\n",
            "{\"payload\":[{\"bogus\":1}]}",
            "{\"payload\":[{\"updated\":\"1.1\",\"key\":[1],\"topic\":\"t\"}]}",
        ] {
            let e = decode(&route, body.as_bytes(), &(), &DecodeLimits::default()).unwrap_err();
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}

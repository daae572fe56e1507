//! Changefeed requests → mutations. Pure logic, no I/O: [`parse_path`] routes a request by its
//! URL path, [`decode`] turns its body into a [`Payload`].
//!
//! Deliberate differences from the Go cdc-sink: path errors are 404 and bad bodies 400 (see
//! [`WebhookError::status`]); webhook elements accept every field CockroachDB can emit
//! (`mvcc_timestamp` is ignored) and still refuse unknown ones; `after`/`before` must be objects
//! or null and `key` an array; duplicate properties and trailing data after the envelope are
//! refused rather than silently resolved.

mod element;
mod error;
mod json;
mod limits;
mod ndjson;
mod path;
mod payload;
mod resolved;

pub(crate) use error::WebhookError;
pub use limits::{MAX_DEPTH, MAX_KEY_BYTES};
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

/// Decodes a request body for `route`. A `.RESOLVED` route never looks at the body. Rows whose
/// key or images later steps could not handle are refused (see [`MAX_DEPTH`], [`MAX_KEY_BYTES`]).
pub fn decode(
    route: &Route,
    body: &[u8],
    pks: &dyn PrimaryKeys,
    limits: &DecodeLimits,
) -> Result<Payload, WebhookError> {
    let payload = decode_unchecked(route, body, pks, limits)?;
    if let Payload::Mutations(rows) = &payload {
        limits::check(rows)?;
    }
    Ok(payload)
}

fn decode_unchecked(
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
        assert_eq!(
            rows[0].0,
            Table::new(crate::ident::Schema::new("db", "public"), "t")
        );

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

/// Hostile input: nothing may panic, whatever the bytes.
#[cfg(test)]
mod robustness {
    use super::*;

    fn routes() -> Vec<Route> {
        [
            "/db/public",
            "/db/public/tbl",
            "/db/public/2020-04-02/a-b-c-d-e-kv-1.ndjson",
            "/db/public/tbl/2020-04-02/a-b-c-d-e-kv-1.ndjson",
        ]
        .iter()
        .map(|p| parse_path(p).unwrap())
        .collect()
    }

    fn pks() -> HashMap<Table, Vec<Ident>> {
        let schema = crate::ident::Schema::new("db", "public");
        HashMap::from([(Table::new(schema, "tbl"), vec![Ident::new("pk")])])
    }

    const BODIES: [&str; 4] = [
        r#"{"payload":[{"after":{"pk":1,"k":"a\"b","n":[1.5e3,{"x":null}]},"before":{"pk":1},"key":[1],"topic":"\"T\".x","updated":"1586019746136571000.0000000001","mvcc_timestamp":"1.0"}],"length":1}"#,
        r#"{"resolved":"1586019746136571000.0000000001"}"#,
        "{\"after\":{\"pk\":1,\"s\":\"é\u{1F600}\"},\"key\":[1],\"updated\":\"1.0\"}\n{\"after\":null,\"before\":{\"pk\":2},\"key\":[2],\"updated\":\"2.0\"}\n",
        r#"{"__crdb__":{"updated":"1.0"},"pk":1}"#,
    ];

    #[test]
    fn every_prefix_of_a_valid_body_is_handled_without_panic() {
        let limits = DecodeLimits::default();
        for route in routes() {
            for body in BODIES {
                let bytes = body.as_bytes();
                for i in 0..=bytes.len() {
                    let _ = decode(&route, &bytes[..i], &pks(), &limits);
                    let _ = decode(&route, &bytes[i..], &pks(), &limits);
                }
            }
        }
    }

    #[test]
    fn the_full_bodies_decode() {
        let limits = DecodeLimits::default();
        let [webhook, _, ndjson, _] = <[Route; 4]>::try_from(routes()).unwrap();
        assert!(matches!(
            decode(&webhook, BODIES[0].as_bytes(), &pks(), &limits),
            Ok(Payload::Mutations(rows)) if rows.len() == 1 && rows[0].0.name.raw() == "x"
        ));
        assert!(matches!(
            decode(&ndjson, BODIES[2].as_bytes(), &pks(), &limits),
            Ok(Payload::Mutations(rows)) if rows.len() == 2
        ));
    }

    #[test]
    fn single_byte_corruptions_are_handled_without_panic() {
        let limits = DecodeLimits::default();
        let replacements = [
            b'"', b'{', b'}', b'[', b']', b',', b':', b'\\', b'\n', 0xff, b'0',
        ];
        for route in routes() {
            for body in BODIES {
                for i in 0..body.len() {
                    for r in replacements {
                        let mut b = body.as_bytes().to_vec();
                        b[i] = r;
                        let _ = decode(&route, &b, &pks(), &limits);
                    }
                }
            }
        }
    }

    #[test]
    fn pseudo_random_garbage_is_rejected_without_panic() {
        let limits = DecodeLimits::default();
        let alphabet = b"{}[]\",:0123456789.eE+-truefalsnl \n\\u\xc3\xa9\xff";
        // A fixed linear congruential generator keeps the test deterministic.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        for route in routes() {
            for len in 0..200 {
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1);
                        alphabet[(state >> 33) as usize % alphabet.len()]
                    })
                    .collect();
                let _ = decode(&route, &body, &pks(), &limits);
            }
        }
    }

    #[test]
    fn deep_nesting_is_handled_without_overflowing_the_stack() {
        let limits = DecodeLimits::default();
        let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
        // Inside a row image it is valid JSON, scanned without recursion, and refused: the
        // apply side could not read it.
        let deep_value = format!(
            r#"{{"payload":[{{"after":{{"pk":{open}1{close}}},"key":[1],"topic":"t","updated":"1.0"}}]}}"#
        );
        let e = decode(&routes()[0], deep_value.as_bytes(), &pks(), &limits).unwrap_err();
        assert!(
            matches!(e.root(), WebhookError::TooDeep { field: "after", .. }),
            "{e}"
        );
        // The query feed copies the deep value into the key: refused too, still without recursion.
        let query =
            format!(r#"{{"payload":[{{"after":{{"pk":{open}1{close}}},"updated":"1.0"}}]}}"#);
        let e = decode(&routes()[1], query.as_bytes(), &pks(), &limits).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        // Where the structure itself is deep, it is refused with a 400.
        let deep_payload = format!(r#"{{"payload":[{open}{close}]}}"#);
        for route in &routes()[..2] {
            let e = decode(route, deep_payload.as_bytes(), &pks(), &limits).unwrap_err();
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        }
        let deep_object = format!("{}{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        for route in routes() {
            assert!(decode(&route, deep_object.as_bytes(), &pks(), &limits).is_err());
        }
    }
}

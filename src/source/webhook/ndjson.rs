//! Cloud-storage sink files: one JSON object per line, a table feed's row or, under a table's
//! path, a CDC query's (`envelope=wrapped`).

use super::element::{ndjson_table_row, Dialect, Fields, QueryTarget};
use super::json::{is_json_ws, Object};
use super::{DecodeLimits, Payload, PrimaryKeys, WebhookError};
use crate::ident::{Ident, Schema, Table};

/// Decodes an ndjson body; every line of the request forms one batch.
pub(crate) fn decode_ndjson(
    schema: &Schema,
    table: &Ident,
    query: bool,
    body: &[u8],
    pks: &dyn PrimaryKeys,
    limits: &DecodeLimits,
) -> Result<Payload, WebhookError> {
    let table = Table::new(schema.clone(), table.raw());
    let mut target = query.then(|| QueryTarget::new(table.clone(), pks));
    let mut out = Vec::new();
    let mut any_line = false;
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let number = i + 1;
        // CRLF files: the line ends before the `\r`, as a line scanner would cut it.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > limits.ndjson_line_bytes {
            return Err(WebhookError::LineTooLong {
                line: number,
                limit: limits.ndjson_line_bytes,
            });
        }
        let at = |e: WebhookError| e.at(format!("line {number}"));
        let text = std::str::from_utf8(line).map_err(|_| at(WebhookError::NotUtf8))?;
        if text.trim_matches(is_json_ws).is_empty() {
            continue;
        }
        any_line = true;
        let row = Object::parse(text)
            .map_err(WebhookError::json)
            .and_then(|obj| match target.as_mut() {
                Some(t) => Fields::from_object(obj, Dialect::Query).and_then(|f| t.row(f)),
                None => Fields::from_object(obj, Dialect::Lenient).and_then(ndjson_table_row),
            })
            .map_err(at)?;
        if let Some(m) = row {
            out.push((table.clone(), m));
        }
    }
    Ok(if any_line {
        Payload::Mutations(out)
    } else {
        Payload::Empty
    })
}

#[cfg(test)]
mod tests {
    use super::super::{decode, parse_path, Route};
    use super::*;
    use crate::hlc::Hlc;
    use crate::mutation::Mutation;
    use std::collections::HashMap;

    const FILE: &str =
        "2020-04-02/202004022058072107140000000000000-56087568dba1e6b8-1-72-00000000-kv-1.ndjson";

    fn table_file() -> Route {
        parse_path(&format!("/db/public/{FILE}")).unwrap()
    }

    fn query_file() -> Route {
        parse_path(&format!("/db/public/tbl/{FILE}")).unwrap()
    }

    fn tbl(name: &str) -> Table {
        Table::new(Schema::new("db", "public"), name)
    }

    fn pks() -> HashMap<Table, Vec<Ident>> {
        HashMap::from([(tbl("tbl"), vec![Ident::new("pk")])])
    }

    fn run(route: &Route, body: &str, limit: usize) -> Result<Payload, WebhookError> {
        let limits = DecodeLimits {
            ndjson_line_bytes: limit,
        };
        decode(route, body.as_bytes(), &pks(), &limits)
    }

    fn rows(route: &Route, body: &str) -> Vec<(Table, Mutation)> {
        match run(route, body, 65_536) {
            Ok(Payload::Mutations(rows)) => rows,
            other => panic!("expected mutations, got {other:?}"),
        }
    }

    #[test]
    fn every_line_becomes_a_mutation_in_the_file_topic_table() {
        let body = concat!(
            r#"{"after":{"k":1},"key":[1],"updated":"1.0"}"#,
            "\n",
            r#"{"after":null,"before":{"k":2},"key":[2],"updated":"2.0000000001"}"#,
            "\n"
        );
        assert_eq!(
            rows(&table_file(), body),
            vec![
                (
                    tbl("kv"),
                    Mutation {
                        time: Hlc::new(1, 0),
                        key: "[1]".into(),
                        after: Some(r#"{"k":1}"#.into()),
                        before: None
                    }
                ),
                (
                    tbl("kv"),
                    Mutation {
                        time: Hlc::new(2, 1),
                        key: "[2]".into(),
                        after: None,
                        before: Some(r#"{"k":2}"#.into())
                    }
                ),
            ]
        );
    }

    #[test]
    fn blank_lines_and_crlf_endings_are_tolerated() {
        let body = "\n  \r\n{\"after\":{\"k\":1},\"key\":[1],\"updated\":\"1.0\"}\r\n\t\n{\"after\":{\"k\":2},\"key\":[2],\"updated\":\"1.0\"}";
        let keys: Vec<_> = rows(&table_file(), body)
            .into_iter()
            .map(|(_, m)| m.key)
            .collect();
        assert_eq!(keys, ["[1]", "[2]"]);
    }

    #[test]
    fn an_empty_or_blank_file_is_a_no_op() {
        for body in ["", "\n\n", " \r\n "] {
            assert_eq!(run(&table_file(), body, 10).unwrap(), Payload::Empty);
        }
    }

    #[test]
    fn a_line_longer_than_the_limit_is_rejected() {
        let line = r#"{"after":{"k":1},"key":[1],"updated":"1.0"}"#;
        assert!(run(&table_file(), line, line.len()).is_ok());
        let e = run(&table_file(), &format!("\n{line}\n"), line.len() - 1).unwrap_err();
        assert_eq!(
            e,
            WebhookError::LineTooLong {
                line: 2,
                limit: line.len() - 1
            }
        );
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn table_lines_ignore_unknown_properties() {
        let body = r#"{"after":{"k":1},"key":[1],"updated":"1.0","topic":"other","mvcc_timestamp":"1.0","whatever":[]}"#;
        let rows = rows(&table_file(), body);
        // The file name's topic wins over the line's.
        assert_eq!(rows[0].0, tbl("kv"));
    }

    #[test]
    fn a_line_without_updated_asks_for_the_updated_option() {
        for line in [
            r#"{"after":{"k":1},"key":[1]}"#,
            r#"{"after":{"k":1},"key":[1],"updated":""}"#,
        ] {
            let e = run(&table_file(), line, 1000).unwrap_err();
            assert_eq!(e.root(), &WebhookError::MissingUpdated);
            assert!(
                e.to_string()
                    .contains("CREATE CHANGEFEED must specify the 'WITH updated' option"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_delete_without_a_key_is_dropped() {
        let body = concat!(
            r#"{"after":null,"updated":"1.0"}"#,
            "\n",
            r#"{"before":{"k":1},"key":[],"updated":"1.0"}"#,
            "\n",
            r#"{"after":{"k":3},"key":[3],"updated":"1.0"}"#
        );
        let keys: Vec<_> = rows(&table_file(), body)
            .into_iter()
            .map(|(_, m)| m.key)
            .collect();
        assert_eq!(keys, ["[3]"]);
    }

    #[test]
    fn an_upsert_without_a_key_is_rejected() {
        let e = run(&table_file(), r#"{"after":{"k":1},"updated":"1.0"}"#, 1000).unwrap_err();
        assert_eq!(e.root(), &WebhookError::MissingKey);
    }

    #[test]
    fn an_error_names_its_line() {
        let body = concat!(
            r#"{"after":{"k":1},"key":[1],"updated":"1.0"}"#,
            "\n\n",
            r#"{"after":{"k":1},"key":[1],"updated":"0.0"}"#
        );
        let e = run(&table_file(), body, 1000).unwrap_err();
        assert_eq!(e.to_string(), "line 3: mutation has zero time");
        let e = run(&table_file(), "{\"after\":", 1000).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 1: could not decode payload: EOF"),
            "{e}"
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_rejected() {
        let limits = DecodeLimits::default();
        let body = b"{\"after\":{\"k\":1},\"key\":[1],\"updated\":\"1.0\"}\n\xff\n";
        let e = decode(&table_file(), body, &pks(), &limits).unwrap_err();
        assert_eq!(e.to_string(), "line 2: request body is not valid UTF-8");
    }

    #[test]
    fn numbers_and_whitespace_survive_in_ndjson() {
        let body =
            r#"{"after": {"k": 9007199254740995 }, "key": [ 9007199254740995 ], "updated":"1.0"}"#;
        let rows = rows(&table_file(), body);
        assert_eq!(
            rows[0].1.after.as_deref(),
            Some(r#"{"k": 9007199254740995 }"#)
        );
        assert_eq!(rows[0].1.key, "[ 9007199254740995 ]");
    }

    #[test]
    fn query_lines_build_keys_from_the_primary_key() {
        let body = concat!(
            r#"{"after":{"PK":7,"v":1},"updated":"1.0"}"#,
            "\n",
            r#"{"after":null,"before":{"pk":8},"updated":"2.0"}"#,
            "\n",
            r#"{"after":null,"before":null,"updated":"3.0"}"#
        );
        let got: Vec<_> = rows(&query_file(), body)
            .into_iter()
            .map(|(t, m)| (t, m.is_delete(), m.key))
            .collect();
        assert_eq!(
            got,
            [
                (tbl("tbl"), false, "[7]".to_string()),
                (tbl("tbl"), true, "[8]".to_string())
            ]
        );
    }

    #[test]
    fn query_lines_report_missing_keys_timestamps_and_bare_envelopes() {
        let e = run(&query_file(), r#"{"after":{"v":1},"updated":"1.0"}"#, 1000).unwrap_err();
        assert_eq!(e.to_string(), r#"line 1: missing primary key: "pk""#);
        let e = run(&query_file(), r#"{"after":{"pk":1}}"#, 1000).unwrap_err();
        assert_eq!(e.root(), &WebhookError::QueryMissingUpdated);
        let e = run(
            &query_file(),
            r#"{"pk":1,"__crdb__":{"updated":"1.0"}}"#,
            1000,
        )
        .unwrap_err();
        assert_eq!(e.root(), &WebhookError::BareEnvelope);
    }

    #[test]
    fn a_query_file_for_an_unknown_table_is_rejected() {
        let route = parse_path(&format!("/db/public/nope/{FILE}")).unwrap();
        let e = run(&route, r#"{"after":{"pk":1},"updated":"1.0"}"#, 1000).unwrap_err();
        assert!(
            e.to_string()
                .ends_with(r#"table "db.public.nope" not found"#),
            "{e}"
        );
    }
}

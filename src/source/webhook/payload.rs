//! The webhook envelope, `{"payload":[…],"length":N}` or `{"resolved":"…"}`, of a table feed
//! or, under a table's path, of a CDC query (`envelope=wrapped`).

use super::element::{webhook_table_row, Dialect, Fields, QueryTarget};
use super::json::{is_json_ws, kind, string_value, Kind, Object};
use super::{Payload, PrimaryKeys, WebhookError};
use crate::hlc::Hlc;
use crate::ident::{Ident, Schema, Table};
use serde_json::value::RawValue;

/// Decodes a webhook body for a table feed (`table` is `None`) or a CDC-query feed.
pub(crate) fn decode_webhook(
    schema: &Schema,
    table: Option<&Ident>,
    body: &[u8],
    pks: &dyn PrimaryKeys,
) -> Result<Payload, WebhookError> {
    let text = std::str::from_utf8(body).map_err(|_| WebhookError::NotUtf8)?;
    if text.trim_matches(is_json_ws).is_empty() {
        return Ok(Payload::Empty);
    }
    let top = Object::parse(text).map_err(WebhookError::json)?;
    let query = table.is_some();
    if query && top.0.iter().any(|(k, _)| k == "__crdb__") {
        return Err(WebhookError::BareEnvelope);
    }

    let mut payload: Option<&RawValue> = None;
    let mut resolved: Option<&RawValue> = None;
    let mut length_seen = false;
    for (name, value) in &top.0 {
        let slot = match name.as_ref() {
            "payload" => &mut payload,
            "resolved" => &mut resolved,
            "length" => {
                if std::mem::replace(&mut length_seen, true) {
                    return Err(WebhookError::DuplicateField("length".into()));
                }
                // Informational only; like the reference we do not compare it with the array.
                if kind(value) != Kind::Null && serde_json::from_str::<i64>(value.get()).is_err() {
                    return Err(WebhookError::WrongType {
                        field: "length",
                        expected: "an integer",
                    });
                }
                continue;
            }
            other => return Err(WebhookError::UnknownField(other.to_string())),
        };
        if slot.replace(*value).is_some() {
            return Err(WebhookError::DuplicateField(name.to_string()));
        }
    }

    if let Some(time) = resolved_time(resolved)? {
        return Ok(Payload::Resolved(time));
    }
    let elements: Vec<&RawValue> = match payload.map(|p| (p, kind(p))) {
        None | Some((_, Kind::Null)) => Vec::new(),
        Some((p, Kind::Array)) => serde_json::from_str(p.get()).map_err(WebhookError::json)?,
        Some(_) => {
            return Err(WebhookError::WrongType {
                field: "payload",
                expected: "a JSON array",
            })
        }
    };

    let mut out = Vec::with_capacity(elements.len());
    match table {
        None => {
            for (i, raw) in elements.into_iter().enumerate() {
                let row = Fields::read(raw, Dialect::Strict)
                    .and_then(|f| webhook_table_row(schema, f))
                    .map_err(|e| e.at(format!("payload[{i}]")))?;
                out.push(row);
            }
        }
        Some(name) => {
            let mut target = QueryTarget::new(Table::new(schema.clone(), name.raw()), pks);
            for (i, raw) in elements.into_iter().enumerate() {
                let row = Fields::read(raw, Dialect::Query)
                    .and_then(|f| target.row(f))
                    .map_err(|e| e.at(format!("payload[{i}]")))?;
                if let Some(m) = row {
                    out.push((target.table.clone(), m));
                }
            }
        }
    }
    Ok(Payload::Mutations(out))
}

/// A non-empty `resolved` string makes the message a resolved marker.
fn resolved_time(resolved: Option<&RawValue>) -> Result<Option<Hlc>, WebhookError> {
    let Some(raw) = resolved else {
        return Ok(None);
    };
    let wrong = || WebhookError::WrongType {
        field: "resolved",
        expected: "a string",
    };
    let text = match kind(raw) {
        Kind::Null => return Ok(None),
        Kind::String => string_value(raw).map_err(|_| wrong())?,
        _ => return Err(wrong()),
    };
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(WebhookError::BadTime)
}

#[cfg(test)]
mod tests {
    use super::super::{decode, parse_path, DecodeLimits, Route};
    use super::*;
    use crate::mutation::Mutation;
    use std::collections::HashMap;

    fn table_feed() -> Route {
        parse_path("/db/public").unwrap()
    }

    fn query_feed() -> Route {
        parse_path("/db/public/tbl").unwrap()
    }

    fn tbl(name: &str) -> Table {
        Table::new(Schema::new("db", "public"), name)
    }

    fn pks(cols: &[&str]) -> HashMap<Table, Vec<Ident>> {
        HashMap::from([(tbl("tbl"), cols.iter().map(|c| Ident::new(*c)).collect())])
    }

    fn run(route: &Route, body: &str, pks: &dyn PrimaryKeys) -> Result<Payload, WebhookError> {
        decode(route, body.as_bytes(), pks, &DecodeLimits::default())
    }

    fn rows(route: &Route, body: &str, pks: &dyn PrimaryKeys) -> Vec<(Table, Mutation)> {
        match run(route, body, pks) {
            Ok(Payload::Mutations(rows)) => rows,
            other => panic!("expected mutations, got {other:?}"),
        }
    }

    fn table_rows(body: &str) -> Vec<(Table, Mutation)> {
        rows(&table_feed(), body, &())
    }

    fn table_err(body: &str) -> WebhookError {
        run(&table_feed(), body, &()).unwrap_err()
    }

    fn one_element(element: &str) -> String {
        format!(r#"{{"payload":[{element}],"length":1}}"#)
    }

    // ---- envelope ----

    #[test]
    fn an_empty_body_is_a_no_op() {
        for body in ["", " ", "\r\n\t "] {
            assert_eq!(run(&table_feed(), body, &()).unwrap(), Payload::Empty);
            assert_eq!(run(&query_feed(), body, &()).unwrap(), Payload::Empty);
        }
    }

    #[test]
    fn a_resolved_message_yields_its_timestamp() {
        let body = r#"{"resolved":"1586019746136571000.0000000001"}"#;
        let want = Payload::Resolved(Hlc::new(1_586_019_746_136_571_000, 1));
        assert_eq!(run(&table_feed(), body, &()).unwrap(), want);
        // Query feeds post resolved markers to the same URL; no table lookup is needed.
        assert_eq!(run(&query_feed(), body, &()).unwrap(), want);
    }

    #[test]
    fn a_resolved_message_ignores_its_payload() {
        let body = r#"{"payload":[{"after":{"a":1}}],"resolved":"7.0"}"#;
        assert_eq!(
            run(&table_feed(), body, &()).unwrap(),
            Payload::Resolved(Hlc::new(7, 0))
        );
    }

    #[test]
    fn an_empty_or_null_resolved_is_not_a_marker() {
        for r in [r#""""#, "null"] {
            let body = format!(r#"{{"resolved":{r},"payload":[]}}"#);
            assert_eq!(
                run(&table_feed(), &body, &()).unwrap(),
                Payload::Mutations(vec![])
            );
        }
    }

    #[test]
    fn a_bad_resolved_timestamp_is_rejected() {
        let e = table_err(r#"{"resolved":"123.123"}"#);
        assert!(matches!(e, WebhookError::BadTime(_)), "{e}");
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        let e = table_err(r#"{"resolved":5}"#);
        assert_eq!(e.to_string(), r#"field "resolved" must be a string"#);
    }

    #[test]
    fn an_unknown_top_level_field_is_rejected() {
        let e = table_err(r#"{"payload":[],"extra":true}"#);
        assert_eq!(e, WebhookError::UnknownField("extra".into()));
        assert_eq!(e.to_string(), r#"unknown field "extra""#);
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_bare_envelope_key_is_unknown_on_a_table_feed() {
        let e = table_err(r#"{"__crdb__":{"resolved":"1.0"}}"#);
        assert_eq!(e, WebhookError::UnknownField("__crdb__".into()));
    }

    #[test]
    fn length_is_not_checked_against_the_payload_but_must_be_an_integer() {
        let el = r#"{"after":{"a":1},"key":[1],"topic":"t","updated":"1.0"}"#;
        let body = format!(r#"{{"payload":[{el}],"length":99}}"#);
        assert_eq!(table_rows(&body).len(), 1);
        let body = format!(r#"{{"payload":[{el}],"length":null}}"#);
        assert_eq!(table_rows(&body).len(), 1);
        for bad in ["1.5", "\"1\"", "[]", "99999999999999999999"] {
            let e = table_err(&format!(r#"{{"payload":[],"length":{bad}}}"#));
            assert_eq!(
                e.to_string(),
                r#"field "length" must be an integer"#,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_null_or_missing_payload_has_no_mutations() {
        for body in ["{}", r#"{"payload":null}"#, r#"{"payload":[],"length":0}"#] {
            assert_eq!(
                run(&table_feed(), body, &()).unwrap(),
                Payload::Mutations(vec![]),
                "{body}"
            );
        }
    }

    #[test]
    fn a_payload_that_is_not_an_array_is_rejected() {
        let e = table_err(r#"{"payload":{"after":{}}}"#);
        assert_eq!(e.to_string(), r#"field "payload" must be a JSON array"#);
    }

    #[test]
    fn a_body_that_is_not_an_object_is_rejected() {
        for body in ["[]", "null", "42", "\"x\""] {
            let e = table_err(body);
            assert!(matches!(e, WebhookError::Json(_)), "{body}: {e}");
        }
    }

    #[test]
    fn trailing_data_after_the_envelope_is_rejected() {
        let e = table_err(r#"{"payload":[]} {"payload":[]}"#);
        assert!(
            e.to_string()
                .starts_with("could not decode payload: trailing"),
            "{e}"
        );
    }

    #[test]
    fn a_truncated_body_is_rejected_with_a_json_reason() {
        let e = table_err(r#"{"payload":[{"after":{"a":1"#);
        assert!(
            e.to_string()
                .starts_with("could not decode payload: EOF while parsing"),
            "{e}"
        );
    }

    #[test]
    fn a_body_that_is_not_utf8_is_rejected() {
        let e = decode(
            &table_feed(),
            b"{\"payload\":[\xff]}",
            &(),
            &DecodeLimits::default(),
        )
        .unwrap_err();
        assert_eq!(e, WebhookError::NotUtf8);
    }

    #[test]
    fn a_duplicate_top_level_field_is_rejected() {
        let e = table_err(r#"{"payload":[],"payload":[]}"#);
        assert_eq!(e, WebhookError::DuplicateField("payload".into()));
        let e = table_err(r#"{"length":1,"length":1}"#);
        assert_eq!(e, WebhookError::DuplicateField("length".into()));
    }

    // ---- table-feed elements ----

    #[test]
    fn a_table_feed_element_becomes_a_mutation_in_its_topic_table() {
        let rows = table_rows(&one_element(
            r#"{"after":{"k":1,"v":"x"},"before":{"k":1,"v":"w"},"key":[1],"topic":"kv","updated":"1586019746136571000.0000000001"}"#,
        ));
        assert_eq!(
            rows,
            vec![(
                tbl("kv"),
                Mutation {
                    time: Hlc::new(1_586_019_746_136_571_000, 1),
                    key: "[1]".into(),
                    after: Some(r#"{"k":1,"v":"x"}"#.into()),
                    before: Some(r#"{"k":1,"v":"w"}"#.into()),
                }
            )]
        );
    }

    #[test]
    fn elements_keep_their_order_and_tables() {
        let body = r#"{"payload":[
            {"after":{"k":2},"key":[2],"topic":"b","updated":"2.0"},
            {"after":{"k":1},"key":[1],"topic":"a","updated":"1.0"},
            {"after":{"k":3},"key":[3],"topic":"b","updated":"1.0"}
        ]}"#;
        let got: Vec<_> = table_rows(body)
            .into_iter()
            .map(|(t, m)| (t.name.raw().to_string(), m.key))
            .collect();
        assert_eq!(
            got,
            [
                ("b".into(), "[2]".into()),
                ("a".into(), "[1]".into()),
                ("b".into(), "[3]".into())
            ]
        );
    }

    #[test]
    fn raw_bytes_are_preserved_with_whitespace() {
        let rows = table_rows(&one_element(
            "{ \"after\" :  { \"k\" : [ 1 ,2 ], \"s\":\"a\\u00e9\" } ,\n\"before\":{ }, \"key\" : [ 1,\t\"x\" ], \"topic\":\"t\", \"updated\":\"1.0\" }",
        ));
        let m = &rows[0].1;
        assert_eq!(
            m.after.as_deref(),
            Some("{ \"k\" : [ 1 ,2 ], \"s\":\"a\\u00e9\" }")
        );
        assert_eq!(m.before.as_deref(), Some("{ }"));
        assert_eq!(m.key, "[ 1,\t\"x\" ]");
    }

    #[test]
    fn numbers_are_kept_exactly() {
        let rows = table_rows(&one_element(
            r#"{"after":{"k":9007199254740995,"d":1.50,"e":1e400,"n":-0.0},"key":[9007199254740995],"topic":"t","updated":"1.0"}"#,
        ));
        let m = &rows[0].1;
        assert_eq!(
            m.after.as_deref(),
            Some(r#"{"k":9007199254740995,"d":1.50,"e":1e400,"n":-0.0}"#)
        );
        assert_eq!(m.key, "[9007199254740995]");
    }

    #[test]
    fn before_null_is_no_before_image() {
        let rows = table_rows(&one_element(
            r#"{"after":{"k":1},"before":null,"key":[1],"topic":"t","updated":"1.0"}"#,
        ));
        assert_eq!(rows[0].1.before, None);
        assert!(!rows[0].1.is_delete());
    }

    #[test]
    fn after_null_or_absent_is_a_delete() {
        for el in [
            r#"{"after":null,"before":{"k":1},"key":[1],"topic":"t","updated":"1.0"}"#,
            r#"{"before":{"k":1},"key":[1],"topic":"t","updated":"1.0"}"#,
        ] {
            let rows = table_rows(&one_element(el));
            assert!(rows[0].1.is_delete(), "{el}");
            assert_eq!(rows[0].1.after, None);
            assert_eq!(rows[0].1.before.as_deref(), Some(r#"{"k":1}"#));
        }
        // A delete without a before image (no `diff`) is still a delete.
        let rows = table_rows(&one_element(
            r#"{"after":null,"key":[1],"topic":"t","updated":"1.0"}"#,
        ));
        assert_eq!(rows[0].1.after, None);
        assert_eq!(rows[0].1.before, None);
    }

    #[test]
    fn mvcc_timestamp_is_accepted_and_ignored() {
        let rows = table_rows(&one_element(
            r#"{"after":{"k":1},"key":[1],"topic":"t","updated":"2.0","mvcc_timestamp":"1.0000000003"}"#,
        ));
        assert_eq!(rows[0].1.time, Hlc::new(2, 0));
    }

    #[test]
    fn an_unknown_element_field_is_rejected() {
        let e = table_err(&one_element(
            r#"{"after":{"k":1},"key":[1],"topic":"t","updated":"1.0","bogus":1}"#,
        ));
        assert_eq!(e.root(), &WebhookError::UnknownField("bogus".into()));
        assert_eq!(e.to_string(), r#"payload[0]: unknown field "bogus""#);
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn an_element_error_names_its_index() {
        let body = r#"{"payload":[
            {"after":{"k":1},"key":[1],"topic":"t","updated":"1.0"},
            {"after":{"k":2},"key":[2],"topic":"t","updated":"0.0"}
        ]}"#;
        assert_eq!(
            table_err(body).to_string(),
            "payload[1]: mutation has zero time"
        );
    }

    #[test]
    fn a_missing_or_empty_updated_is_rejected() {
        for el in [
            r#"{"after":{"k":1},"key":[1],"topic":"t"}"#,
            r#"{"after":{"k":1},"key":[1],"topic":"t","updated":""}"#,
            r#"{"after":{"k":1},"key":[1],"topic":"t","updated":null}"#,
        ] {
            let e = table_err(&one_element(el));
            assert_eq!(e.root(), &WebhookError::MissingUpdated, "{el}");
            assert!(e.to_string().contains("WITH updated"), "{e}");
        }
    }

    #[test]
    fn a_malformed_updated_is_rejected() {
        for bad in [r#""1.1""#, r#""abc""#, r#""-5.0""#, "15"] {
            let e = table_err(&one_element(&format!(
                r#"{{"after":{{"k":1}},"key":[1],"topic":"t","updated":{bad}}}"#
            )));
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
            assert!(
                matches!(
                    e.root(),
                    WebhookError::BadTime(_) | WebhookError::WrongType { .. }
                ),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_zero_time_is_rejected() {
        let e = table_err(&one_element(
            r#"{"after":{"k":1},"key":[1],"topic":"t","updated":"0.0000000000"}"#,
        ));
        assert_eq!(e.root(), &WebhookError::ZeroTime);
        assert!(e.to_string().ends_with("mutation has zero time"));
    }

    #[test]
    fn a_missing_null_or_empty_key_is_rejected() {
        for (key, want) in [
            ("", WebhookError::MissingKey),
            (r#","key":null"#, WebhookError::MissingKey),
            (r#","key":[]"#, WebhookError::EmptyKey),
            (r#","key":[ ]"#, WebhookError::EmptyKey),
        ] {
            let e = table_err(&one_element(&format!(
                r#"{{"after":{{"k":1}}{key},"topic":"t","updated":"1.0"}}"#
            )));
            assert_eq!(e.root(), &want, "{key}");
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn a_key_that_is_not_an_array_is_rejected() {
        let e = table_err(&one_element(
            r#"{"after":{"k":1},"key":1,"topic":"t","updated":"1.0"}"#,
        ));
        assert_eq!(
            e.to_string(),
            r#"payload[0]: field "key" must be a JSON array"#
        );
    }

    #[test]
    fn row_images_must_be_objects() {
        for f in ["after", "before"] {
            let e = table_err(&one_element(&format!(
                r#"{{"{f}":[1],"key":[1],"topic":"t","updated":"1.0"}}"#
            )));
            assert_eq!(
                e.to_string(),
                format!(r#"payload[0]: field "{f}" must be a JSON object or null"#)
            );
        }
        let e = table_err(r#"{"payload":[42]}"#);
        assert_eq!(
            e.to_string(),
            "payload[0]: a payload element must be a JSON object"
        );
    }

    #[test]
    fn an_empty_or_missing_topic_is_an_empty_table_name() {
        for topic in [r#","topic":"""#, "", r#","topic":null"#] {
            let e = table_err(&one_element(&format!(
                r#"{{"after":{{"k":1}},"key":[1],"updated":"1.0"{topic}}}"#
            )));
            assert_eq!(e.root(), &WebhookError::EmptyTableName, "{topic}");
            assert!(e.to_string().ends_with("empty table name"));
        }
    }

    #[test]
    fn a_qualified_topic_is_rerooted_in_the_url_schema() {
        for topic in [
            "kv",
            "public.kv",
            "other_db.other_sch.kv",
            r#"\"db\".\"public\".\"kv\""#,
        ] {
            let rows = table_rows(&one_element(&format!(
                r#"{{"after":{{"k":1}},"key":[1],"topic":"{topic}","updated":"1.0"}}"#
            )));
            assert_eq!(rows[0].0, tbl("kv"), "{topic}");
        }
    }

    #[test]
    fn a_topic_keeps_its_spelling_and_dashes() {
        let rows = table_rows(&one_element(
            r#"{"after":{"k":1},"key":[1],"topic":"\"My.Table\"","updated":"1.0"}"#,
        ));
        assert_eq!(rows[0].0.name.raw(), "My.Table");
    }

    #[test]
    fn a_topic_with_too_many_parts_is_rejected() {
        let e = table_err(&one_element(
            r#"{"after":{"k":1},"key":[1],"topic":"a.b.c.d","updated":"1.0"}"#,
        ));
        assert!(matches!(e.root(), WebhookError::TableName(_)), "{e}");
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        let e = table_err(&one_element(
            r#"{"after":{"k":1},"key":[1],"topic":"a..b","updated":"1.0"}"#,
        ));
        assert!(matches!(e.root(), WebhookError::TableName(_)), "{e}");
    }

    #[test]
    fn a_duplicate_element_field_is_rejected() {
        let e = table_err(&one_element(
            r#"{"after":{"k":1},"after":null,"key":[1],"topic":"t","updated":"1.0"}"#,
        ));
        assert_eq!(e.root(), &WebhookError::DuplicateField("after".into()));
    }

    #[test]
    fn escaped_property_names_are_recognised() {
        let rows = table_rows(&one_element(
            r#"{"\u0061fter":{"k":1},"key":[1],"topic":"t","updated":"1.0"}"#,
        ));
        assert_eq!(rows[0].1.after.as_deref(), Some(r#"{"k":1}"#));
    }

    // ---- CDC-query feeds ----

    #[test]
    fn a_query_upsert_builds_its_key_from_the_primary_key_columns() {
        let pks = pks(&["pk1", "pk2"]);
        let body = one_element(
            r#"{"after":{"pk2":43,"v":"x","PK1":42},"before":null,"updated":"3.0000000001"}"#,
        );
        let rows = rows(&query_feed(), &body, &pks);
        assert_eq!(
            rows,
            vec![(
                tbl("tbl"),
                Mutation {
                    time: Hlc::new(3, 1),
                    key: "[42,43]".into(),
                    after: Some(r#"{"pk2":43,"v":"x","PK1":42}"#.into()),
                    before: None,
                }
            )]
        );
    }

    #[test]
    fn a_query_delete_takes_its_key_from_before() {
        let pks = pks(&["pk"]);
        let body = one_element(r#"{"after":null,"before":{"pk":"a b","v":1},"updated":"3.0"}"#);
        let rows = rows(&query_feed(), &body, &pks);
        assert_eq!(rows[0].1.key, r#"["a b"]"#);
        assert!(rows[0].1.is_delete());
        assert_eq!(rows[0].1.before.as_deref(), Some(r#"{"pk":"a b","v":1}"#));
    }

    #[test]
    fn a_query_phantom_delete_is_dropped() {
        // No table lookup happens, so an unknown table does not matter.
        let body =
            r#"{"payload":[{"after":null,"before":null,"updated":"3.0"},{"updated":"4.0"}]}"#;
        assert_eq!(
            run(&query_feed(), body, &()).unwrap(),
            Payload::Mutations(vec![])
        );
    }

    #[test]
    fn query_key_values_are_exact_and_compact() {
        let pks = pks(&["id", "doc", "s"]);
        let body = one_element(
            r#"{"after":{"id":9007199254740995,"doc":{ "a" : [1, 2] },"s":"x  y"},"updated":"3.0"}"#,
        );
        let rows = rows(&query_feed(), &body, &pks);
        assert_eq!(rows[0].1.key, r#"[9007199254740995,{"a":[1,2]},"x  y"]"#);
    }

    #[test]
    fn a_query_key_prefers_the_exact_spelling() {
        let pks = pks(&["Id"]);
        let body = one_element(r#"{"after":{"id":1,"Id":2},"updated":"3.0"}"#);
        assert_eq!(rows(&query_feed(), &body, &pks)[0].1.key, "[2]");
    }

    #[test]
    fn a_query_row_missing_a_primary_key_column_is_rejected() {
        let pks = pks(&["pk1", "pk2"]);
        let body = one_element(r#"{"after":{"pk1":1},"updated":"3.0"}"#);
        let e = run(&query_feed(), &body, &pks).unwrap_err();
        assert_eq!(e.root(), &WebhookError::MissingPrimaryKey("pk2".into()));
        assert!(
            e.to_string().ends_with(r#"missing primary key: "pk2""#),
            "{e}"
        );
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_query_for_an_unknown_table_is_rejected() {
        let body = one_element(r#"{"after":{"pk":1},"updated":"3.0"}"#);
        let e = run(&query_feed(), &body, &()).unwrap_err();
        assert!(
            e.to_string()
                .ends_with(r#"table "db.public.tbl" not found"#),
            "{e}"
        );
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_query_for_a_table_without_primary_key_is_rejected() {
        let body = one_element(r#"{"after":{"pk":1},"updated":"3.0"}"#);
        let e = run(&query_feed(), &body, &pks(&[])).unwrap_err();
        assert!(matches!(e.root(), WebhookError::NoPrimaryKey(_)), "{e}");
    }

    #[test]
    fn the_bare_envelope_is_rejected_with_a_hint() {
        let pks = pks(&["pk"]);
        for body in [
            r#"{"__crdb__":{"resolved":"1.0"}}"#,
            r#"{"payload":[{"pk":1,"__crdb__":{"updated":"1.0"}}],"length":1}"#,
        ] {
            let e = run(&query_feed(), body, &pks).unwrap_err();
            assert_eq!(e.root(), &WebhookError::BareEnvelope, "{body}");
            assert!(e.to_string().contains(r#"envelope="wrapped""#), "{e}");
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn a_query_row_without_updated_is_rejected() {
        let body = one_element(r#"{"after":{"pk":1}}"#);
        let e = run(&query_feed(), &body, &pks(&["pk"])).unwrap_err();
        assert_eq!(e.root(), &WebhookError::QueryMissingUpdated);
        assert!(e.to_string().ends_with(
            r#"could not find timestamp in field "updated" while attempting to parse envelope=wrapped"#
        ));
    }

    #[test]
    fn query_rows_ignore_other_properties() {
        let body = one_element(
            r#"{"after":{"pk":1},"updated":"3.0","key":"not an array","topic":7,"extra":{}}"#,
        );
        let rows = rows(&query_feed(), &body, &pks(&["pk"]));
        assert_eq!(rows[0].1.key, "[1]");
    }

    #[test]
    fn a_query_feed_still_rejects_unknown_top_level_fields() {
        let e = run(&query_feed(), r#"{"payload":[],"nope":1}"#, &pks(&["pk"])).unwrap_err();
        assert_eq!(e, WebhookError::UnknownField("nope".into()));
    }
}

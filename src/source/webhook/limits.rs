//! Bounds that later steps impose, checked at ingest so that a row that could never be applied
//! is refused with a 400 instead of being staged and failing for ever.

use super::WebhookError;
use crate::ident::Table;
use crate::mutation::Mutation;

/// Deepest accepted nesting of a row image or key, the image itself counting as one level.
/// serde_json refuses documents nested 128 levels deep, and the apply side parses whole images
/// (CAS and merge images, userscript conversion), sometimes inside an envelope; 100 leaves room.
pub const MAX_DEPTH: usize = 100;

/// Longest accepted key, in bytes of its JSON. The staging primary key is `(nanos, logical,
/// key)`, and a PostgreSQL btree entry holds at most 2,704 bytes on 8 KiB pages: 2,600 leaves
/// room for the two integers and the tuple headers.
pub const MAX_KEY_BYTES: usize = 2_600;

/// Refuses the first row that the staging index or the apply side could not handle.
pub(crate) fn check(rows: &[(Table, Mutation)]) -> Result<(), WebhookError> {
    for (table, m) in rows {
        if m.key.len() > MAX_KEY_BYTES {
            return Err(WebhookError::KeyTooLarge {
                table: table.clone(),
                bytes: m.key.len(),
                limit: MAX_KEY_BYTES,
            });
        }
        let images = [
            ("key", Some(&m.key)),
            ("after", m.after.as_ref()),
            ("before", m.before.as_ref()),
        ];
        for (field, text) in images {
            if text.is_some_and(|t| deeper_than(t, MAX_DEPTH)) {
                return Err(WebhookError::TooDeep {
                    table: table.clone(),
                    field,
                    limit: MAX_DEPTH,
                });
            }
        }
    }
    Ok(())
}

/// True when the JSON `text` nests arrays and objects more than `limit` levels deep. One pass
/// over the bytes, no recursion; `text` is already known to be valid JSON.
pub(crate) fn deeper_than(text: &str, limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text.as_bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ident::Schema;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn depth_counts_arrays_and_objects_but_not_brackets_in_strings() {
        assert!(!deeper_than("1", 0));
        assert!(deeper_than("[]", 0));
        assert!(!deeper_than(&nested(100), 100));
        assert!(deeper_than(&nested(101), 100));
        assert!(!deeper_than(r#"{"a":{"b":[1,{"c":2}]}}"#, 4));
        assert!(deeper_than(r#"{"a":{"b":[1,{"c":2}]}}"#, 3));
        // Brackets and escaped quotes inside strings are text.
        assert!(!deeper_than(r#"{"a":"[[[[\"{{{{","b":"\\"}"#, 1));
        assert!(!deeper_than(&format!("[{:?}]", "[".repeat(500)), 1));
    }

    #[test]
    fn serde_reads_every_image_the_limit_lets_through() {
        // The limit must stay below serde's, with room for one enclosing envelope.
        let image = format!(r#"{{"k":{}}}"#, nested(MAX_DEPTH - 1));
        assert!(!deeper_than(&image, MAX_DEPTH));
        let envelope = format!(r#"{{"after":{image}}}"#);
        serde_json::from_str::<serde_json::Value>(&envelope).expect("within serde's limit");
    }

    fn row(key: String, after: Option<String>) -> (Table, Mutation) {
        let table = Table::new(Schema::new("db", "public"), "t");
        let m = Mutation {
            time: Hlc::new(1, 0),
            key,
            after,
            before: None,
        };
        (table, m)
    }

    #[test]
    fn deep_images_and_large_keys_are_refused_with_the_table_and_size() {
        let deep = format!(r#"{{"k":{}}}"#, nested(MAX_DEPTH));
        let e = check(&[row("[1]".into(), Some(deep))]).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(
            e.to_string(),
            "table \"db.public.t\": field \"after\" is nested deeper than 100 levels"
        );
        let secret = "s".repeat(MAX_KEY_BYTES);
        let e = check(&[row(format!("[\"{secret}\"]"), None)]).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        let text = e.to_string();
        assert!(
            text.contains("db.public.t") && text.contains("2604 bytes"),
            "{text}"
        );
        assert!(
            !text.contains("sss"),
            "the key's value must not be echoed: {text}"
        );
        let fits = format!("[\"{}\"]", "s".repeat(MAX_KEY_BYTES - 4));
        assert!(check(&[row(fits, Some(format!("{{\"k\":{}}}", nested(99))))]).is_ok());
    }
}

//! PostgreSQL text values → the JSON CockroachDB writes in changefeed messages, and the
//! messages themselves. Objects are written the way CockroachDB prints JSON: keys sorted,
//! `": "` and `", "` separators.

use super::pgoutput::Datum;
use super::FeedError;
use crate::apply::canonical::is_json_number;
use crate::hlc::Hlc;

/// How a column's text value becomes JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Integers: the text is already an exact JSON number.
    Integer,
    /// Floats and decimals: a JSON number, except `NaN`/`Infinity`, which CockroachDB writes
    /// as strings.
    Number,
    Bool,
    /// `json`/`jsonb`: the text is JSON.
    Json,
    Timestamp,
    TimestampTz,
    /// An array of `Kind` whose text uses `delimiter` between elements.
    Array(Box<Kind>, u8),
    /// Everything else (text, bytea's `\x…` hex, dates, uuids, enums, …) is a JSON string.
    Text,
}

impl Kind {
    /// Built-in types by OID; `None` means "ask the catalog" (domains, enums, user arrays).
    pub(crate) fn builtin(oid: u32) -> Option<Kind> {
        let array = |k: Kind| Some(Kind::Array(Box::new(k), b','));
        match oid {
            20 | 21 | 23 | 26 => Some(Kind::Integer),
            700 | 701 | 1700 => Some(Kind::Number),
            16 => Some(Kind::Bool),
            114 | 3802 => Some(Kind::Json),
            1114 => Some(Kind::Timestamp),
            1184 => Some(Kind::TimestampTz),
            // text-like scalars
            17 | 18 | 19 | 25 | 142 | 650 | 790 | 829 | 774 | 869 | 1042 | 1043 | 1082 | 1083
            | 1186 | 1266 | 1560 | 1562 | 2950 | 3614 | 3615 => Some(Kind::Text),
            1005 | 1007 | 1016 | 1028 => array(Kind::Integer),
            1021 | 1022 | 1231 => array(Kind::Number),
            1000 => array(Kind::Bool),
            199 | 3807 => array(Kind::Json),
            1115 => array(Kind::Timestamp),
            1185 => array(Kind::TimestampTz),
            1001 | 1002 | 1003 | 1009 | 1014 | 1015 | 1182 | 1183 | 1187 | 1270 | 2951 | 1041
            | 651 | 1561 | 1563 | 791 | 143 | 1040 => array(Kind::Text),
            603 => Some(Kind::Text),
            1020 => Some(Kind::Array(Box::new(Kind::Text), b';')),
            _ => None,
        }
    }

    /// From `pg_type` facts: `typcategory` and, for arrays, the element's kind.
    pub(crate) fn from_category(category: u8, element: Option<Kind>, delimiter: u8) -> Kind {
        match (category, element) {
            (b'A', Some(e)) => Kind::Array(Box::new(e), delimiter),
            (b'B', _) => Kind::Bool,
            _ => Kind::Text,
        }
    }
}

/// Appends `s` as a JSON string.
pub(crate) fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `2016-01-25 10:10:10.5+00` → `2016-01-25T10:10:10.5Z`; `+05:30` offsets are kept. Values
/// that are not plain ISO timestamps (`infinity`, BC dates) pass through unchanged.
fn rfc3339(text: &str, with_zone: bool) -> String {
    let plain = text.len() >= 19
        && text.as_bytes()[10] == b' '
        && text.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && !text.ends_with(" BC");
    if !plain {
        return text.to_string();
    }
    let mut s = text.replacen(' ', "T", 1);
    if with_zone {
        // The offset starts at the last sign after the time of day.
        if let Some(pos) = s[19..].rfind(['+', '-']).map(|p| p + 19) {
            let offset = s[pos..].to_string();
            s.truncate(pos);
            match offset.as_str() {
                "+00" | "+00:00" | "-00" => s.push('Z'),
                o if o.len() == 3 => {
                    s.push_str(o);
                    s.push_str(":00");
                }
                o => s.push_str(o),
            }
        }
    }
    s
}

/// Appends the JSON for one PostgreSQL text value of `kind`.
pub(crate) fn push_value(out: &mut String, kind: &Kind, text: &str) -> Result<(), FeedError> {
    match kind {
        Kind::Integer | Kind::Number if is_json_number(text) => out.push_str(text),
        Kind::Integer | Kind::Number => push_json_string(out, text),
        Kind::Bool => out.push_str(match text {
            "t" | "true" => "true",
            "f" | "false" => "false",
            // The value itself stays out of the message: errors end up in logs.
            _ => {
                return Err(FeedError::Decode(
                    "a boolean column has a value that is not t or f".into(),
                ))
            }
        }),
        Kind::Json => out.push_str(text),
        Kind::Timestamp => push_json_string(out, &rfc3339(text, false)),
        Kind::TimestampTz => push_json_string(out, &rfc3339(text, true)),
        Kind::Text => push_json_string(out, text),
        Kind::Array(element, delimiter) => {
            let mut p = ArrayParser {
                s: text.as_bytes(),
                pos: 0,
                delimiter: *delimiter,
            };
            p.skip_dimensions()?;
            p.array(out, element)?;
            if p.pos != p.s.len() {
                return Err(p.error("trailing characters"));
            }
        }
    }
    Ok(())
}

/// Parses `array_out`'s text (`{1,2}`, `{{"a b",NULL}}`, `[0:1]={…}`).
struct ArrayParser<'a> {
    s: &'a [u8],
    pos: usize,
    delimiter: u8,
}

impl ArrayParser<'_> {
    fn error(&self, what: &str) -> FeedError {
        FeedError::Decode(format!("array text: {what} at offset {}", self.pos))
    }

    fn skip_dimensions(&mut self) -> Result<(), FeedError> {
        if self.s.first() == Some(&b'[') {
            let eq = self
                .s
                .windows(2)
                .position(|w| w == b"={")
                .ok_or_else(|| self.error("dimensions without '='"))?;
            self.pos = eq + 1;
        }
        Ok(())
    }

    fn array(&mut self, out: &mut String, element: &Kind) -> Result<(), FeedError> {
        if self.s.get(self.pos) != Some(&b'{') {
            return Err(self.error("expected '{'"));
        }
        self.pos += 1;
        out.push('[');
        if self.s.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            out.push(']');
            return Ok(());
        }
        let mut first = true;
        loop {
            if !first {
                out.push_str(", ");
            }
            first = false;
            match self.s.get(self.pos) {
                Some(b'{') => self.array(out, element)?,
                Some(b'"') => {
                    let text = self.quoted()?;
                    push_value(out, element, &text)?;
                }
                Some(_) => {
                    let start = self.pos;
                    while let Some(&c) = self.s.get(self.pos) {
                        if c == self.delimiter || c == b'}' {
                            break;
                        }
                        self.pos += 1;
                    }
                    let raw = String::from_utf8_lossy(&self.s[start..self.pos]);
                    let raw = raw.trim();
                    if raw.eq_ignore_ascii_case("NULL") {
                        out.push_str("null");
                    } else {
                        push_value(out, element, raw)?;
                    }
                }
                None => return Err(self.error("unterminated array")),
            }
            match self.s.get(self.pos) {
                Some(&c) if c == self.delimiter => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    out.push(']');
                    return Ok(());
                }
                _ => return Err(self.error("expected a delimiter or '}'")),
            }
        }
    }

    fn quoted(&mut self) -> Result<String, FeedError> {
        self.pos += 1;
        let mut bytes = Vec::new();
        loop {
            match self.s.get(self.pos) {
                Some(b'\\') => {
                    let c = *self
                        .s
                        .get(self.pos + 1)
                        .ok_or_else(|| self.error("dangling escape"))?;
                    bytes.push(c);
                    self.pos += 2;
                }
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(String::from_utf8_lossy(&bytes).into_owned());
                }
                Some(&c) => {
                    bytes.push(c);
                    self.pos += 1;
                }
                None => return Err(self.error("unterminated quoted element")),
            }
        }
    }
}

/// The shape of one fed table: topic, columns in JSON key order, key columns in key order.
#[derive(Clone, Debug)]
pub(crate) struct Shape {
    pub(crate) topic: String,
    /// `(name, kind, position in the tuple)`, sorted by name.
    pub(crate) columns: Vec<(String, Kind, usize)>,
    /// Tuple positions of the primary-key columns, in key order.
    pub(crate) key: Vec<usize>,
}

fn datum_text(datums: &[Datum], i: usize) -> Option<Option<&[u8]>> {
    match datums.get(i)? {
        Datum::Null => Some(None),
        Datum::Unchanged => None,
        Datum::Text(t) => Some(Some(t)),
    }
}

impl Shape {
    /// A row image as a JSON object; unchanged TOAST values are taken from `fallback` (the old
    /// row). Columns whose value is unknown are left out and named in `missing`.
    pub(crate) fn object(
        &self,
        datums: &[Datum],
        fallback: Option<&[Datum]>,
        missing: &mut Vec<String>,
    ) -> Result<String, FeedError> {
        let mut out = String::with_capacity(64);
        out.push('{');
        let mut first = true;
        for (name, kind, pos) in &self.columns {
            let Some(value) =
                datum_text(datums, *pos).or_else(|| fallback.and_then(|f| datum_text(f, *pos)))
            else {
                missing.push(name.clone());
                continue;
            };
            if !first {
                out.push_str(", ");
            }
            first = false;
            push_json_string(&mut out, name);
            out.push_str(": ");
            match value {
                None => out.push_str("null"),
                Some(t) => push_value(&mut out, kind, &String::from_utf8_lossy(t))?,
            }
        }
        out.push('}');
        Ok(out)
    }

    /// The primary key as a JSON array.
    pub(crate) fn key(&self, datums: &[Datum]) -> Result<String, FeedError> {
        let mut out = String::from("[");
        for (n, pos) in self.key.iter().enumerate() {
            if n > 0 {
                out.push_str(", ");
            }
            let kind = self
                .columns
                .iter()
                .find(|c| c.2 == *pos)
                .map(|c| &c.1)
                .unwrap_or(&Kind::Text);
            match datum_text(datums, *pos) {
                Some(Some(t)) => push_value(&mut out, kind, &String::from_utf8_lossy(t))?,
                _ => {
                    return Err(FeedError::Decode(format!(
                        "{}: a primary-key value is missing from the change",
                        self.topic
                    )))
                }
            }
        }
        out.push(']');
        Ok(out)
    }
}

/// One changefeed message in CockroachDB's wrapped envelope. `before` is `Some` with `diff`
/// (the text `null` when there is no old row).
pub(crate) fn message(
    after: Option<&str>,
    before: Option<&str>,
    key: &str,
    topic: &str,
    updated: Hlc,
) -> String {
    let mut out =
        String::with_capacity(64 + after.map_or(0, str::len) + before.map_or(0, str::len));
    out.push_str("{\"after\": ");
    out.push_str(after.unwrap_or("null"));
    if let Some(b) = before {
        out.push_str(", \"before\": ");
        out.push_str(b);
    }
    out.push_str(", \"key\": ");
    out.push_str(key);
    out.push_str(", \"topic\": ");
    push_json_string(&mut out, topic);
    out.push_str(", \"updated\": \"");
    out.push_str(&updated.to_string());
    out.push_str("\"}");
    out
}

/// The webhook body carrying `messages`.
pub(crate) fn payload<S: AsRef<str>>(messages: &[S]) -> String {
    let size: usize = messages.iter().map(|m| m.as_ref().len() + 1).sum();
    let mut out = String::with_capacity(size + 32);
    out.push_str("{\"payload\":[");
    for (n, m) in messages.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(m.as_ref());
    }
    out.push_str("],\"length\":");
    out.push_str(&messages.len().to_string());
    out.push('}');
    out
}

/// The body of a resolved-timestamp message.
pub(crate) fn resolved(at: Hlc) -> String {
    format!("{{\"resolved\":\"{at}\"}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: &Kind, text: &str) -> String {
        let mut s = String::new();
        push_value(&mut s, kind, text).expect("converts");
        s
    }

    fn text_array() -> Kind {
        Kind::builtin(1009).expect("text[]")
    }

    #[test]
    fn scalars_convert_like_cockroachdb() {
        assert_eq!(json(&Kind::Integer, "9007199254740995"), "9007199254740995");
        assert_eq!(json(&Kind::Number, "-1.2300"), "-1.2300");
        assert_eq!(json(&Kind::Number, "1e+30"), "1e+30");
        assert_eq!(json(&Kind::Number, "NaN"), "\"NaN\"");
        assert_eq!(json(&Kind::Number, "-Infinity"), "\"-Infinity\"");
        assert_eq!(json(&Kind::Bool, "t"), "true");
        assert_eq!(json(&Kind::Bool, "f"), "false");
        assert!(push_value(&mut String::new(), &Kind::Bool, "x").is_err());
        assert_eq!(
            json(&Kind::Text, "a\"b\\c\nd\u{1}é"),
            "\"a\\\"b\\\\c\\nd\\u0001é\""
        );
        assert_eq!(json(&Kind::Text, "\\x0aff"), "\"\\\\x0aff\"");
        assert_eq!(
            json(&Kind::Json, "{\"a\": [1, 2.50]}"),
            "{\"a\": [1, 2.50]}"
        );
    }

    #[test]
    fn timestamps_become_rfc3339() {
        assert_eq!(
            json(&Kind::TimestampTz, "2016-01-25 10:10:10.555555+00"),
            "\"2016-01-25T10:10:10.555555Z\""
        );
        assert_eq!(
            json(&Kind::TimestampTz, "2016-01-25 10:10:10+05:30"),
            "\"2016-01-25T10:10:10+05:30\""
        );
        assert_eq!(
            json(&Kind::TimestampTz, "2016-01-25 10:10:10-08"),
            "\"2016-01-25T10:10:10-08:00\""
        );
        assert_eq!(
            json(&Kind::Timestamp, "2016-01-25 10:10:10.5"),
            "\"2016-01-25T10:10:10.5\""
        );
        assert_eq!(json(&Kind::TimestampTz, "infinity"), "\"infinity\"");
        assert_eq!(
            json(&Kind::Timestamp, "0044-03-15 00:00:00 BC"),
            "\"0044-03-15 00:00:00 BC\""
        );
    }

    #[test]
    fn arrays_parse_quotes_nulls_and_nesting() {
        assert_eq!(json(&text_array(), "{}"), "[]");
        assert_eq!(
            json(&text_array(), r#"{sky,"road x","a\"b\\c",NULL,"NULL",""}"#),
            r#"["sky", "road x", "a\"b\\c", null, "NULL", ""]"#
        );
        let ints = Kind::builtin(1016).expect("int8[]");
        assert_eq!(json(&ints, "{{1,2},{3,NULL}}"), "[[1, 2], [3, null]]");
        assert_eq!(json(&ints, "[0:1]={7,8}"), "[7, 8]");
        let jsons = Kind::builtin(3807).expect("jsonb[]");
        assert_eq!(
            json(&jsons, r#"{"{\"a\": 1}",null}"#),
            r#"[{"a": 1}, null]"#
        );
        let bools = Kind::builtin(1000).expect("bool[]");
        assert_eq!(json(&bools, "{t,f}"), "[true, false]");
        for bad in ["{1,2", "{\"a}", "1,2}", "{1}x", "[1:2]{1}"] {
            assert!(push_value(&mut String::new(), &ints, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_and_payloads_have_the_webhook_shape() {
        let shape = Shape {
            topic: "kv".into(),
            columns: vec![("k".into(), Kind::Integer, 0), ("v".into(), Kind::Text, 1)],
            key: vec![0],
        };
        let row = vec![Datum::Text(b"1".to_vec()), Datum::Null];
        let after = shape.object(&row, None, &mut vec![]).expect("object");
        assert_eq!(after, r#"{"k": 1, "v": null}"#);
        let key = shape.key(&row).expect("key");
        assert_eq!(key, "[1]");
        let at = Hlc::new(1_700_000_000_000_000_000, 3);
        let m = message(Some(&after), Some("null"), &key, "kv", at);
        assert_eq!(
            m,
            r#"{"after": {"k": 1, "v": null}, "before": null, "key": [1], "topic": "kv", "updated": "1700000000000000000.0000000003"}"#
        );
        let d = message(None, None, &key, "kv", at);
        assert_eq!(
            d,
            r#"{"after": null, "key": [1], "topic": "kv", "updated": "1700000000000000000.0000000003"}"#
        );
        let body = payload(&[m.clone(), d]);
        let v: serde_json::Value = serde_json::from_str(&body).expect("valid json");
        assert_eq!(v["length"], 2);
        assert_eq!(v["payload"][0]["after"]["k"], 1);
        assert_eq!(
            resolved(at),
            r#"{"resolved":"1700000000000000000.0000000003"}"#
        );
        let unchanged = vec![Datum::Text(b"1".to_vec()), Datum::Unchanged];
        let mut missing = vec![];
        assert_eq!(
            shape
                .object(&unchanged, None, &mut missing)
                .expect("partial"),
            r#"{"k": 1}"#
        );
        assert_eq!(missing, vec!["v".to_string()]);
        let old = vec![Datum::Text(b"1".to_vec()), Datum::Text(b"big".to_vec())];
        missing.clear();
        assert_eq!(
            shape
                .object(&unchanged, Some(&old), &mut missing)
                .expect("filled"),
            r#"{"k": 1, "v": "big"}"#
        );
        assert!(missing.is_empty());
    }
}

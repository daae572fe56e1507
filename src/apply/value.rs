//! Changefeed JSON values → text parameters for the target column's input function.
//!
//! Every value travels as text inside a `TEXT[]` parameter and is cast in SQL, so the database
//! does all type conversion (and reports range/precision errors itself).

use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;

/// How a column's values are turned into text, derived from its type string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Scalars: strings pass through, numbers as plain decimals, booleans as `true`/`false`.
    Scalar,
    /// `JSON`/`JSONB`: the JSON text of any value.
    Json,
    /// `GEOGRAPHY`/`GEOMETRY`: GeoJSON objects as JSON text (strings pass through).
    Geo,
    /// `X[]`: JSON arrays become array literals; `json` when the elements are JSON documents.
    Array { json: bool },
}

impl Kind {
    pub fn of(data_type: &str) -> Kind {
        let base = base_type(data_type);
        if let Some(elem) = base.strip_suffix("[]") {
            return Kind::Array {
                json: matches!(elem, "JSON" | "JSONB"),
            };
        }
        match base {
            "JSON" | "JSONB" => Kind::Json,
            "GEOGRAPHY" | "GEOMETRY" => Kind::Geo,
            _ => Kind::Scalar,
        }
    }
}

/// The type without a trailing `COLLATE` clause.
pub fn base_type(data_type: &str) -> &str {
    match data_type.find(" COLLATE ") {
        Some(i) => &data_type[..i],
        None => data_type,
    }
}

/// Converts one JSON value (as sent) into the text parameter for a column of `kind`; JSON
/// `null` is SQL NULL.
pub fn to_param(kind: Kind, raw: &RawValue) -> Result<Option<String>, serde_json::Error> {
    let text = raw.get().trim();
    let Some(&first) = text.as_bytes().first() else {
        return Ok(None);
    };
    if first == b'n' {
        return Ok(None);
    }
    if kind == Kind::Json {
        return Ok(Some(text.to_string()));
    }
    Ok(Some(match first {
        b'"' => unquote(text)?,
        b't' => "true".to_string(),
        b'f' => "false".to_string(),
        b'[' => match kind {
            Kind::Array { json } => {
                let v: Value = serde_json::from_str(text)?;
                let mut out = String::with_capacity(text.len() + 2);
                array_literal(&v, json, &mut out);
                out
            }
            _ => text.to_string(),
        },
        b'{' => text.to_string(),
        _ => normalise_number(text).into_owned(),
    }))
}

/// The content of a JSON string, without a copy-and-parse when it has no escapes.
fn unquote(text: &str) -> Result<String, serde_json::Error> {
    if !text.contains('\\') && text.len() >= 2 {
        return Ok(text[1..text.len() - 1].to_string());
    }
    serde_json::from_str(text)
}

/// Writes a PostgreSQL array literal (`{"a","b\"c",NULL}`) for a JSON array. Strings are always
/// quoted, so words like `NULL` or text with commas and braces survive; JSON-typed elements are
/// written as their JSON text.
pub fn array_literal(v: &Value, json: bool, out: &mut String) {
    match v {
        Value::Array(items) => {
            out.push('{');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match item {
                    Value::Null => out.push_str("NULL"),
                    Value::Array(_) if !json => array_literal(item, json, out),
                    _ if json => quote_element(&item.to_string(), out),
                    Value::String(s) => quote_element(s, out),
                    Value::Number(n) => out.push_str(&normalise_number(n.as_str())),
                    Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                    Value::Object(_) | Value::Array(_) => quote_element(&item.to_string(), out),
                }
            }
            out.push('}');
        }
        // Not an array: the element itself, which the database will reject or accept.
        other => quote_element(&other.to_string(), out),
    }
}

fn quote_element(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Largest exponent we expand; beyond it the text goes through as sent (`NUMERIC` and `FLOAT`
/// parse exponents themselves; integers that large are out of range anyway), which keeps a
/// hostile `1e999999999` from allocating a gigabyte.
const MAX_EXPANDED_EXPONENT: i64 = 1000;

/// Rewrites a JSON number in plain decimal notation: `4E+2`→`400`, `4E-2`→`0.04`,
/// `4.321E10`→`43210000000`. Numbers without an exponent are returned untouched.
pub fn normalise_number(s: &str) -> Cow<'_, str> {
    let Some(e) = s.find(['e', 'E']) else {
        return Cow::Borrowed(s);
    };
    let (mantissa, exp) = (&s[..e], &s[e + 1..]);
    let exp: i64 = match exp.parse() {
        Ok(x) if (-MAX_EXPANDED_EXPONENT..=MAX_EXPANDED_EXPONENT).contains(&x) => x,
        _ => return Cow::Borrowed(s),
    };
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Cow::Borrowed(s);
    }
    let digits: String = [int, frac].concat();
    // Where the decimal point falls inside `digits`.
    let point = int.len() as i64 + exp;
    let mut plain = String::with_capacity(digits.len() + exp.unsigned_abs() as usize + 3);
    if point <= 0 {
        plain.push_str("0.");
        plain.extend(std::iter::repeat_n('0', (-point) as usize));
        plain.push_str(&digits);
    } else if point as usize >= digits.len() {
        plain.push_str(&digits);
        plain.extend(std::iter::repeat_n('0', point as usize - digits.len()));
    } else {
        plain.push_str(&digits[..point as usize]);
        plain.push('.');
        plain.push_str(&digits[point as usize..]);
    }
    let int_len = plain.find('.').unwrap_or(plain.len());
    let zeros = plain[..int_len]
        .bytes()
        .take_while(|&b| b == b'0')
        .count()
        .min(int_len - 1);
    let plain = &plain[zeros..];
    Cow::Owned(if negative {
        format!("-{plain}")
    } else {
        plain.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(kind: Kind, json: &str) -> Option<String> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        to_param(kind, &raw).unwrap()
    }

    #[test]
    fn exponents_are_expanded_to_plain_decimals() {
        for (input, want) in [
            ("4E+2", "400"),
            ("4e2", "400"),
            ("4E-2", "0.04"),
            ("4.321E10", "43210000000"),
            ("4.98765e+2", "498.765"),
            ("-1.5e1", "-15"),
            ("0.5E1", "5"),
            ("100e-2", "1.00"),
            ("1e0", "1"),
            ("-4e-3", "-0.004"),
        ] {
            assert_eq!(normalise_number(input), want, "{input}");
        }
        assert_eq!(normalise_number("4e+50"), format!("4{}", "0".repeat(50)));
    }

    #[test]
    fn numbers_without_exponent_and_absurd_exponents_pass_through() {
        assert!(matches!(
            normalise_number("9007199254740995"),
            Cow::Borrowed("9007199254740995")
        ));
        assert_eq!(normalise_number("148591304110702593"), "148591304110702593");
        assert_eq!(normalise_number("1.2345"), "1.2345");
        assert_eq!(normalise_number("1e999999999"), "1e999999999");
        assert_eq!(
            normalise_number("1e99999999999999999999999"),
            "1e99999999999999999999999"
        );
    }

    #[test]
    fn scalars_convert_to_their_input_text() {
        assert_eq!(
            conv(Kind::Scalar, "9007199254740995").as_deref(),
            Some("9007199254740995")
        );
        assert_eq!(conv(Kind::Scalar, "4e+2").as_deref(), Some("400"));
        assert_eq!(
            conv(Kind::Scalar, r#""a1\\b/2?c\"3""#).as_deref(),
            Some(r#"a1\b/2?c"3"#)
        );
        assert_eq!(
            conv(Kind::Scalar, r#""\\x613162326333""#).as_deref(),
            Some(r"\x613162326333")
        );
        assert_eq!(conv(Kind::Scalar, "true").as_deref(), Some("true"));
        assert_eq!(conv(Kind::Scalar, "false").as_deref(), Some("false"));
        assert_eq!(conv(Kind::Scalar, "null"), None);
        assert_eq!(conv(Kind::Scalar, r#""plain""#).as_deref(), Some("plain"));
    }

    #[test]
    fn json_columns_get_the_json_text_of_any_value() {
        let doc = r#"{"a":[1,2.50,{"b":null}],"c":"d"}"#;
        assert_eq!(conv(Kind::Json, doc).as_deref(), Some(doc));
        assert_eq!(conv(Kind::Json, r#""s""#).as_deref(), Some(r#""s""#));
        assert_eq!(conv(Kind::Json, "4e+2").as_deref(), Some("4e+2"));
        assert_eq!(conv(Kind::Json, "[1,2]").as_deref(), Some("[1,2]"));
        assert_eq!(conv(Kind::Json, "false").as_deref(), Some("false"));
        assert_eq!(conv(Kind::Json, "null"), None);
    }

    #[test]
    fn arrays_become_literals_with_quoting_and_nulls() {
        let a = Kind::Array { json: false };
        assert_eq!(
            conv(a, r#"["sky","road","car"]"#).as_deref(),
            Some(r#"{"sky","road","car"}"#)
        );
        assert_eq!(conv(a, "[1,null,3e2]").as_deref(), Some("{1,NULL,300}"));
        assert_eq!(
            conv(a, "[true,false,null]").as_deref(),
            Some("{true,false,NULL}")
        );
        assert_eq!(
            conv(a, r#"["a,b","q\"uote","back\\slash","NULL","{}",null,""]"#).as_deref(),
            Some(r#"{"a,b","q\"uote","back\\slash","NULL","{}",NULL,""}"#)
        );
        assert_eq!(
            conv(a, r#"[["a",null],["c","d"]]"#).as_deref(),
            Some(r#"{{"a",NULL},{"c","d"}}"#)
        );
        assert_eq!(conv(a, "[]").as_deref(), Some("{}"));
        assert_eq!(conv(a, r#""{x,y}""#).as_deref(), Some("{x,y}"));
        assert_eq!(conv(a, "null"), None);
    }

    #[test]
    fn json_arrays_quote_each_document() {
        let a = Kind::Array { json: true };
        assert_eq!(
            conv(a, r#"[{"k":"v"},[1],"s",null]"#).as_deref(),
            Some(r#"{"{\"k\":\"v\"}","[1]","\"s\"",NULL}"#)
        );
    }

    #[test]
    fn geo_values_pass_as_geojson_text() {
        let g = r#"{"type":"Point","coordinates":[1,2]}"#;
        assert_eq!(conv(Kind::Geo, g).as_deref(), Some(g));
        assert_eq!(
            conv(Kind::Geo, &serde_json::to_string(g).unwrap()).as_deref(),
            Some(g)
        );
    }

    #[test]
    fn kinds_follow_the_type_string() {
        assert_eq!(Kind::of("INT8"), Kind::Scalar);
        assert_eq!(Kind::of("JSONB"), Kind::Json);
        assert_eq!(Kind::of("JSON"), Kind::Json);
        assert_eq!(Kind::of("GEOGRAPHY"), Kind::Geo);
        assert_eq!(Kind::of("TEXT[]"), Kind::Array { json: false });
        assert_eq!(Kind::of("JSONB[]"), Kind::Array { json: true });
        assert_eq!(
            Kind::of(r#""db"."public"."MyEnum"[]"#),
            Kind::Array { json: false }
        );
        assert_eq!(Kind::of(r#"TEXT COLLATE "C""#), Kind::Scalar);
        assert_eq!(
            Kind::of(r#"TEXT[] COLLATE "C""#),
            Kind::Array { json: false }
        );
    }
}

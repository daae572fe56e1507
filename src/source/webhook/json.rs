//! Small JSON helpers over borrowed raw values: we only split objects into their properties
//! and keep every value's bytes untouched, so numbers and whitespace survive exactly.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The properties of one JSON object, in document order (duplicates kept).
pub(crate) struct Object<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Object<'a> {
    /// Parses `text` as one JSON object; anything else (or trailing data) is an error.
    pub(crate) fn parse(text: &'a str) -> Result<Object<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(6));
                while let Some(Key(k)) = map.next_key()? {
                    out.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(Object(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// An object key, borrowed from the input unless it contained escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// JSON's kind of a raw value, from its first byte (raw values carry no leading whitespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Null,
    Object,
    Array,
    String,
    Other,
}

pub(crate) fn kind(v: &RawValue) -> Kind {
    match v.get().as_bytes().first() {
        Some(b'n') => Kind::Null,
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::Array,
        Some(b'"') => Kind::String,
        _ => Kind::Other,
    }
}

/// True for `[]` with any inner whitespace. Only meaningful for a raw array.
pub(crate) fn is_empty_array(v: &RawValue) -> bool {
    v.get()
        .strip_prefix('[')
        .is_some_and(|s| s.trim_start_matches(is_json_ws).starts_with(']'))
}

/// The contents of a raw JSON string, borrowed when it has no escapes.
pub(crate) fn string_value(v: &RawValue) -> Result<Cow<'_, str>, serde_json::Error> {
    let s = v.get();
    match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Ok(Cow::Borrowed(inner)),
        _ => serde_json::from_str::<String>(s).map(Cow::Owned),
    }
}

pub(crate) fn is_json_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Appends `raw` (valid JSON) without the whitespace between tokens.
pub(crate) fn push_compact(out: &mut String, raw: &str) {
    let mut in_string = false;
    let mut escaped = false;
    for c in raw.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !is_json_ws(c) {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_keep_raw_values_and_key_order() {
        let o =
            Object::parse(r#" { "b" : [1, 2] , "a\u0041":{"x" :  1.50} , "b": null } "#).unwrap();
        let got: Vec<_> = o.0.iter().map(|(k, v)| (k.as_ref(), v.get())).collect();
        assert_eq!(
            got,
            [("b", "[1, 2]"), ("aA", r#"{"x" :  1.50}"#), ("b", "null")]
        );
        assert!(matches!(o.0[0].0, Cow::Borrowed(_)));
    }

    #[test]
    fn non_objects_and_trailing_data_are_errors() {
        for bad in ["[]", "1", "\"x\"", "null", "{} {}", "{", r#"{"a"}"#, "{}x"] {
            assert!(Object::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn compaction_removes_whitespace_outside_strings_only() {
        let mut s = String::new();
        push_compact(&mut s, "{ \"a b\" : [ 1 ,\n\t2 ], \"c\\\" d\" : \" x \" }");
        assert_eq!(s, r#"{"a b":[1,2],"c\" d":" x "}"#);
    }

    #[test]
    fn strings_are_borrowed_unless_escaped() {
        let o = Object::parse(r#"{"a":"plain","b":"esc\"aped\u00e9"}"#).unwrap();
        assert!(matches!(
            string_value(o.0[0].1).unwrap(),
            Cow::Borrowed("plain")
        ));
        assert_eq!(string_value(o.0[1].1).unwrap(), "esc\"apedé");
    }

    #[test]
    fn empty_arrays_are_recognised_with_whitespace() {
        let o = Object::parse(r#"{"a":[],"b":[ ],"c":[ 1 ],"d":[[]]}"#).unwrap();
        assert!(is_empty_array(o.0[0].1));
        assert!(is_empty_array(o.0[1].1));
        assert!(!is_empty_array(o.0[2].1));
        assert!(!is_empty_array(o.0[3].1));
    }
}

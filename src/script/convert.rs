//! Values between the changefeed's JSON and the engine. Numbers reach JS as their exact
//! decimal text (no float rounding); on the way back a string is a number again where the
//! input had that number at the same place, or where the target column is numeric, so keys
//! and JSONB documents keep their shape.

use crate::apply::SchemaInfo;
use crate::hlc::Hlc;
use crate::ident::Table;
use boa_engine::object::builtins::JsArray;
use boa_engine::property::{PropertyDescriptor, PropertyKey};
use boa_engine::{
    js_string, Context, JsError, JsNativeError, JsObject, JsResult, JsString, JsValue,
};
use serde_json::{Map, Number, Value};
use std::collections::{HashMap, HashSet};

/// Deeper documents are refused: a cycle in a returned object would otherwise never end.
const MAX_DEPTH: usize = 64;

/// What the conversions need to know about a target table.
#[derive(Clone, Debug, Default)]
pub struct TableKeys {
    /// Primary-key column names in key order, as spelled in the catalog.
    pub pk: Vec<String>,
    /// Lower-cased names of numeric columns.
    pub numeric: HashSet<String>,
}

pub type Keymap = HashMap<Table, TableKeys>;

/// Per-table keys and numeric columns of a schema.
pub fn keymap(info: &SchemaInfo) -> Keymap {
    info.tables
        .iter()
        .map(|(t, ts)| {
            let keys = TableKeys {
                pk: ts.primary_key().map(|c| c.name.raw().to_string()).collect(),
                numeric: ts
                    .columns
                    .iter()
                    .filter(|c| is_numeric_type(&c.data_type))
                    .map(|c| c.name.canonical())
                    .collect(),
            };
            (t.clone(), keys)
        })
        .collect()
}

/// Whether a column type takes JSON numbers.
pub fn is_numeric_type(data_type: &str) -> bool {
    let base = data_type
        .split(['(', ' '])
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    matches!(
        base.as_str(),
        "INT"
            | "INT2"
            | "INT4"
            | "INT8"
            | "INTEGER"
            | "BIGINT"
            | "SMALLINT"
            | "SERIAL"
            | "SERIAL2"
            | "SERIAL4"
            | "SERIAL8"
            | "BIGSERIAL"
            | "NUMERIC"
            | "DECIMAL"
            | "FLOAT"
            | "FLOAT4"
            | "FLOAT8"
            | "REAL"
            | "DOUBLE"
            | "OID"
    )
}

/// Interned property names (documents of one table repeat the same keys) and schema names.
#[derive(Default)]
pub struct KeyCache(
    HashMap<String, JsString>,
    HashMap<crate::ident::Schema, JsString>,
);

impl KeyCache {
    pub fn get(&mut self, k: &str) -> JsString {
        if let Some(s) = self.0.get(k) {
            return s.clone();
        }
        let s = JsString::from(k);
        if self.0.len() < 4096 {
            self.0.insert(k.to_string(), s.clone());
        }
        s
    }

    /// `db.schema` as text.
    pub fn schema(&mut self, schema: &crate::ident::Schema) -> JsString {
        if let Some(s) = self.1.get(schema) {
            return s.clone();
        }
        let s = JsString::from(schema.to_string().as_str());
        if self.1.len() < 256 {
            self.1.insert(schema.clone(), s.clone());
        }
        s
    }
}

/// Adds a data property to an object we just made (so the key is new and the object
/// extensible): skips the generic define-property checks, a large share of building a document.
fn put(obj: &JsObject, key: JsString, value: impl Into<JsValue>) {
    obj.insert_property(
        key,
        PropertyDescriptor::builder()
            .value(value)
            .writable(true)
            .enumerable(true)
            .configurable(true),
    );
}

/// JSON to JS; numbers become their decimal text.
pub fn to_js(v: &Value, ctx: &mut Context, keys: &mut KeyCache) -> JsResult<JsValue> {
    Ok(match v {
        Value::Null => JsValue::null(),
        Value::Bool(b) => JsValue::from(*b),
        Value::Number(n) => JsValue::from(JsString::from(n.as_str())),
        Value::String(s) => JsValue::from(JsString::from(s.as_str())),
        Value::Array(a) => {
            let mut items = Vec::with_capacity(a.len());
            for x in a {
                items.push(to_js(x, ctx, keys)?);
            }
            JsArray::from_iter(items, ctx).into()
        }
        Value::Object(m) => object_to_js(m, ctx, keys)?.into(),
    })
}

pub fn object_to_js(
    m: &Map<String, Value>,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<JsObject> {
    let obj = JsObject::with_object_proto(ctx.intrinsics());
    for (k, x) in m {
        let v = to_js(x, ctx, keys)?;
        put(&obj, keys.get(k), v);
    }
    Ok(obj)
}

/// A raw JSON object text to a JS object.
pub fn raw_to_js(
    raw: &str,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<(JsObject, Map<String, Value>)> {
    let m: Map<String, Value> = serde_json::from_str(raw)
        .map_err(|e| JsNativeError::typ().with_message(format!("invalid JSON document: {e}")))?;
    let obj = object_to_js(&m, ctx, keys)?;
    Ok((obj, m))
}

/// The properties given to a flat document (primitive values only), to recognise it when a
/// script hands it back untouched: then its original JSON text is reused, which saves most of
/// the cost of the way back.
pub struct Created(Vec<(JsString, JsValue)>);

/// Like [`raw_to_js`], also returning what was created when the document is flat.
pub fn raw_to_js_tracked(
    raw: &str,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<(JsObject, Map<String, Value>, Option<Created>)> {
    let m: Map<String, Value> = serde_json::from_str(raw)
        .map_err(|e| JsNativeError::typ().with_message(format!("invalid JSON document: {e}")))?;
    let obj = JsObject::with_object_proto(ctx.intrinsics());
    let mut created = Some(Vec::with_capacity(m.len()));
    for (k, x) in &m {
        let v = to_js(x, ctx, keys)?;
        let key = keys.get(k);
        if x.is_array() || x.is_object() {
            created = None;
        } else if let Some(c) = created.as_mut() {
            c.push((key.clone(), v.clone()));
        }
        put(&obj, key, v);
    }
    Ok((obj, m, created.map(Created)))
}

/// Whether `obj` still has exactly the properties it was created with, in the same order.
pub fn unmodified(obj: &JsObject, created: &Created, ctx: &mut Context) -> JsResult<bool> {
    let keys = obj.own_property_keys(ctx)?;
    if keys.len() != created.0.len() {
        return Ok(false);
    }
    for (key, (k, v)) in keys.into_iter().zip(&created.0) {
        match &key {
            PropertyKey::String(s) if s == k => {}
            _ => return Ok(false),
        }
        // Our own ordinary object: read its property table directly, no internal methods.
        let same = obj
            .borrow()
            .properties()
            .get(&key)
            .and_then(|d| d.value().map(|x| x.strict_equals(v)))
            .unwrap_or(false);
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

fn number_text(n: f64) -> Option<Number> {
    if !n.is_finite() {
        return None;
    }
    format!("{n}").parse().ok()
}

/// JS to JSON. `hint` is the input value at the same place, if any.
pub fn from_js(
    v: &JsValue,
    hint: Option<&Value>,
    ctx: &mut Context,
    depth: usize,
) -> JsResult<Value> {
    if depth > MAX_DEPTH {
        return Err(JsNativeError::range()
            .with_message("document nested too deeply (or cyclic)")
            .into());
    }
    if v.is_null_or_undefined() {
        return Ok(Value::Null);
    }
    if let Some(b) = v.as_boolean() {
        return Ok(Value::Bool(b));
    }
    if let Some(s) = v.as_string() {
        let s = s.to_std_string_escaped();
        if let Some(Value::Number(n)) = hint {
            if n.as_str() == s {
                return Ok(Value::Number(n.clone()));
            }
        }
        return Ok(Value::String(s));
    }
    if let Some(n) = v.as_number() {
        return Ok(number_text(n).map_or(Value::Null, Value::Number));
    }
    if let Some(b) = v.as_bigint() {
        return Ok(b
            .to_string()
            .parse::<Number>()
            .map_or(Value::Null, Value::Number));
    }
    let Some(obj) = v.as_object() else {
        // Symbols.
        return Ok(Value::Null);
    };
    if obj.is_callable() {
        return Ok(Value::Null);
    }
    if obj.is_array() {
        let len = obj.get(js_string!("length"), ctx)?.to_length(ctx)?;
        let hints = match hint {
            Some(Value::Array(a)) => Some(a),
            _ => None,
        };
        let mut out = Vec::with_capacity(len as usize);
        for i in 0..len {
            let x = obj.get(i, ctx)?;
            let h = hints.and_then(|a| a.get(i as usize));
            out.push(from_js(&x, h, ctx, depth + 1)?);
        }
        return Ok(Value::Array(out));
    }
    // Dates and other objects that say how they serialise.
    let to_json = obj.get(js_string!("toJSON"), ctx)?;
    if let Some(f) = to_json.as_callable() {
        let r = f.call(v, &[], ctx)?;
        if !r.is_object() {
            return from_js(&r, hint, ctx, depth + 1);
        }
    }
    let hints = match hint {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    Ok(Value::Object(object_from_js(
        &obj,
        hints,
        &|_| false,
        ctx,
        depth,
    )?))
}

/// The own string-keyed properties of `obj` (non-enumerable ones too: the engine offers no
/// cheap test, and plain documents have none). `numeric(name)` says whether a
/// top-level property is a numeric column.
pub fn object_from_js(
    obj: &JsObject,
    hints: Option<&Map<String, Value>>,
    numeric: &dyn Fn(&str) -> bool,
    ctx: &mut Context,
    depth: usize,
) -> JsResult<Map<String, Value>> {
    let mut out = Map::new();
    for key in obj.own_property_keys(ctx)? {
        let name = match &key {
            PropertyKey::String(s) => s.to_std_string_escaped(),
            PropertyKey::Index(i) => i.get().to_string(),
            PropertyKey::Symbol(_) => continue,
        };
        let x = obj.get(key, ctx)?;
        if x.is_undefined() || x.as_callable().is_some() {
            continue;
        }
        let h = hints.and_then(|m| m.get(&name));
        let mut val = from_js(&x, h, ctx, depth + 1)?;
        if let Value::String(s) = &val {
            if numeric(&name) {
                if let Ok(n) = s.parse::<Number>() {
                    val = Value::Number(n);
                }
            }
        }
        out.insert(name, val);
    }
    Ok(out)
}

/// A document returned by the script, for `table`: plain object required.
pub fn doc_from_js(
    v: &JsValue,
    hints: Option<&Map<String, Value>>,
    keys: Option<&TableKeys>,
    ctx: &mut Context,
) -> JsResult<Map<String, Value>> {
    let Some(obj) = v.as_object().filter(|o| !o.is_array() && !o.is_callable()) else {
        return Err(JsNativeError::typ()
            .with_message("expected a document (a plain object)")
            .into());
    };
    let numeric = |name: &str| keys.is_some_and(|k| k.numeric.contains(&name.to_lowercase()));
    object_from_js(&obj, hints, &numeric, ctx, 0)
}

/// Looks a column up in a document: exact spelling first, then ignoring case.
pub fn column<'a>(doc: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    doc.get(name).or_else(|| {
        doc.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// The key of `doc` (a JSON array text) from the table's primary-key columns; the name of the
/// first missing one otherwise.
pub fn key_of(doc: &Map<String, Value>, keys: &TableKeys) -> Result<String, String> {
    let mut vals = Vec::with_capacity(keys.pk.len());
    for c in &keys.pk {
        match column(doc, c) {
            Some(v) => vals.push(v),
            None => return Err(c.clone()),
        }
    }
    Ok(serde_json::to_string(&vals).expect("JSON values serialise"))
}

/// `meta` for a row: table, schema, HLC (`nanos`, `logical`, and the exact `updated` text)
/// and, when known, the source name set to true.
pub fn meta(
    table: &Table,
    time: Hlc,
    source: Option<&str>,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<JsObject> {
    let names = (keys.get(table.name.raw()), keys.schema(&table.schema));
    meta_with(names, time, source, ctx, keys)
}

/// [`meta`] with the table's name and schema already made.
pub fn meta_with(
    (name, schema): (JsString, JsString),
    time: Hlc,
    source: Option<&str>,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<JsObject> {
    let obj = JsObject::with_object_proto(ctx.intrinsics());
    put(&obj, js_string!("table"), name);
    put(&obj, js_string!("schema"), schema);
    put(&obj, js_string!("nanos"), time.nanos() as f64);
    put(&obj, js_string!("logical"), time.logical());
    put(
        &obj,
        js_string!("updated"),
        JsString::from(time.to_string().as_str()),
    );
    if let Some(s) = source {
        put(&obj, keys.get(s), true);
    }
    Ok(obj)
}

/// An error for a bad value returned by the script, as a JS TypeError.
pub fn type_error(msg: impl Into<String>) -> JsError {
    JsNativeError::typ().with_message(msg.into()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_integers_round_trip_exactly() {
        let mut ctx = Context::default();
        let mut keys = KeyCache::default();
        let raw = r#"{"k":9007199254740995,"d":1.50,"j":{"n":[1,2.0]},"s":"x"}"#;
        let (obj, hints) = raw_to_js(raw, &mut ctx, &mut keys).unwrap();
        let k = obj.get(js_string!("k"), &mut ctx).unwrap();
        assert_eq!(
            k.as_string().unwrap().to_std_string_escaped(),
            "9007199254740995"
        );
        let back = object_from_js(&obj, Some(&hints), &|_| false, &mut ctx, 0).unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            r#"{"d":1.50,"j":{"n":[1,2.0]},"k":9007199254740995,"s":"x"}"#
        );
    }

    #[test]
    fn numeric_columns_turn_strings_back_into_numbers() {
        let mut ctx = Context::default();
        let v = ctx
            .eval(boa_engine::Source::from_bytes(
                r#"({k: "42", v: "42", n: 7, f: 0.5, b: true, z: null, u: undefined})"#,
            ))
            .unwrap();
        let keys = TableKeys {
            pk: vec!["k".into()],
            numeric: ["k".to_string()].into_iter().collect(),
        };
        let doc = doc_from_js(&v, None, Some(&keys), &mut ctx).unwrap();
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            r#"{"b":true,"f":0.5,"k":42,"n":7,"v":"42","z":null}"#
        );
        assert_eq!(key_of(&doc, &keys).unwrap(), "[42]");
        let missing = TableKeys {
            pk: vec!["id".into()],
            ..TableKeys::default()
        };
        assert_eq!(key_of(&doc, &missing).unwrap_err(), "id");
    }
}

//! Values between the changefeed's JSON and the engine. Numbers reach JS as their exact
//! decimal text (no float rounding); on the way back a string is a number again where the
//! input had that number at the same place, or where the target column is numeric, so keys
//! and JSONB documents keep their shape.

use crate::apply::SchemaInfo;
use crate::hlc::Hlc;
use crate::ident::Table;
use boa_engine::builtins::object::OrdinaryObject;
use boa_engine::native_function::NativeFunctionPointer;
use boa_engine::object::builtins::{JsArray, JsFunction};
use boa_engine::object::shape::Shape;
use boa_engine::object::{FunctionObjectBuilder, IntegrityLevel};
use boa_engine::property::{PropertyDescriptor, PropertyKey};
use boa_engine::NativeFunction;
use boa_engine::{
    js_string, Context, JsError, JsNativeError, JsObject, JsResult, JsString, JsValue,
};
use serde::de::{MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// Deeper documents are refused: a cycle in a returned object would otherwise never end.
const MAX_DEPTH: usize = 64;

/// What the conversions need to know about a target table.
#[derive(Clone, Debug, Default)]
pub(super) struct TableKeys {
    /// Primary-key column names in key order, as spelled in the catalog.
    pub pk: Vec<String>,
    /// Lower-cased names of numeric columns.
    pub numeric: HashSet<String>,
}

pub(super) type Keymap = HashMap<Table, TableKeys>;

/// Per-table keys and numeric columns of a schema.
pub(super) fn keymap(info: &SchemaInfo) -> Keymap {
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
pub(super) fn is_numeric_type(data_type: &str) -> bool {
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
pub(super) struct KeyCache {
    names: HashMap<String, JsString>,
    schemas: HashMap<crate::ident::Schema, JsString>,
    /// The keys of the last document by position: the next one most likely has the same.
    recent: Vec<(Box<str>, PropertyKey)>,
    /// The text values of the last document by position: columns such as a region or a
    /// status repeat from row to row, and sharing the string saves making one.
    values: Vec<Option<JsString>>,
    meta: Option<[PropertyKey; 5]>,
    source: Option<(Box<str>, PropertyKey)>,
}

impl KeyCache {
    pub(super) fn get(&mut self, k: &str) -> JsString {
        if let Some(s) = self.names.get(k) {
            return s.clone();
        }
        let s = JsString::from(k);
        if self.names.len() < 4096 {
            self.names.insert(k.to_string(), s.clone());
        }
        s
    }

    /// The name of a document's `i`-th property.
    fn at(&mut self, i: usize, k: &str) -> PropertyKey {
        if let Some((r, s)) = self.recent.get(i) {
            if **r == *k {
                return s.clone();
            }
        }
        let s = PropertyKey::from(self.get(k));
        if i < self.recent.len() {
            self.recent[i] = (k.into(), s.clone());
        } else if i == self.recent.len() && i < 256 {
            self.recent.push((k.into(), s.clone()));
        }
        s
    }

    /// The string value `text` of a document's `i`-th property.
    fn value_at(&mut self, i: usize, text: &str) -> JsString {
        if let Some(Some(s)) = self.values.get(i) {
            if *s == *text {
                return s.clone();
            }
        }
        let s = JsString::from(text);
        if i < self.values.len() {
            self.values[i] = Some(s.clone());
        } else if i == self.values.len() && i < 256 {
            self.values.push(Some(s.clone()));
        }
        s
    }

    /// The names of `meta`'s own properties.
    fn meta_keys(&mut self) -> [PropertyKey; 5] {
        self.meta
            .get_or_insert_with(|| {
                ["table", "schema", "nanos", "logical", "updated"]
                    .map(|k| PropertyKey::from(JsString::from(k)))
            })
            .clone()
    }

    /// The source name as a property name (the last one asked for is kept at hand).
    fn source_key(&mut self, source: &str) -> PropertyKey {
        match &self.source {
            Some((s, k)) if **s == *source => k.clone(),
            _ => {
                let k = PropertyKey::from(self.get(source));
                self.source = Some((source.into(), k.clone()));
                k
            }
        }
    }

    /// `db.schema` as text.
    pub(super) fn schema(&mut self, schema: &crate::ident::Schema) -> JsString {
        if let Some(s) = self.schemas.get(schema) {
            return s.clone();
        }
        let s = JsString::from(schema.to_string().as_str());
        if self.schemas.len() < 256 {
            self.schemas.insert(schema.clone(), s.clone());
        }
        s
    }
}

/// A new plain object. `with_object_proto` would give each object its own property table;
/// objects made here share their shape with every object that gets the same keys in the same
/// order (as object literals do), so building a document allocates no hash table and property
/// reads in the script hit the engine's inline caches.
pub(super) fn new_object(ctx: &Context) -> JsObject {
    JsObject::new(
        ctx.root_shape(),
        ctx.intrinsics().constructors().object().prototype(),
        OrdinaryObject,
    )
    .upcast()
}

/// Adds a data property to an object we just made (so the key is new and the object
/// extensible): skips the generic define-property checks, a large share of building a document.
fn put(obj: &JsObject, key: impl Into<PropertyKey>, value: impl Into<JsValue>) {
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
pub(super) fn to_js(v: &Value, ctx: &mut Context, keys: &mut KeyCache) -> JsResult<JsValue> {
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

pub(super) fn object_to_js(
    m: &Map<String, Value>,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<JsObject> {
    let obj = new_object(ctx);
    for (k, x) in m {
        let v = to_js(x, ctx, keys)?;
        put(&obj, keys.get(k), v);
    }
    Ok(obj)
}

/// A flat document (primitive values only) as it was made, to recognise it when a script hands
/// it back untouched: then its original JSON text is reused, which saves most of the cost of
/// the way back. One is reused from document to document.
#[derive(Default)]
pub(super) struct Created {
    /// The object's shape once made: shared shapes are immutable, so an object that still has
    /// this one has the same keys, in the same order, with the same attributes. Holding it keeps
    /// its address from being reused.
    shape: Option<Shape>,
    keys: Vec<PropertyKey>,
    values: Vec<JsValue>,
}

impl Created {
    fn clear(&mut self) {
        self.shape = None;
        self.keys.clear();
        self.values.clear();
    }
}

/// A property name as written, borrowed from the text unless it has escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A JSON string straight into a JS string (escapes decoded in serde's scratch buffer).
struct Text(JsString);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, v: &str) -> Result<Text, E> {
                Ok(Text(JsString::from(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Builds a document's JS object while serde reads its members: no intermediate tree.
struct DocSeed<'c> {
    ctx: &'c mut Context,
    keys: &'c mut KeyCache,
    obj: &'c JsObject,
    created: &'c mut Created,
    /// An engine error met while building (serde errors carry text only).
    error: Option<JsError>,
}

impl<'de> Visitor<'de> for &mut DocSeed<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<bool, A::Error> {
        let mut flat = true;
        let mut i = 0;
        while let Some(Name(k)) = m.next_key::<Name<'de>>()? {
            let raw: &'de RawValue = m.next_value()?;
            let v = match raw_value_to_js(raw, i, self.ctx, self.keys) {
                Ok(v) => v,
                Err(e) => {
                    self.error = Some(e);
                    return Err(serde::de::Error::custom("invalid value"));
                }
            };
            let key = self.keys.at(i, &k);
            i += 1;
            flat &= !v.is_object();
            if flat {
                self.created.keys.push(key.clone());
                self.created.values.push(v.clone());
            }
            put(self.obj, key, v);
        }
        Ok(flat)
    }
}

/// One JSON value as JS, from its text; numbers become their decimal text as written.
fn raw_value_to_js(
    raw: &RawValue,
    i: usize,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<JsValue> {
    let t = raw.get();
    Ok(match t.as_bytes().first() {
        Some(b'"') => match t[1..t.len() - 1].contains('\\') {
            // No escapes: the text between the quotes is the string.
            false => keys.value_at(i, &t[1..t.len() - 1]).into(),
            true => {
                let Text(s) = serde_json::from_str(t).map_err(invalid)?;
                s.into()
            }
        },
        Some(b'-' | b'0'..=b'9') => keys.value_at(i, t).into(),
        Some(b't') => true.into(),
        Some(b'f') => false.into(),
        Some(b'n') => JsValue::null(),
        _ => {
            let v: Value = serde_json::from_str(t).map_err(invalid)?;
            to_js(&v, ctx, keys)?
        }
    })
}

fn invalid(e: serde_json::Error) -> JsError {
    JsNativeError::typ()
        .with_message(format!("invalid JSON document: {e}"))
        .into()
}

/// A raw JSON object text to a JS object, properties in document order, straight from the
/// text. `created` tells afterwards whether (and as what) a flat document was made.
pub(super) fn doc_to_js(
    raw: &str,
    ctx: &mut Context,
    keys: &mut KeyCache,
    created: &mut Created,
) -> JsResult<JsObject> {
    use serde::Deserializer as _;
    created.clear();
    let obj = new_object(ctx);
    let mut seed = DocSeed {
        ctx,
        keys,
        obj: &obj,
        created,
        error: None,
    };
    let mut de = serde_json::Deserializer::from_str(raw);
    let read = de
        .deserialize_map(&mut seed)
        .and_then(|flat| de.end().map(|_| flat));
    let flat = match read {
        Ok(flat) => flat,
        Err(e) => return Err(seed.error.take().unwrap_or_else(|| invalid(e))),
    };
    // Index-like keys ("0") live outside the shape: leave such documents to the full check.
    if flat
        && obj
            .borrow()
            .properties()
            .index_property_keys()
            .next()
            .is_none()
    {
        created.shape = Some(obj.borrow().shape().clone());
    }
    Ok(obj)
}

/// The input document as hints for converting a result back (see [`from_js`]).
pub(super) fn hints(raw: &str) -> JsResult<Map<String, Value>> {
    serde_json::from_str(raw).map_err(invalid)
}

/// Whether `obj` still has exactly the properties it was created with, in the same order.
pub(super) fn unmodified(obj: &JsObject, created: &Created) -> bool {
    let Some(made) = &created.shape else {
        return false;
    };
    let o = obj.borrow();
    if o.properties().index_property_keys().next().is_some() {
        return false;
    }
    let shape = o.shape();
    if shape.is_shared() {
        if shape.to_addr_usize() != made.to_addr_usize() {
            return false;
        }
    } else {
        // A unique shape changes in place: compare the keys themselves.
        let keys = shape.keys();
        if keys.len() != created.keys.len() || keys.iter().zip(&created.keys).any(|(a, b)| a != b) {
            return false;
        }
    }
    // Our own ordinary object: read its property table directly, no internal methods.
    let props = o.properties();
    created.keys.iter().zip(&created.values).all(|(k, v)| {
        props
            .get(k)
            .and_then(|d| d.value().map(|x| x.strict_equals(v)))
            .unwrap_or(false)
    })
}

/// The own property keys of `obj`; for a plain object (what scripts return) read from its
/// shape, without the engine's generic path.
pub(super) fn own_keys(obj: &JsObject, ctx: &mut Context) -> JsResult<Vec<PropertyKey>> {
    if obj.is_ordinary() {
        let o = obj.borrow();
        if o.properties().index_property_keys().next().is_none() {
            return Ok(o.shape().keys());
        }
    }
    obj.own_property_keys(ctx)
}

/// `obj[key]`; an own data property of a plain object or array is read directly.
pub(super) fn get(obj: &JsObject, key: &PropertyKey, ctx: &mut Context) -> JsResult<JsValue> {
    if obj.is_ordinary() || obj.is_array() {
        let own = obj
            .borrow()
            .properties()
            .get(key)
            .and_then(|d| d.value().cloned());
        if let Some(v) = own {
            return Ok(v);
        }
    }
    obj.get(key.clone(), ctx)
}

/// The elements of an array (or the value itself when it is not one).
pub(super) fn elements(v: JsValue, ctx: &mut Context) -> JsResult<Vec<JsValue>> {
    let Some(a) = v.as_object().filter(|a| a.is_array()) else {
        return Ok(vec![v]);
    };
    let len = get(&a, &PropertyKey::from(js_string!("length")), ctx)?.to_length(ctx)?;
    let mut out = Vec::with_capacity(len.min(1 << 16) as usize);
    for i in 0..len {
        out.push(get(&a, &PropertyKey::from(i), ctx)?);
    }
    Ok(out)
}

fn number_text(n: f64) -> Option<Number> {
    if !n.is_finite() {
        return None;
    }
    format!("{n}").parse().ok()
}

/// JS to JSON. `hint` is the input value at the same place, if any.
pub(super) fn from_js(
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
pub(super) fn object_from_js(
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
pub(super) fn doc_from_js(
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
pub(super) fn column<'a>(doc: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    doc.get(name).or_else(|| {
        doc.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// The key of `doc` (a JSON array text) from the table's primary-key columns; the name of the
/// first missing one otherwise.
pub(super) fn key_of(doc: &Map<String, Value>, keys: &TableKeys) -> Result<String, String> {
    let mut vals = Vec::with_capacity(keys.pk.len());
    for c in &keys.pk {
        match column(doc, c) {
            Some(v) => vals.push(v),
            None => return Err(c.clone()),
        }
    }
    Ok(serde_json::to_string(&vals).expect("JSON values serialise"))
}

/// `meta` for one row, made for it alone: table, schema, HLC (`nanos`, `logical`, and the exact
/// `updated` text) and, when known, the source name set to true. Merges and `apply` ops keep
/// theirs; row callbacks get a [`shared_meta`].
pub(super) fn meta(
    table: &Table,
    time: Hlc,
    source: Option<&str>,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<JsObject> {
    let (name, schema) = (keys.get(table.name.raw()), keys.schema(&table.schema));
    let obj = new_object(ctx);
    let [t, sc, n, l, u] = keys.meta_keys();
    put(&obj, t, name);
    put(&obj, sc, schema);
    put(&obj, n, time.nanos() as f64);
    put(&obj, l, time.logical());
    put(&obj, u, hlc_text(time));
    if let Some(s) = source {
        put(&obj, keys.source_key(s), true);
    }
    Ok(obj)
}

thread_local! {
    /// The HLC of the row whose callback runs on this engine thread (see [`shared_meta`]).
    static ROW_TIME: std::cell::Cell<Hlc> = const { std::cell::Cell::new(Hlc::ZERO) };
}

/// Sets the row that the getters of a [`shared_meta`] describe.
pub(super) fn set_row_time(time: Hlc) {
    ROW_TIME.with(|t| t.set(time));
}

fn row_nanos(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    Ok((ROW_TIME.with(std::cell::Cell::get).nanos() as f64).into())
}

fn row_logical(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    Ok(ROW_TIME.with(std::cell::Cell::get).logical().into())
}

fn row_updated(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    Ok(hlc_text(ROW_TIME.with(std::cell::Cell::get)).into())
}

/// The getters of a shared meta, made once per Context.
pub(super) struct RowGetters([JsFunction; 3]);

impl RowGetters {
    pub(super) fn new(ctx: &mut Context) -> RowGetters {
        let make = |f: NativeFunctionPointer, name: &str| {
            FunctionObjectBuilder::new(ctx.realm(), NativeFunction::from_fn_ptr(f))
                .name(JsString::from(name))
                .length(0)
                .build()
        };
        RowGetters([
            make(row_nanos, "nanos"),
            make(row_logical, "logical"),
            make(row_updated, "updated"),
        ])
    }
}

/// `meta` for the rows of one table in `dispatch`, `deletesTo`, `map` and `deleteKey`: one
/// frozen object per table, whose `nanos`, `logical` and `updated` read the row whose callback
/// runs ([`set_row_time`]). Making a `meta` per row cost about a fifth of a dispatch; the
/// price is that a script which keeps `meta` past its callback sees later rows' times there
/// (`{...meta}` keeps a copy).
pub(super) fn shared_meta(
    (name, schema): (JsString, JsString),
    source: Option<&str>,
    getters: &RowGetters,
    ctx: &mut Context,
    keys: &mut KeyCache,
) -> JsResult<JsObject> {
    let obj = new_object(ctx);
    let [t, sc, n, l, u] = keys.meta_keys();
    put(&obj, t, name);
    put(&obj, sc, schema);
    for (k, g) in [n, l, u].into_iter().zip(&getters.0) {
        obj.insert_property(
            k,
            PropertyDescriptor::builder()
                .get(g.clone())
                .set(JsValue::undefined())
                .enumerable(true)
                .configurable(true),
        );
    }
    if let Some(s) = source {
        put(&obj, keys.source_key(s), true);
    }
    obj.set_integrity_level(IntegrityLevel::Frozen, ctx)?;
    Ok(obj)
}

/// `nanos.logical` as [`Hlc`]'s `Display` writes it, without the formatting machinery (one
/// per row).
fn hlc_text(time: Hlc) -> JsString {
    let (Ok(mut n), Ok(mut l)) = (u64::try_from(time.nanos()), u32::try_from(time.logical()))
    else {
        return JsString::from(time.to_string().as_str());
    };
    let mut buf = [0u8; 32];
    let mut i = buf.len();
    // At least ten digits of logical time, zero-padded.
    while i > buf.len() - 10 || l > 0 {
        i -= 1;
        buf[i] = b'0' + (l % 10) as u8;
        l /= 10;
    }
    i -= 1;
    buf[i] = b'.';
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    JsString::from(std::str::from_utf8(&buf[i..]).unwrap_or_default())
}

/// An error for a bad value returned by the script, as a JS TypeError.
pub(super) fn type_error(msg: impl Into<String>) -> JsError {
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
        let obj = doc_to_js(raw, &mut ctx, &mut keys, &mut Created::default()).unwrap();
        let hints = self::hints(raw).unwrap();
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
    fn hlc_text_matches_display() {
        for t in [
            Hlc::new(0, 0),
            Hlc::new(1_700_000_000_123_456_789, 7),
            Hlc::new(5, i32::MAX),
            Hlc::new(i64::MAX, 0),
            Hlc::new(-3, 1),
        ] {
            assert_eq!(hlc_text(t).to_std_string_escaped(), t.to_string());
        }
    }

    #[test]
    fn documents_keep_their_order_and_exact_text() {
        let mut ctx = Context::default();
        let mut keys = KeyCache::default();
        let raw = r#"{"z":-1.50e3,"a":"x\"y","0":null,"n":[1,{"b":true}],"e":"\u00e9"}"#;
        let mut created = Created::default();
        let obj = doc_to_js(raw, &mut ctx, &mut keys, &mut created).unwrap();
        assert!(
            !unmodified(&obj, &created),
            "nested and index-like keys are not tracked"
        );
        let back = ctx
            .eval(boa_engine::Source::from_bytes("(d) => JSON.stringify(d)"))
            .unwrap();
        let text = back
            .as_callable()
            .unwrap()
            .call(&JsValue::undefined(), &[obj.into()], &mut ctx)
            .unwrap();
        // Index-like keys come first in JS, then the others in document order.
        assert_eq!(
            text.as_string().unwrap().to_std_string_escaped(),
            r#"{"0":null,"z":"-1.50e3","a":"x\"y","n":["1",{"b":true}],"e":"é"}"#
        );
        // The positional key cache must not confuse documents with other keys.
        let obj = doc_to_js(r#"{"a":1,"z":2}"#, &mut ctx, &mut keys, &mut created).unwrap();
        assert!(unmodified(&obj, &created));
        let z = obj.get(js_string!("z"), &mut ctx).unwrap();
        assert_eq!(z.as_string().unwrap().to_std_string_escaped(), "2");
        obj.set(js_string!("z"), js_string!("3"), false, &mut ctx)
            .unwrap();
        assert!(!unmodified(&obj, &created), "a changed value");
        for bad in ["[1]", r#"{"a":1"#, r#"{"a":1} x"#, r#"{"a":tru}"#] {
            assert!(
                doc_to_js(bad, &mut ctx, &mut keys, &mut created).is_err(),
                "{bad}"
            );
        }
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

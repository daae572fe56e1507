//! What a token claims, and whether that grants a schema, read as the Go cdc-sink reads it:
//! `jti`, the time claims, and `schemas` under the cdc-sink (or newer replicator) namespace.

use super::Denied;
use crate::ident::{Ident, Schema};
use serde_json::Value;

/// The claim namespace of the cdc-sink era; what `make-jwt` writes.
pub const NAMESPACE_LEGACY: &str = "https://github.com/cockroachdb/cdc-sink";
/// The namespace of the later replicator releases; honoured as well.
pub const NAMESPACE: &str = "https://github.com/cockroachdb/replicator";
/// The issuer `make-jwt` writes (not checked on verification, as in the reference).
pub(crate) const ISSUER: &str = "cdc-sink";

/// The claims the sink reads; everything else in a token is ignored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claims {
    pub(crate) jti: String,
    /// Each entry as listed: `["db", "schema"]`, parts possibly `*`.
    pub(crate) schemas: Vec<Vec<String>>,
    pub(crate) exp: Option<f64>,
    pub(crate) nbf: Option<f64>,
    pub(crate) iat: Option<f64>,
}

impl Claims {
    /// Reads and checks the claims, in the reference's order: shape, time claims (against
    /// `now`, unix seconds, no leeway), `jti`, then at least one schema.
    pub(crate) fn parse(v: &Value, now: f64) -> Result<Claims, Denied> {
        let obj = v.as_object().ok_or(Denied::Claims)?;
        let time = |name: &str| match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(Denied::Claims),
            Some(_) => Err(Denied::Claims),
        };
        let (exp, nbf, iat) = (time("exp")?, time("nbf")?, time("iat")?);
        let jti = match obj.get("jti") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(Denied::Claims),
        };
        let mut schemas = Vec::new();
        for ns in [NAMESPACE, NAMESPACE_LEGACY] {
            schemas.extend(namespace_schemas(obj.get(ns))?);
        }
        let claims = Claims {
            jti,
            schemas,
            exp,
            nbf,
            iat,
        };
        if claims.exp.is_some_and(|exp| now > exp) {
            return Err(Denied::Expired);
        }
        if claims.nbf.is_some_and(|nbf| now < nbf) {
            return Err(Denied::NotYetValid);
        }
        if claims.iat.is_some_and(|iat| now < iat) {
            return Err(Denied::IssuedInFuture);
        }
        if claims.jti.is_empty() {
            return Err(Denied::MissingJti);
        }
        if claims.schemas.is_empty() {
            return Err(Denied::NoSchemas);
        }
        Ok(claims)
    }

    /// Whether one listed schema matches `schema` part by part: equal part counts, `*` matches
    /// any part, names compare case-insensitively.
    pub(crate) fn grants(&self, schema: &Schema) -> bool {
        self.schemas.iter().any(|listed| matches(listed, schema))
    }
}

/// One listed schema against the request's: equal part counts, `*` matches any part, names
/// compare case-insensitively.
pub(crate) fn matches(listed: &[String], schema: &Schema) -> bool {
    let want = [&schema.db, &schema.schema];
    listed.len() == want.len()
        && listed
            .iter()
            .zip(want)
            .all(|(part, w)| part == "*" || Ident::new(part.as_str()) == *w)
}

/// The `schemas` of one namespace object: `[["db","schema"], …]` of non-empty strings.
fn namespace_schemas(ns: Option<&Value>) -> Result<Vec<Vec<String>>, Denied> {
    let ns = match ns {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(Denied::Claims),
    };
    let list = match ns.get("schemas") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(Denied::Claims),
    };
    list.iter()
        .map(|entry| {
            let parts = entry.as_array().filter(|p| !p.is_empty());
            parts
                .ok_or(Denied::Claims)?
                .iter()
                .map(|p| match p {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(Denied::Claims),
                })
                .collect()
        })
        .collect()
}

/// The claim object `make-jwt` signs: a fresh `jti`, issuer `cdc-sink`, the legacy namespace
/// (read by the reference and by every later release), and `exp` when given.
pub(crate) fn mint(schemas: &[Vec<String>], exp: Option<u64>) -> Value {
    let mut claims = serde_json::json!({
        "iss": ISSUER,
        "jti": uuid::Uuid::new_v4().to_string(),
        NAMESPACE_LEGACY: { "schemas": schemas },
    });
    if let Some(exp) = exp {
        claims["exp"] = Value::from(exp);
    }
    claims
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: f64 = 1_800_000_000.0;

    fn claims(v: Value) -> Result<Claims, Denied> {
        Claims::parse(&v, NOW)
    }

    fn legacy(schemas: Value) -> Value {
        json!({"jti": "id-1", NAMESPACE_LEGACY: {"schemas": schemas}})
    }

    #[test]
    fn schemas_match_part_by_part_case_insensitively() {
        let c = claims(legacy(json!([["Kv", "PUBLIC"]]))).expect("valid");
        assert!(c.grants(&Schema::new("kv", "public")));
        assert!(c.grants(&Schema::new("KV", "Public")));
        assert!(!c.grants(&Schema::new("kv", "other")));
        assert!(!c.grants(&Schema::new("other", "public")));
    }

    #[test]
    fn a_star_part_matches_any_name_but_part_counts_must_be_equal() {
        let c = claims(legacy(json!([["kv", "*"]]))).expect("valid");
        assert!(c.grants(&Schema::new("kv", "anything")));
        assert!(!c.grants(&Schema::new("db2", "public")));
        let all = claims(legacy(json!([["*", "*"]]))).expect("valid");
        assert!(all.grants(&Schema::new("x", "y")));
        // A one-part entry never grants a two-part schema, not even `*`.
        for one in [json!([["kv"]]), json!([["*"]])] {
            let c = claims(legacy(one)).expect("valid");
            assert!(!c.grants(&Schema::new("kv", "public")));
        }
        let three = claims(legacy(json!([["kv", "public", "t"]]))).expect("valid");
        assert!(!three.grants(&Schema::new("kv", "public")));
    }

    #[test]
    fn both_namespaces_are_read() {
        let v = json!({"jti": "j", NAMESPACE: {"schemas": [["a", "b"]]}});
        assert!(claims(v).expect("new").grants(&Schema::new("a", "b")));
        let both = json!({
            "jti": "j",
            NAMESPACE: {"schemas": [["a", "b"]]},
            NAMESPACE_LEGACY: {"schemas": [["c", "d"]]},
        });
        let c = claims(both).expect("both");
        assert!(c.grants(&Schema::new("a", "b")) && c.grants(&Schema::new("c", "d")));
    }

    #[test]
    fn required_claims_are_refused_with_the_reference_reasons() {
        let no_jti = json!({NAMESPACE_LEGACY: {"schemas": [["a", "b"]]}});
        assert_eq!(claims(no_jti), Err(Denied::MissingJti));
        let empty_jti = json!({"jti": "", NAMESPACE_LEGACY: {"schemas": [["a", "b"]]}});
        assert_eq!(claims(empty_jti), Err(Denied::MissingJti));
        assert_eq!(claims(legacy(json!([]))), Err(Denied::NoSchemas));
        assert_eq!(claims(json!({"jti": "j"})), Err(Denied::NoSchemas));
        let other_ns = json!({"jti": "j", "https://example.com": {"schemas": [["a", "b"]]}});
        assert_eq!(claims(other_ns), Err(Denied::NoSchemas));
    }

    #[test]
    fn malformed_claims_are_refused() {
        for bad in [
            json!("text"),
            json!({"jti": 5, NAMESPACE_LEGACY: {"schemas": [["a", "b"]]}}),
            legacy(json!("a.b")),
            legacy(json!([[]])),
            legacy(json!([["a", 1]])),
            legacy(json!([["a", ""]])),
            json!({"jti": "j", NAMESPACE_LEGACY: ["a", "b"]}),
            json!({"jti": "j", "exp": "tomorrow", NAMESPACE_LEGACY: {"schemas": [["a", "b"]]}}),
        ] {
            assert_eq!(claims(bad.clone()), Err(Denied::Claims), "{bad}");
        }
    }

    #[test]
    fn time_claims_are_checked_when_present() {
        let with = |k: &str, v: f64| {
            let mut c = legacy(json!([["a", "b"]]));
            c[k] = json!(v);
            claims(c)
        };
        assert_eq!(with("exp", NOW - 1.0), Err(Denied::Expired));
        assert!(with("exp", NOW + 1.0).is_ok());
        assert_eq!(with("nbf", NOW + 10.0), Err(Denied::NotYetValid));
        assert!(with("nbf", NOW - 10.0).is_ok());
        assert_eq!(with("iat", NOW + 10.0), Err(Denied::IssuedInFuture));
        assert!(with("iat", NOW - 10.0).is_ok());
        // Fractional NumericDates are valid JSON numbers.
        assert!(with("exp", NOW + 0.5).is_ok());
        // No exp at all is fine (the reference's tokens carry none).
        assert!(claims(legacy(json!([["a", "b"]]))).is_ok());
    }

    #[test]
    fn minted_claims_parse_back() {
        let v = mint(&[vec!["kv".into(), "public".into()]], Some(NOW as u64 + 60));
        assert_eq!(v["iss"], "cdc-sink");
        let c = claims(v).expect("minted claims are valid");
        assert!(c.grants(&Schema::new("kv", "public")));
        assert_eq!(c.jti.len(), 36);
        assert_eq!(c.exp, Some(NOW + 60.0));
    }
}

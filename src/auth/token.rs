//! Where a request carries its token, as for the Go cdc-sink: the `Authorization: Bearer`
//! header, or else the `access_token` query parameter, which is taken out of the query before
//! anything can log it.

use http::header::AUTHORIZATION;
use http::HeaderMap;

const PARAM: &str = "access_token";

/// The token of a request. A present `Authorization` header decides alone: only its exact
/// `Bearer ` form carries a token, any other scheme means none (the query is not consulted).
pub(crate) fn bearer<'a>(headers: &'a HeaderMap, access_token: Option<&'a str>) -> Option<&'a str> {
    let header = headers
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""))
        .filter(|v| !v.is_empty());
    let token = match header {
        Some(h) => h.strip_prefix("Bearer ").unwrap_or(""),
        None => access_token.unwrap_or(""),
    };
    (!token.is_empty()).then_some(token)
}

/// Splits the `access_token` parameter (its first value, decoded) out of a raw query; the
/// other parameters are kept as they were. Every `access_token` is removed.
pub(crate) fn take_access_token(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut token = None;
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(name).as_deref() == Some(PARAM) {
            if token.is_none() {
                token = Some(decode(value).unwrap_or_default());
            }
        } else {
            kept.push(pair);
        }
    }
    let rest = (!kept.is_empty()).then(|| kept.join("&"));
    (rest, token)
}

/// Form decoding (`+` is a space, `%XX` a byte); None for invalid escapes or UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(auth).expect("header"));
        h
    }

    #[test]
    fn the_header_wins_and_only_its_bearer_form_counts() {
        let none = HeaderMap::new();
        assert_eq!(bearer(&none, None), None);
        assert_eq!(bearer(&none, Some("q")), Some("q"));
        assert_eq!(bearer(&headers("Bearer abc"), Some("q")), Some("abc"));
        // Another scheme: no token, and the query is not consulted.
        assert_eq!(bearer(&headers("Basic abc"), Some("q")), None);
        assert_eq!(bearer(&headers("bearer abc"), None), None);
        assert_eq!(bearer(&headers("Bearer "), None), None);
        assert_eq!(bearer(&none, Some("")), None);
    }

    #[test]
    fn access_token_is_taken_out_of_the_query() {
        assert_eq!(take_access_token(None), (None, None));
        assert_eq!(
            take_access_token(Some("access_token=a.b.c")),
            (None, Some("a.b.c".into()))
        );
        assert_eq!(
            take_access_token(Some("x=1&access_token=a%2Eb&y=2&access_token=z")),
            (Some("x=1&y=2".into()), Some("a.b".into()))
        );
        assert_eq!(
            take_access_token(Some("x=1&y")),
            (Some("x=1&y".into()), None)
        );
        assert_eq!(
            take_access_token(Some("access%5Ftoken=t")),
            (None, Some("t".into()))
        );
    }
}

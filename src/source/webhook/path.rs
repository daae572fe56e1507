//! Request path → route. The path names the target schema and, optionally, a table, a
//! cloud-storage ndjson file or a `.RESOLVED` file; the layouts are the Go cdc-sink's (README.md,
//! "Endpoints").

use super::resolved::{parse_resolved_digits, RESOLVED_DIGITS};
use super::WebhookError;
use crate::hlc::Hlc;
use crate::ident::{Ident, Schema, Table};

/// Non-empty segments a path may have: schema (2) + table + date + file name, with room to spare
/// as in the reference.
pub const MAX_SEGMENTS: usize = 7;
/// Segments naming the target schema (`database/schema` for CockroachDB and PostgreSQL).
const SCHEMA_SEGMENTS: usize = 2;

/// What a changefeed request is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/db/sch` (table feed, table from each element's topic) or `/db/sch/tbl` (CDC-query feed).
    Webhook {
        schema: Schema,
        table: Option<Ident>,
    },
    /// Cloud-storage ndjson file: `/db/sch/<date>/<file>.ndjson` (topic from file name) or
    /// `/db/sch/tbl/<date>/<file>.ndjson` (query feed for tbl).
    Ndjson {
        schema: Schema,
        table: Ident,
        query: bool,
    },
    /// `/db/sch[/tbl]/<date>/<33 digits>.RESOLVED` (body never read).
    Resolved { schema: Schema, time: Hlc },
}

impl Route {
    /// The target schema, which is also what a token must grant.
    pub fn schema(&self) -> &Schema {
        match self {
            Route::Webhook { schema, .. }
            | Route::Ndjson { schema, .. }
            | Route::Resolved { schema, .. } => schema,
        }
    }
}

/// Parses the still-escaped URL path (no query string).
pub fn parse_path(escaped_path: &str) -> Result<Route, WebhookError> {
    let raw: Vec<&str> = escaped_path.split('/').filter(|s| !s.is_empty()).collect();
    if raw.len() > MAX_SEGMENTS {
        return Err(WebhookError::TooManySegments(raw.len()));
    }
    if raw.len() < SCHEMA_SEGMENTS {
        return Err(WebhookError::TooFewSegments);
    }
    let segments = raw
        .iter()
        .map(|s| form_unescape(s))
        .collect::<Result<Vec<String>, _>>()?;
    let schema = Schema::new(segments[0].as_str(), segments[1].as_str());
    let rest = &segments[SCHEMA_SEGMENTS..];

    // Each pattern matches either the rest as a whole (target = the schema) or the rest after
    // one leading table segment; patterns are tried in this order.
    for pattern in [Pattern::Ndjson, Pattern::Resolved, Pattern::Webhook] {
        let len = pattern.segments();
        let (table, tail) = if rest.len() == len {
            (None, rest)
        } else if rest.len() == len + 1 {
            (Some(Ident::new(rest[0].as_str())), &rest[1..])
        } else {
            continue;
        };
        let joined = tail.join("/");
        match pattern {
            Pattern::Ndjson => {
                let Some(topic) = ndjson_topic(&joined) else {
                    continue;
                };
                return Ok(match table {
                    Some(table) => Route::Ndjson {
                        schema,
                        table,
                        query: true,
                    },
                    None => {
                        // Only the topic's last part names the table; the URL schema wins.
                        let table = Table::parse_in(&schema, topic)
                            .map_err(WebhookError::PathTable)?
                            .name;
                        Route::Ndjson {
                            schema,
                            table,
                            query: false,
                        }
                    }
                });
            }
            Pattern::Resolved => {
                let Some(digits) = resolved_digits(&joined) else {
                    continue;
                };
                // The table segment, if any, does not matter: checkpoints are per schema.
                let time = parse_resolved_digits(digits)?;
                return Ok(Route::Resolved { schema, time });
            }
            Pattern::Webhook => return Ok(Route::Webhook { schema, table }),
        }
    }
    Err(WebhookError::NoMatch)
}

#[derive(Clone, Copy)]
enum Pattern {
    Ndjson,
    Resolved,
    Webhook,
}

impl Pattern {
    fn segments(self) -> usize {
        match self {
            Pattern::Ndjson | Pattern::Resolved => 2,
            Pattern::Webhook => 0,
        }
    }
}

/// Form-style unescaping of one segment: `+` is a space, `%XX` a byte; the result must be UTF-8.
fn form_unescape(segment: &str) -> Result<String, WebhookError> {
    let bad = || WebhookError::BadEscape(segment.to_string());
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|b| hex(*b)).ok_or_else(bad)?;
                let lo = bytes.get(i + 2).and_then(|b| hex(*b)).ok_or_else(bad)?;
                out.push(hi << 4 | lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Strips a leading `YYYY-MM-DD/` (digits not range-checked, as in the reference pattern).
fn strip_date(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    if b.len() < 11 {
        return None;
    }
    let shape_ok = b[..11].iter().enumerate().all(|(i, c)| match i {
        4 | 7 => *c == b'-',
        10 => *c == b'/',
        _ => c.is_ascii_digit(),
    });
    // The first 11 bytes are ASCII, so index 11 is a char boundary.
    shape_ok.then(|| &s[11..])
}

/// Matches `YYYY-MM-DD/` + five `[^-]+-` groups + topic + `-` + schema id (`[^-]+`) + any one
/// character + `ndjson`, returning the topic. Since the groups and the schema id cannot contain
/// `-`, the topic is everything between the fifth and the last hyphen.
fn ndjson_topic(s: &str) -> Option<&str> {
    let rest = strip_date(s)?.strip_suffix("ndjson")?;
    let mut chars = rest.chars();
    if chars.next_back()? == '\n' {
        return None; // `.` in the reference pattern does not match a newline
    }
    let mut rest = chars.as_str();
    for _ in 0..5 {
        let dash = rest.find('-')?;
        if dash == 0 {
            return None;
        }
        rest = &rest[dash + 1..];
    }
    let dash = rest.rfind('-')?;
    let (topic, schema_id) = (&rest[..dash], &rest[dash + 1..]);
    if topic.is_empty() || schema_id.is_empty() || topic.contains('\n') {
        return None;
    }
    Some(topic)
}

/// Matches `YYYY-MM-DD/` + 33 digits + any one character + `RESOLVED`, returning the digits.
fn resolved_digits(s: &str) -> Option<&str> {
    let rest = strip_date(s)?.strip_suffix("RESOLVED")?;
    let digits = rest.get(..RESOLVED_DIGITS)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut sep = rest[RESOLVED_DIGITS..].chars();
    match (sep.next(), sep.next()) {
        (Some(c), None) if c != '\n' => Some(digits),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NDJSON: &str =
        "2020-04-02/202004022058072107140000000000000-56087568dba1e6b8-1-72-00000000-test_table-1.ndjson";
    const RESOLVED: &str = "2020-04-04/202004042351304139680000000000000.RESOLVED";

    fn schema(db: &str, sch: &str) -> Schema {
        Schema::new(db, sch)
    }

    fn webhook(db: &str, sch: &str, table: Option<&str>) -> Route {
        Route::Webhook {
            schema: schema(db, sch),
            table: table.map(Ident::new),
        }
    }

    fn raw_names(route: &Route) -> Vec<String> {
        let s = route.schema();
        let mut v = vec![s.db.raw().to_string(), s.schema.raw().to_string()];
        match route {
            Route::Webhook { table: Some(t), .. } | Route::Ndjson { table: t, .. } => {
                v.push(t.raw().to_string())
            }
            _ => {}
        }
        v
    }

    #[test]
    fn a_two_segment_path_is_a_table_feed_webhook() {
        assert_eq!(
            parse_path("/db/public").unwrap(),
            webhook("db", "public", None)
        );
    }

    #[test]
    fn a_three_segment_path_is_a_query_feed_webhook() {
        assert_eq!(
            parse_path("/db/public/tbl").unwrap(),
            webhook("db", "public", Some("tbl"))
        );
    }

    #[test]
    fn an_ndjson_file_under_the_schema_takes_its_table_from_the_topic() {
        let route = parse_path(&format!("/db/public/{NDJSON}")).unwrap();
        assert_eq!(
            route,
            Route::Ndjson {
                schema: schema("db", "public"),
                table: Ident::new("test_table"),
                query: false
            }
        );
    }

    #[test]
    fn an_ndjson_file_under_a_table_is_a_query_feed_for_that_table() {
        let route = parse_path(&format!("/db/public/tbl/{NDJSON}")).unwrap();
        assert_eq!(
            route,
            Route::Ndjson {
                schema: schema("db", "public"),
                table: Ident::new("tbl"),
                query: true
            }
        );
    }

    #[test]
    fn a_qualified_ndjson_topic_keeps_only_its_last_part_in_the_url_schema() {
        let path = "/db/public/2020-04-02/202004022058072107140000000000000-56087568dba1e6b8-1-72-00000000-ignored_db.ignored_schema.REAL-42-1.ndjson";
        let route = parse_path(path).unwrap();
        assert_eq!(raw_names(&route), ["db", "public", "REAL-42"]);
        assert!(matches!(route, Route::Ndjson { query: false, .. }));
    }

    #[test]
    fn a_quoted_ndjson_topic_is_unquoted() {
        let path = "/db/public/2020-04-02/a-b-c-d-e-%22My.Table%22-7.ndjson";
        assert_eq!(
            raw_names(&parse_path(path).unwrap()),
            ["db", "public", "My.Table"]
        );
    }

    #[test]
    fn an_ndjson_topic_with_too_many_parts_is_not_found() {
        let e = parse_path("/db/public/2020-04-02/a-b-c-d-e-w.x.y.z-1.ndjson").unwrap_err();
        assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_resolved_file_under_the_schema_is_a_checkpoint() {
        let route = parse_path(&format!("/db/public/{RESOLVED}")).unwrap();
        assert_eq!(
            route,
            Route::Resolved {
                schema: schema("db", "public"),
                time: Hlc::new(1_586_044_290_413_968_000, 0)
            }
        );
    }

    #[test]
    fn a_resolved_file_under_a_table_is_a_checkpoint_for_the_schema() {
        let route = parse_path(&format!("/db/public/tbl/{RESOLVED}")).unwrap();
        assert_eq!(
            route,
            Route::Resolved {
                schema: schema("db", "public"),
                time: Hlc::new(1_586_044_290_413_968_000, 0)
            }
        );
    }

    #[test]
    fn a_resolved_file_directly_under_the_database_is_a_query_webhook() {
        // The quirk: the date becomes the schema and the file name the table.
        let route = parse_path(&format!("/db/{RESOLVED}")).unwrap();
        assert_eq!(
            route,
            webhook(
                "db",
                "2020-04-04",
                Some("202004042351304139680000000000000.RESOLVED")
            )
        );
    }

    #[test]
    fn extra_segments_before_a_file_are_not_found() {
        let e = parse_path(&format!("/db/sch/x/y/{NDJSON}")).unwrap_err();
        assert_eq!(e, WebhookError::NoMatch);
        assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
        let e = parse_path(&format!("/db/sch/x/y/{RESOLVED}")).unwrap_err();
        assert_eq!(e, WebhookError::NoMatch);
    }

    #[test]
    fn four_and_five_segments_that_are_not_files_are_not_found() {
        assert_eq!(parse_path("/db/sch/a/b"), Err(WebhookError::NoMatch));
        assert_eq!(parse_path("/db/sch/a/b/c"), Err(WebhookError::NoMatch));
        assert_eq!(
            parse_path("/db/sch/tbl/2020-04-02/not-a-file.json"),
            Err(WebhookError::NoMatch)
        );
    }

    #[test]
    fn a_path_with_eight_segments_is_not_found() {
        let e = parse_path("/1/2/3/4/5/6/7/8").unwrap_err();
        assert_eq!(e, WebhookError::TooManySegments(8));
        assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_path_with_seven_segments_is_parsed_but_matches_nothing() {
        assert_eq!(parse_path("/1/2/3/4/5/6/7"), Err(WebhookError::NoMatch));
    }

    #[test]
    fn the_root_and_a_single_segment_are_not_found() {
        for p in ["", "/", "//", "/db", "/db/", "//db//"] {
            let e = parse_path(p).unwrap_err();
            assert_eq!(e, WebhookError::TooFewSegments, "{p:?}");
            assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
        }
    }

    #[test]
    fn empty_segments_and_trailing_slashes_are_ignored() {
        let want = webhook("db", "schema", None);
        for p in ["/db/schema/", "//db//schema//", "/db//schema", "db/schema"] {
            assert_eq!(parse_path(p).unwrap(), want, "{p:?}");
        }
        assert_eq!(
            parse_path("/db//schema/tbl/").unwrap(),
            webhook("db", "schema", Some("tbl"))
        );
    }

    #[test]
    fn empty_segments_do_not_count_towards_the_limit() {
        assert_eq!(
            parse_path("//a//b//c//d//e//f//g//"),
            Err(WebhookError::NoMatch)
        );
    }

    #[test]
    fn a_plus_in_a_segment_is_a_space() {
        assert_eq!(
            parse_path("/my+db/my+schema/my+table").unwrap(),
            webhook("my db", "my schema", Some("my table"))
        );
    }

    #[test]
    fn an_escaped_slash_stays_inside_its_segment() {
        assert_eq!(
            parse_path("/db%2Fx/sch%2fy").unwrap(),
            webhook("db/x", "sch/y", None)
        );
    }

    #[test]
    fn percent_escapes_are_decoded_as_utf8() {
        assert_eq!(
            parse_path("/d%C3%A9j%C3%A0/%22Quoted%22/%2B").unwrap(),
            webhook("déjà", "\"Quoted\"", Some("+"))
        );
    }

    #[test]
    fn a_bad_escape_is_not_found() {
        for p in ["/db/sch%", "/db/sch%2", "/db/sch%zz", "/db/%FF%FE"] {
            let e = parse_path(p).unwrap_err();
            assert!(matches!(e, WebhookError::BadEscape(_)), "{p:?}: {e}");
            assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
        }
    }

    #[test]
    fn an_invalid_resolved_timestamp_is_not_found() {
        let e = parse_path("/db/sch/2020-04-04/202013042351304139680000000000000.RESOLVED")
            .unwrap_err();
        assert!(matches!(e, WebhookError::BadResolvedName { .. }), "{e}");
        assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn hourly_partitions_and_gzip_files_are_not_found() {
        let hourly = "/db/sch/2020-04-02/20/202004022058072107140000000000000-56087568dba1e6b8-1-72-00000000-t-1.ndjson";
        assert_eq!(parse_path(hourly), Err(WebhookError::NoMatch));
        let gz = format!("/db/sch/{NDJSON}.gz");
        assert_eq!(parse_path(&gz), Err(WebhookError::NoMatch));
        let gz = format!("/db/sch/tbl/{NDJSON}.gz");
        assert_eq!(parse_path(&gz), Err(WebhookError::NoMatch));
    }

    #[test]
    fn ndjson_names_need_five_groups_a_topic_and_a_schema_id() {
        assert_eq!(ndjson_topic("2020-04-02/a-b-c-d-e-t-1.ndjson"), Some("t"));
        assert_eq!(
            ndjson_topic("2020-04-02/a-b-c-d-e-t-x-1.ndjson"),
            Some("t-x")
        );
        assert_eq!(ndjson_topic("2020-04-02/a-b-c-d-e-t-1xndjson"), Some("t"));
        assert_eq!(ndjson_topic("2020-04-02/a-b-c-d-e-t-1.NDJSON"), None);
        assert_eq!(ndjson_topic("2020-04-02/a-b-c-d-t-1.ndjson"), None); // four groups
        assert_eq!(ndjson_topic("2020-04-02/a--c-d-e-t-1.ndjson"), None); // empty group
        assert_eq!(ndjson_topic("2020-04-02/a-b-c-d-e--1.ndjson"), None); // empty topic
        assert_eq!(ndjson_topic("2020-04-02/a-b-c-d-e-t-.ndjson"), None); // empty schema id
                                                                          // The any-char needs a schema id before it: `-1` + `ndjson` leaves the id empty.
        assert_eq!(ndjson_topic("2020-04-02/a-b-c-d-e-t-1ndjson"), None);
        assert_eq!(ndjson_topic("2020-4-02/a-b-c-d-e-t-1.ndjson"), None);
        assert_eq!(ndjson_topic("2020-04-02a-b-c-d-e-t-1.ndjson"), None);
        assert_eq!(ndjson_topic("2020-04-02/a-b-c-d-e-t-1\nndjson"), None);
    }

    #[test]
    fn resolved_names_need_exactly_33_digits_and_one_separator() {
        let d33 = "202004042351304139680000000000000";
        assert_eq!(
            resolved_digits(&format!("2020-04-04/{d33}.RESOLVED")),
            Some(d33)
        );
        assert_eq!(
            resolved_digits(&format!("2020-04-04/{d33}_RESOLVED")),
            Some(d33)
        );
        assert_eq!(resolved_digits(&format!("2020-04-04/{d33}RESOLVED")), None);
        assert_eq!(
            resolved_digits(&format!("2020-04-04/{d33}..RESOLVED")),
            None
        );
        assert_eq!(
            resolved_digits(&format!("2020-04-04/{}.RESOLVED", &d33[1..])),
            None
        );
        assert_eq!(resolved_digits(&format!("2020-04-04/{d33}.resolved")), None);
        assert_eq!(
            resolved_digits(&format!("2020-04-04/{d33}é.RESOLVED")),
            None
        );
    }

    #[test]
    fn garbage_paths_never_panic() {
        let samples = [
            "/é/ü/%",
            "/a/b/2020-04-02/",
            "/a/b/2020-04-02/é-é-é-é-é-é-é.ndjson",
            "/a/b/2020-04-02/-----.ndjson",
            "/a/b/9999-99-99/999999999999999999999999999999999.RESOLVED",
            "/a/b/2020-04-02/\u{1F600}RESOLVED",
            "%%%/%%/%",
        ];
        for p in samples {
            let _ = parse_path(p);
        }
        // Every prefix of a valid file path.
        let full = format!("/db/public/tbl/{NDJSON}");
        for i in 0..=full.len() {
            let _ = parse_path(&full[..i]);
        }
    }
}

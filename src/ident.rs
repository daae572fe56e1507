//! SQL identifiers and the names built from them. Names compare case-insensitively (the
//! reference lower-cases them) but keep their spelling for quoting.

use std::fmt;
use std::hash::{Hash, Hasher};

/// One SQL identifier, kept as written; equality and hashing ignore ASCII case.
#[derive(Clone, Debug)]
pub struct Ident(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentError {
    #[error("empty identifier in {0:?}")]
    Empty(String),
    #[error("unterminated quoted identifier in {0:?}")]
    Unterminated(String),
    #[error("unexpected character after quoted identifier in {0:?}")]
    Trailing(String),
    #[error("{0:?} has too many name parts (at most {1})")]
    TooManyParts(String, usize),
}

impl Ident {
    pub fn new(raw: impl Into<String>) -> Self {
        Ident(raw.into())
    }

    pub fn raw(&self) -> &str {
        &self.0
    }

    /// Lower-cased form, used for comparison and for staging table names.
    pub(crate) fn canonical(&self) -> String {
        self.0.to_lowercase()
    }

    /// Double-quoted SQL spelling, with embedded quotes doubled.
    pub fn quoted(&self) -> String {
        let mut s = String::with_capacity(self.0.len() + 2);
        s.push('"');
        for c in self.0.chars() {
            if c == '"' {
                s.push('"');
            }
            s.push(c);
        }
        s.push('"');
        s
    }
}

impl PartialEq for Ident {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0) || self.canonical() == other.canonical()
    }
}

impl Eq for Ident {}

impl Hash for Ident {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.canonical().hash(state)
    }
}

impl PartialOrd for Ident {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ident {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.canonical().cmp(&other.canonical())
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A two-part target namespace, `database.schema`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Schema {
    pub(crate) db: Ident,
    pub schema: Ident,
}

impl Schema {
    pub fn new(db: impl Into<String>, schema: impl Into<String>) -> Self {
        Schema {
            db: Ident::new(db),
            schema: Ident::new(schema),
        }
    }

    pub fn quoted(&self) -> String {
        format!("{}.{}", self.db.quoted(), self.schema.quoted())
    }

    /// The lower-cased `db.schema` text used as group name in checkpoints and leases.
    pub(crate) fn canonical(&self) -> String {
        format!("{}.{}", self.db.canonical(), self.schema.canonical())
    }

    /// Parses `db.schema` (parts optionally quoted).
    pub(crate) fn parse(s: &str) -> Result<Schema, IdentError> {
        let parts = parse_dotted(s)?;
        match <[Ident; 2]>::try_from(parts) {
            Ok([db, schema]) => Ok(Schema { db, schema }),
            Err(_) => Err(IdentError::TooManyParts(s.to_string(), 2)),
        }
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.db, self.schema)
    }
}

/// A table in a target schema.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Table {
    pub schema: Schema,
    pub name: Ident,
}

impl Table {
    pub fn new(schema: Schema, name: impl Into<String>) -> Self {
        Table {
            schema,
            name: Ident::new(name),
        }
    }

    /// `"db"."schema"."table"`.
    pub(crate) fn quoted(&self) -> String {
        format!("{}.{}", self.schema.quoted(), self.name.quoted())
    }

    /// `"schema"."table"`: PostgreSQL only resolves names inside the connected database.
    pub(crate) fn quoted_in_db(&self) -> String {
        format!("{}.{}", self.schema.schema.quoted(), self.name.quoted())
    }

    /// Lower-cased `db_schema_table`, the full name of this table's staging table. Distinct
    /// tables can share it (`a_b.c.t` and `a.b_c.t`): the staging registry refuses the second.
    pub(crate) fn staging_name(&self) -> String {
        format!(
            "{}_{}_{}",
            self.schema.db.canonical(),
            self.schema.schema.canonical(),
            self.name.canonical()
        )
    }

    /// [`Table::staging_name`] fitted into an identifier of at most `limit` bytes (see
    /// [`fit_identifier`]); `None` keeps it whole.
    pub(crate) fn staging_name_within(&self, limit: Option<usize>) -> String {
        fit_identifier(&self.staging_name(), limit)
    }

    /// Resolves a possibly qualified name (`t`, `schema.t`, `db.schema.t`) against a default
    /// schema: the last part is the table, the rest are discarded (the URL schema wins, as in
    /// the reference).
    pub(crate) fn parse_in(schema: &Schema, name: &str) -> Result<Table, IdentError> {
        let parts = parse_dotted(name)?;
        if parts.len() > 3 {
            return Err(IdentError::TooManyParts(name.to_string(), 3));
        }
        let last = parts
            .into_iter()
            .last()
            .expect("parse_dotted never returns nothing");
        Ok(Table {
            schema: schema.clone(),
            name: last,
        })
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// FNV-1a, 64 bits: a hash that stays the same across Rust releases and on every instance
/// (std's `DefaultHasher` promises neither), for names derived from names.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `name` itself when it has at most `limit` bytes (or no limit); otherwise its longest
/// prefix cut on a UTF-8 character boundary, `_` and the 16 hex digits of the FNV-1a hash of
/// the whole name, `limit` bytes at most. The database would otherwise cut the name itself,
/// and two names sharing their first `limit` bytes would name one object.
pub(crate) fn fit_identifier(name: &str, limit: Option<usize>) -> String {
    let Some(limit) = limit else {
        return name.to_string();
    };
    if name.len() <= limit {
        return name.to_string();
    }
    let suffix = format!("_{:016x}", fnv1a64(name.as_bytes()));
    let mut cut = limit.saturating_sub(suffix.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &name[..cut])
}

/// Splits a dotted name whose parts may be double-quoted (`"a.b".c` is two parts; `""` inside
/// quotes is one quote character).
pub fn parse_dotted(s: &str) -> Result<Vec<Ident>, IdentError> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(IdentError::Unterminated(s.to_string())),
                }
            }
            match chars.peek() {
                None | Some('.') => {}
                Some(_) => return Err(IdentError::Trailing(s.to_string())),
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(IdentError::Empty(s.to_string()));
        }
        parts.push(Ident(part));
        match chars.next() {
            None => return Ok(parts),
            Some(_) => continue, // the '.'
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_case_insensitively_and_quotes_as_written() {
        assert_eq!(Ident::new("MyTable"), Ident::new("mytable"));
        assert_eq!(Ident::new("My\"T").quoted(), "\"My\"\"T\"");
        let t = Table::new(Schema::new("Db", "Public"), "MyTable");
        assert_eq!(t.quoted(), "\"Db\".\"Public\".\"MyTable\"");
        assert_eq!(t.staging_name(), "db_public_mytable");
    }

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn long_names_get_a_prefix_and_a_hash_of_the_whole_name() {
        let fits = "a".repeat(63);
        assert_eq!(fit_identifier(&fits, Some(63)), fits);
        let long = "b".repeat(200);
        assert_eq!(fit_identifier(&long, None), long, "no limit: kept whole");
        let s = Schema::new("production_analytics", "reporting");
        let a = Table::new(
            s.clone(),
            "customer_subscription_billing_events_archive_2023",
        );
        let b = Table::new(s, "customer_subscription_billing_events_archive_2024");
        assert_eq!(
            a.staging_name(),
            "production_analytics_reporting_customer_subscription_billing_events_archive_2023"
        );
        assert_eq!(
            a.staging_name_within(Some(63)),
            "production_analytics_reporting_customer_subscr_1150880afa7d025c"
        );
        assert_ne!(
            a.staging_name_within(Some(63)),
            b.staging_name_within(Some(63))
        );
        assert_eq!(a.staging_name_within(None), a.staging_name(), "cockroachdb");
        // A 64-byte name is the shortest to be hashed.
        let n64 = format!("{}é", "x".repeat(62));
        assert_eq!(n64.len(), 64);
        assert_eq!(
            fit_identifier(&n64, Some(63)),
            format!("{}_b879a1cbb4a1ae29", "x".repeat(46))
        );
        let n63 = format!("{}é", "x".repeat(61));
        assert_eq!(
            fit_identifier(&n63, Some(63)),
            n63,
            "63 bytes fit as they are"
        );
        // The cut never splits a character: bytes 45..=47 are one 3-byte character here.
        let wide = format!("{}€tail_{}", "y".repeat(45), "z".repeat(20));
        assert_eq!(
            fit_identifier(&wide, Some(63)),
            format!("{}_56aae016d6e0343f", "y".repeat(45))
        );
        for n in [&n64, &wide, &a.staging_name()] {
            let fitted = fit_identifier(n, Some(63));
            assert!(fitted.len() <= 63, "{fitted}");
        }
    }

    #[test]
    fn parses_dotted_and_quoted_names() {
        let p = parse_dotted("ignored_db.ignored_schema.REAL-42").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].raw(), "REAL-42");
        let p = parse_dotted("\"a.b\".\"c\"\"d\"").unwrap();
        assert_eq!(
            p.iter().map(|i| i.raw()).collect::<Vec<_>>(),
            ["a.b", "c\"d"]
        );
        assert!(parse_dotted("").is_err());
        assert!(parse_dotted("a..b").is_err());
        assert!(parse_dotted("\"a").is_err());
        assert!(parse_dotted("\"a\"b").is_err());
    }

    #[test]
    fn table_names_are_rerooted_in_the_url_schema() {
        let s = Schema::new("kv", "public");
        let t = Table::parse_in(&s, "other.sch.kv").unwrap();
        assert_eq!(t, Table::new(s.clone(), "kv"));
        assert!(Table::parse_in(&s, "a.b.c.d").is_err());
    }
}

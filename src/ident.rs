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
    pub fn canonical(&self) -> String {
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
    pub db: Ident,
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
    pub fn canonical(&self) -> String {
        format!("{}.{}", self.db.canonical(), self.schema.canonical())
    }

    /// Parses `db.schema` (parts optionally quoted).
    pub fn parse(s: &str) -> Result<Schema, IdentError> {
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
    pub fn quoted(&self) -> String {
        format!("{}.{}", self.schema.quoted(), self.name.quoted())
    }

    /// `"schema"."table"`: PostgreSQL only resolves names inside the connected database.
    pub fn quoted_in_db(&self) -> String {
        format!("{}.{}", self.schema.schema.quoted(), self.name.quoted())
    }

    /// Lower-cased `db_schema_table`, the name of this table's staging table.
    pub fn staging_name(&self) -> String {
        format!(
            "{}_{}_{}",
            self.schema.db.canonical(),
            self.schema.schema.canonical(),
            self.name.canonical()
        )
    }

    /// Resolves a possibly qualified name (`t`, `schema.t`, `db.schema.t`) against a default
    /// schema: the last part is the table, the rest are discarded (the URL schema wins, as in
    /// the reference).
    pub fn parse_in(schema: &Schema, name: &str) -> Result<Table, IdentError> {
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

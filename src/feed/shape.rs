//! Row shaping: the kinds of the fed tables' columns (non-builtin types looked up in
//! `pg_type`), the shape of each relation, and the changefeed changes that a decoded insert,
//! update or delete adds to its transaction (a primary-key change becomes a delete and an
//! insert; before images only with `--diff`).

use super::encode::{Kind, Shape};
use super::pgoutput::{Datum, Relation};
use super::source::Reader;
use super::FeedError;
use sqlx::postgres::PgConnection;
use std::collections::HashMap;
use tracing::{debug, error};

/// The transaction being decoded.
pub(super) struct Txn {
    pub(super) commit_micros: i64,
    pub(super) changes: Vec<Change>,
}

pub(super) struct Change {
    pub(super) topic: String,
    pub(super) after: Option<String>,
    pub(super) before: Option<String>,
    pub(super) key: String,
}

impl Reader {
    /// The shape of a described relation; `None` when it is not fed.
    fn shape_of(&self, rel: u32) -> Result<Option<&Shape>, FeedError> {
        self.shapes.get(&rel).map(Option::as_ref).ok_or_else(|| {
            FeedError::Decode(format!("change of relation {rel} before its description"))
        })
    }

    fn object(
        &self,
        shape: &Shape,
        datums: &[Datum],
        fallback: Option<&[Datum]>,
    ) -> Result<String, FeedError> {
        let mut missing = Vec::new();
        let out = shape.object(datums, fallback, &mut missing)?;
        if !missing.is_empty() {
            error!(table = %shape.topic, columns = ?missing, "unchanged toasted values without an old row; columns left out (set replica identity full before writing)");
        }
        Ok(out)
    }

    pub(super) fn insert(&self, t: &mut Txn, rel: u32, new: &[Datum]) -> Result<(), FeedError> {
        let Some(shape) = self.shape_of(rel)? else {
            return Ok(());
        };
        t.changes.push(Change {
            topic: shape.topic.clone(),
            after: Some(self.object(shape, new, None)?),
            before: self.diff.then(|| "null".to_string()),
            key: shape.key(new)?,
        });
        Ok(())
    }

    pub(super) fn update(
        &self,
        t: &mut Txn,
        rel: u32,
        old: Option<&[Datum]>,
        new: &[Datum],
    ) -> Result<(), FeedError> {
        let Some(shape) = self.shape_of(rel)? else {
            return Ok(());
        };
        let key = shape.key(new)?;
        let before = match old {
            Some(o) => Some(self.object(shape, o, None)?),
            None => None,
        };
        if let Some(o) = old {
            let old_key = shape.key(o)?;
            if old_key != key {
                // A primary-key change is a delete of the old key and an insert of the new.
                t.changes.push(Change {
                    topic: shape.topic.clone(),
                    after: None,
                    before: if self.diff { before.clone() } else { None },
                    key: old_key,
                });
                t.changes.push(Change {
                    topic: shape.topic.clone(),
                    after: Some(self.object(shape, new, old)?),
                    before: self.diff.then(|| "null".to_string()),
                    key,
                });
                return Ok(());
            }
        }
        t.changes.push(Change {
            topic: shape.topic.clone(),
            after: Some(self.object(shape, new, old)?),
            before: if self.diff {
                Some(before.unwrap_or_else(|| "null".into()))
            } else {
                None
            },
            key,
        });
        Ok(())
    }

    pub(super) fn delete(&self, t: &mut Txn, rel: u32, old: &[Datum]) -> Result<(), FeedError> {
        let Some(shape) = self.shape_of(rel)? else {
            return Ok(());
        };
        let before = if self.diff {
            Some(self.object(shape, old, None)?)
        } else {
            None
        };
        t.changes.push(Change {
            topic: shape.topic.clone(),
            after: None,
            before,
            key: shape.key(old)?,
        });
        Ok(())
    }

    /// The shape of a relation message's table; `None` for a table we do not feed.
    pub(super) fn shape(&self, r: &Relation) -> Result<Option<Shape>, FeedError> {
        let Some(table) = self
            .tables
            .iter()
            .find(|t| t.schema == r.namespace && t.name == r.name)
        else {
            debug!(schema = %r.namespace, table = %r.name, "ignoring changes of a table that is not fed");
            return Ok(None);
        };
        let mut columns: Vec<(String, Kind, usize)> = r
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let kind = Kind::builtin(c.type_oid)
                    .or_else(|| self.kinds.get(&c.type_oid).cloned())
                    .unwrap_or(Kind::Text);
                (c.name.clone(), kind, i)
            })
            .collect();
        columns.sort_by(|a, b| a.0.cmp(&b.0));
        let key = table
            .key
            .iter()
            .map(|k| {
                r.columns.iter().position(|c| c.name == *k).ok_or_else(|| {
                    FeedError::Decode(format!(
                        "primary-key column {k} of {}.{} is not in the change",
                        r.namespace, r.name
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Shape {
            topic: r.name.clone(),
            columns,
            key,
        }))
    }

    /// Looks up the non-builtin column types of `relations` (domains, enums, their arrays).
    pub(super) async fn resolve_kinds(
        &mut self,
        conn: &mut PgConnection,
        relations: &[&Relation],
    ) -> Result<(), FeedError> {
        let roots: Vec<u32> = relations
            .iter()
            .flat_map(|r| r.columns.iter().map(|c| c.type_oid))
            .filter(|o| Kind::builtin(*o).is_none() && !self.kinds.contains_key(o))
            .collect();
        let mut facts: HashMap<u32, TypeFacts> = HashMap::new();
        let mut wanted = roots.clone();
        // Domains and arrays point at other types; a few rounds cover any sane nesting.
        for _ in 0..6 {
            wanted.retain(|o| Kind::builtin(*o).is_none() && !facts.contains_key(o));
            wanted.sort_unstable();
            wanted.dedup();
            if wanted.is_empty() {
                break;
            }
            let oids: Vec<i64> = wanted.iter().map(|o| i64::from(*o)).collect();
            let rows: Vec<(i64, String, String, i64, String, i64)> = sqlx::query_as(
                "SELECT oid::int8, typtype::text, typcategory::text, typelem::int8, \
                 typdelim::text, typbasetype::int8 FROM pg_type WHERE oid::int8 = ANY($1)",
            )
            .bind(&oids)
            .fetch_all(&mut *conn)
            .await
            .map_err(FeedError::source("look up column types"))?;
            wanted.clear();
            for (oid, typtype, category, elem, delim, base) in rows {
                let f = TypeFacts {
                    typtype: typtype.bytes().next().unwrap_or(b'b'),
                    category: category.bytes().next().unwrap_or(b'U'),
                    elem: elem as u32,
                    delim: delim.bytes().next().unwrap_or(b','),
                    base: base as u32,
                };
                wanted.extend([f.elem, f.base].into_iter().filter(|o| *o != 0));
                facts.insert(oid as u32, f);
            }
        }
        for oid in roots {
            let kind = kind_from_facts(oid, &facts, 0);
            self.kinds.insert(oid, kind);
        }
        Ok(())
    }
}

/// What `pg_type` says about a non-builtin type.
struct TypeFacts {
    typtype: u8,
    category: u8,
    elem: u32,
    delim: u8,
    base: u32,
}

fn kind_from_facts(oid: u32, facts: &HashMap<u32, TypeFacts>, depth: u8) -> Kind {
    if let Some(k) = Kind::builtin(oid) {
        return k;
    }
    let Some(f) = facts.get(&oid) else {
        return Kind::Text;
    };
    if depth > 8 {
        return Kind::Text;
    }
    if f.typtype == b'd' {
        return kind_from_facts(f.base, facts, depth + 1);
    }
    let element =
        (f.category == b'A' && f.elem != 0).then(|| kind_from_facts(f.elem, facts, depth + 1));
    Kind::from_category(f.category, element, f.delim)
}

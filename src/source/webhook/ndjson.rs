//! Cloud-storage sink files: one JSON object per line (reference §1.6, §1.8).

use super::element::{ndjson_table_row, Dialect, Fields, QueryTarget};
use super::json::{is_json_ws, Object};
use super::{DecodeLimits, Payload, PrimaryKeys, WebhookError};
use crate::ident::{Ident, Schema, Table};

/// Decodes an ndjson body; every line of the request forms one batch.
pub(crate) fn decode_ndjson(
    schema: &Schema,
    table: &Ident,
    query: bool,
    body: &[u8],
    pks: &dyn PrimaryKeys,
    limits: &DecodeLimits,
) -> Result<Payload, WebhookError> {
    let table = Table::new(schema.clone(), table.raw());
    let mut target = query.then(|| QueryTarget::new(table.clone(), pks));
    let mut out = Vec::new();
    let mut any_line = false;
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let number = i + 1;
        // CRLF files: the line ends before the `\r`, as a line scanner would cut it.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > limits.ndjson_line_bytes {
            return Err(WebhookError::LineTooLong {
                line: number,
                limit: limits.ndjson_line_bytes,
            });
        }
        let at = |e: WebhookError| e.at(format!("line {number}"));
        let text = std::str::from_utf8(line).map_err(|_| at(WebhookError::NotUtf8))?;
        if text.trim_matches(is_json_ws).is_empty() {
            continue;
        }
        any_line = true;
        let row = Object::parse(text)
            .map_err(WebhookError::json)
            .and_then(|obj| match target.as_mut() {
                Some(t) => Fields::from_object(obj, Dialect::Query).and_then(|f| t.row(f)),
                None => Fields::from_object(obj, Dialect::Lenient).and_then(ndjson_table_row),
            })
            .map_err(at)?;
        if let Some(m) = row {
            out.push((table.clone(), m));
        }
    }
    Ok(if any_line {
        Payload::Mutations(out)
    } else {
        Payload::Empty
    })
}

//! Reads a window's staged rows page by page ahead of the appliers, growing the window to
//! newer resolved timestamps while it may.

use super::*;

/// How long a window may keep growing to newer resolved timestamps.
pub(super) const EXTEND_FOR: Duration = Duration::from_secs(5);

/// A page of staged rows: complete for `(after, cut]`, in a window that ends at `hi`.
pub(super) struct Page {
    pub(super) after: Hlc,
    pub(super) cut: Hlc,
    pub(super) rows: Vec<(usize, Mutation)>,
    pub(super) hi: Hlc,
    /// The window's last page.
    pub(super) last: bool,
}

/// Reads the window page by page ahead of the appliers; the channel's capacity bounds how far.
///
/// At the end of the window, a newer resolved timestamp (one usually arrives while a window
/// applies) extends it, so the appliers go on without draining between windows. Not once the
/// cached target schema has changed: a table created since the window started could have rows
/// in the extension, and this window would not read them.
pub(super) async fn read_pages(
    ctx: Arc<Ctx>,
    mut from: Hlc,
    mut hi: Hlc,
    out: mpsc::Sender<Result<Page, SequenceError>>,
) {
    let started = Instant::now();
    loop {
        let mut page = read_page(&ctx, from, hi).await;
        let mut next = None;
        if let Ok(p) = &mut page {
            if p.cut >= hi {
                next = extension(&ctx, hi, started).await;
                p.last = next.is_none();
            }
        }
        let cut = page.as_ref().map(|p| p.cut).ok();
        if out.send(page).await.is_err() {
            return;
        }
        match cut {
            Some(c) if c < hi => from = c,
            Some(c) if next.is_some() => (from, hi) = (c, next.unwrap_or(hi)),
            _ => return,
        }
    }
}

/// A newer resolved timestamp to extend the window to, if it may be.
pub(super) async fn extension(ctx: &Ctx, hi: Hlc, started: Instant) -> Option<Hlc> {
    if started.elapsed() >= EXTEND_FOR {
        return None;
    }
    // Bounds first, schema second: a table is known to the schema cache before a resolved
    // timestamp covering its rows can be recorded.
    let proposed = ctx
        .parts
        .checkpoints
        .bounds(&ctx.schema)
        .await
        .ok()?
        .proposed;
    if proposed <= hi {
        return None;
    }
    let info = ctx.parts.applier.schemas().schema(&ctx.schema).await.ok()?;
    if !Arc::ptr_eq(&info, &ctx.info) {
        return None;
    }
    // A table staged for the first time since the window started is read by the next one.
    let registered = ctx.parts.stager.registered(&ctx.schema).await.ok()?;
    if registered.len() != ctx.registered {
        return None;
    }
    for table in &ctx.unread {
        if has_staged(&ctx.parts, table, hi, proposed).await.ok()? {
            return None;
        }
    }
    Some(proposed)
}

/// Whether `table` has unapplied staged rows in `(after, upto]`.
pub(super) async fn has_staged(
    parts: &Parts,
    table: &Table,
    after: Hlc,
    upto: Hlc,
) -> Result<bool, SequenceError> {
    let mut tx = parts.stager.reader().await?;
    let page = parts
        .stager
        .read(&mut tx, table, after, None, upto, 1, usize::MAX)
        .await?;
    tx.commit().await.map_err(SequenceError::Sql)?;
    Ok(!page.rows.is_empty())
}

/// Reads unapplied rows in `(from, hi]` from every table, returning the time up to which the
/// result is complete and the rows at or before it.
pub(super) async fn read_page(ctx: &Ctx, from: Hlc, hi: Hlc) -> Result<Page, SequenceError> {
    let started = Instant::now();
    let (scan, bytes) = (ctx.parts.args.scan_size, ctx.parts.args.scan_bytes);
    let stager = &ctx.parts.stager;
    let mut tx = stager.reader().await?;
    let conn: &mut PgConnection = &mut tx;
    let mut cut = hi;
    let mut rows: Vec<(usize, Mutation)> = Vec::new();
    for (i, table) in ctx.tables.iter().enumerate() {
        let read = stager
            .read(conn, table, from, None, cut, scan, bytes)
            .await?;
        let mut page = read.rows;
        // A read cut short by rows or bytes is complete only up to its last timestamp.
        if read.full {
            let first = page[0].time;
            let last = page[page.len() - 1].time;
            if first == last {
                // One source timestamp larger than a page: read all of it, never split it.
                loop {
                    let key = page[page.len() - 1].key.clone();
                    let more = stager
                        .read(conn, table, last, Some(&key), last, scan, bytes)
                        .await?;
                    page.extend(more.rows.into_iter().filter(|m| m.time == last));
                    if !more.full {
                        break;
                    }
                }
                cut = cut.min(last);
            } else {
                cut = cut.min(last.before());
            }
        }
        rows.extend(page.into_iter().map(|m| (i, m)));
    }
    tx.commit().await.map_err(SequenceError::Sql)?;
    rows.retain(|(_, m)| m.time <= cut);
    let read = rows.len();
    rows.retain(|(_, m)| !ctx.skip.contains(m.time));
    if rows.len() < read {
        metrics::counter!(m::STAGE_SKIPPED_APPLIED, &schema_label(&ctx.schema))
            .increment((read - rows.len()) as u64);
    }
    record_read(ctx, cut, &rows);
    tracing::debug!(schema = %ctx.schema, rows = rows.len(), read_ms = started.elapsed().as_millis() as u64, "read staged page");
    Ok(Page {
        after: from,
        cut,
        rows,
        hi,
        last: false,
    })
}

/// Publishes the reader's position: how far behind now the page ends, and each table's rows in
/// it (`stage_read_lag_seconds`, `stage_read_queue_count`).
pub(super) fn record_read(ctx: &Ctx, cut: Hlc, rows: &[(usize, Mutation)]) {
    let mut per_table = vec![0usize; ctx.tables.len()];
    for (t, _) in rows {
        per_table[*t] += 1;
    }
    let lag = now_seconds() - cut.seconds();
    for (table, n) in ctx.tables.iter().zip(per_table) {
        let l = m::table_labels(table);
        metrics::gauge!(m::STAGE_READ_LAG, &l).set(lag);
        metrics::gauge!(m::STAGE_READ_QUEUE, &l).set(n as f64);
    }
}

//! SQL shared by the writer, the reader pool and the read-only inspector: schema set-up, PRAGMAs,
//! the record CRC and row decoding.

use crate::log::{CursorInfo, Gap, GapSummary, LogError, ReadBatch, StreamInfo, StreamPolicy};
use edge_core::{Event, Header, Record};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};
use std::sync::Arc;

/// Bits of the rowid that hold the seq; the stream id sits above them.
pub const SEQ_BITS: u32 = 44;
pub const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
pub const MAX_STREAM_ID: i64 = (1 << (63 - SEQ_BITS)) - 1;

/// Numbered migrations; `PRAGMA user_version` holds how many have been applied.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_dedup_per_source.sql"),
    include_str!("migrations/0003_gap_totals.sql"),
];

/// Longest event id or source kept verbatim in the dedup index. A longer one is kept as
/// `sha256:` and its 64 hex digits, so an index entry stays under about 200 bytes whatever a
/// source sends, and the `dedup_window` bounds the index in bytes as well as in entries. The
/// record itself keeps the full id.
pub const DEDUP_KEY_MAX_BYTES: usize = 128;

/// The form of an event id or source in the dedup index (see [`DEDUP_KEY_MAX_BYTES`]).
pub fn dedup_key(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= DEDUP_KEY_MAX_BYTES {
        return std::borrow::Cow::Borrowed(s);
    }
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in d.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    std::borrow::Cow::Owned(out)
}

pub fn row_id(stream_id: i64, seq: u64) -> i64 {
    (stream_id << SEQ_BITS) | (seq.min(MAX_SEQ) as i64)
}

pub fn seq_of(row_id: i64) -> u64 {
    (row_id as u64) & MAX_SEQ
}

pub fn storage(op: &'static str) -> impl FnOnce(rusqlite::Error) -> LogError {
    move |e| LogError::Storage {
        op,
        reason: e.to_string(),
    }
}

/// For a statement that writes one request's data: an error the same request would meet again
/// (a constraint, a value too big for the storage, a type the column refuses) makes the request
/// [`LogError::Invalid`], which its source must not retry; anything else is a storage error.
pub fn refusal(op: &'static str) -> impl FnOnce(rusqlite::Error) -> LogError {
    move |e| match e.sqlite_error_code() {
        Some(
            rusqlite::ErrorCode::ConstraintViolation
            | rusqlite::ErrorCode::TooBig
            | rusqlite::ErrorCode::TypeMismatch,
        ) => LogError::Invalid(format!("the log cannot store it ({op}): {e}")),
        _ => storage(op)(e),
    }
}

/// Whether an error means the file itself is damaged or not a database.
pub fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt) | Some(rusqlite::ErrorCode::NotADatabase)
    )
}

/// PRAGMAs of every connection. Returns the journal mode SQLite reports.
pub fn apply_connection_pragmas(
    conn: &Connection,
    synchronous_full: bool,
    cache_kib: i64,
) -> rusqlite::Result<String> {
    // Another connection (checkpointer, reader, CLI) may hold a lock briefly; wait rather than fail.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: readers never block the writer and one fsync per commit suffices.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    // FULL: the WAL is fsynced at every commit, so a committed batch survives a power cut.
    // NORMAL: fsync only at checkpoints (survives process crashes, not power loss).
    conn.pragma_update(
        None,
        "synchronous",
        if synchronous_full { "FULL" } else { "NORMAL" },
    )?;
    // Bounded page cache (negative = KiB) keeps resident memory independent of the backlog.
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    // Memory-mapped I/O would make RSS grow with the file; plain reads keep it bounded.
    conn.pragma_update(None, "mmap_size", 0)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(mode)
}

/// Creates or migrates the schema. On a new database also sets the page-level options that can only
/// be chosen before the first table exists, and the epoch.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        if i == 0 {
            let now = edge_core::time::now_ms();
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?1), ('created_ts', ?2)",
                params![uuid::Uuid::new_v4().to_string(), now.to_string()],
            )?;
        }
        if i == 1 {
            hash_long_dedup_keys(&tx)?;
        }
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Part of migration 2: entries of version 1 with an id or source over [`DEDUP_KEY_MAX_BYTES`]
/// take the digest form the writer now looks up.
fn hash_long_dedup_keys(conn: &Connection) -> rusqlite::Result<()> {
    let long: Vec<(i64, String, String)> = conn
        .prepare(
            "SELECT id, source, event_id FROM dedup
             WHERE length(CAST(source AS BLOB)) > ?1 OR length(CAST(event_id AS BLOB)) > ?1",
        )?
        .query_map([DEDUP_KEY_MAX_BYTES as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut update = conn.prepare("UPDATE dedup SET source = ?2, event_id = ?3 WHERE id = ?1")?;
    for (id, source, event_id) in long {
        update.execute(params![id, dedup_key(&source), dedup_key(&event_id)])?;
    }
    Ok(())
}

pub fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

pub fn latest_schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

pub fn read_epoch(conn: &Connection) -> Result<uuid::Uuid, LogError> {
    let s: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })
        .map_err(storage("reading the epoch"))?;
    uuid::Uuid::parse_str(&s).map_err(|e| LogError::Storage {
        op: "reading the epoch",
        reason: format!("stored epoch {s:?} is not a UUID: {e}"),
    })
}

/// CRC-32C over everything that identifies and carries a record. Optional fields are tagged so
/// that `None` and `Some("")` differ.
#[allow(clippy::too_many_arguments)]
pub fn record_crc(
    stream: &str,
    seq: u64,
    event_ts: i64,
    ingest_ts: i64,
    key: Option<&str>,
    source: Option<&str>,
    event_id: Option<&str>,
    schema: Option<&str>,
    headers: Option<&str>,
    payload: &[u8],
) -> u32 {
    let mut c = crc32c::crc32c(stream.as_bytes());
    c = crc32c::crc32c_append(c, &seq.to_le_bytes());
    c = crc32c::crc32c_append(c, &event_ts.to_le_bytes());
    c = crc32c::crc32c_append(c, &ingest_ts.to_le_bytes());
    for f in [key, source, event_id, schema, headers] {
        match f {
            None => c = crc32c::crc32c_append(c, &[0]),
            Some(s) => {
                c = crc32c::crc32c_append(c, &[1]);
                c = crc32c::crc32c_append(c, &(s.len() as u32).to_le_bytes());
                c = crc32c::crc32c_append(c, s.as_bytes());
            }
        }
    }
    c = crc32c::crc32c_append(c, &(payload.len() as u32).to_le_bytes());
    crc32c::crc32c_append(c, payload)
}

pub fn encode_headers(h: &[Header]) -> Option<String> {
    if h.is_empty() {
        return None;
    }
    let pairs: Vec<[&str; 2]> = h
        .iter()
        .map(|h| [h.key.as_str(), h.value.as_str()])
        .collect();
    serde_json::to_string(&pairs).ok()
}

fn decode_headers(s: &str) -> Result<Vec<Header>, String> {
    let pairs: Vec<[String; 2]> =
        serde_json::from_str(s).map_err(|e| format!("headers are not valid JSON: {e}"))?;
    Ok(pairs
        .into_iter()
        .map(|[key, value]| Header { key, value })
        .collect())
}

/// The columns of a `records` row, read as loosely typed values so that a damaged row is reported
/// instead of failing the whole read.
pub const RECORD_COLUMNS: &str =
    "id, event_ts, ingest_ts, key, source, event_id, schema, headers, payload, crc";

pub struct RawRow {
    pub id: i64,
    pub values: [Value; 9],
}

pub fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: r.get(0)?,
        values: [
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
        ],
    })
}

fn int(v: &Value, name: &str) -> Result<i64, String> {
    match v {
        Value::Integer(i) => Ok(*i),
        other => Err(format!(
            "column {name} holds {other:?} instead of an integer"
        )),
    }
}

fn opt_text<'a>(v: &'a Value, name: &str) -> Result<Option<&'a str>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Text(s) => Ok(Some(s)),
        _ => Err(format!("column {name} holds a non-text value")),
    }
}

/// Decodes and verifies a row. `Err` carries the reason the row is unusable.
pub fn decode_row(stream: &Arc<str>, row: &RawRow) -> Result<Record, String> {
    let v = &row.values;
    let seq = seq_of(row.id);
    let event_ts = int(&v[0], "event_ts")?;
    let ingest_ts = int(&v[1], "ingest_ts")?;
    let key = opt_text(&v[2], "key")?;
    let source = opt_text(&v[3], "source")?;
    let event_id = opt_text(&v[4], "event_id")?;
    let schema = opt_text(&v[5], "schema")?;
    let headers = opt_text(&v[6], "headers")?;
    let payload: &[u8] = match &v[7] {
        Value::Blob(b) => b,
        Value::Text(s) => s.as_bytes(),
        _ => return Err("column payload holds neither bytes nor text".into()),
    };
    let stored_crc = int(&v[8], "crc")?;
    let crc = record_crc(
        stream, seq, event_ts, ingest_ts, key, source, event_id, schema, headers, payload,
    );
    if i64::from(crc) != stored_crc {
        return Err(format!(
            "CRC mismatch (stored {stored_crc:#010x}, computed {crc:#010x})"
        ));
    }
    let headers = match headers {
        Some(h) => decode_headers(h)?,
        None => Vec::new(),
    };
    Ok(Record {
        seq,
        ingest_ts_ms: ingest_ts,
        event: Event {
            stream: stream.clone(),
            event_ts_ms: event_ts,
            key: key.map(str::to_owned),
            source: source.map(str::to_owned),
            event_id: event_id.map(str::to_owned),
            schema: schema.map(str::to_owned),
            headers,
            payload: bytes::Bytes::copy_from_slice(payload),
        },
    })
}

/// Best-effort raw payload of a damaged row, for the dead letter.
pub fn raw_payload(row: &RawRow) -> Vec<u8> {
    match &row.values[7] {
        Value::Blob(b) => b.clone(),
        Value::Text(s) => s.as_bytes().to_vec(),
        _ => Vec::new(),
    }
}

pub fn stream_id(conn: &Connection, name: &str) -> Result<Option<i64>, LogError> {
    conn.prepare_cached("SELECT id FROM streams WHERE name = ?1")
        .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
        .map_err(storage("looking up a stream"))
}

/// Reads rows of one stream from `from_seq`. Returns decoded records, the seq to continue from,
/// and rows that failed verification (seq, reason). Damaged rows are *not* removed here.
/// Reason given for a row SQLite cannot read at all (its page is damaged).
pub const UNREADABLE: &str = "unreadable: the database page holding it is damaged";

/// Reads rows of one stream from `from_seq`. Returns decoded records, the seq to continue from,
/// and rows that failed verification (seq, reason). Damaged rows are *not* removed here.
///
/// When the range scan hits a damaged page, the rows are read one by one instead, so the rows
/// SQLite can still read are returned and the unreadable ones are reported; a consumer then moves
/// past them instead of failing on the same page forever.
pub fn read_rows(
    conn: &Connection,
    stream: &Arc<str>,
    stream_id: i64,
    from_seq: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<ReadBatch, LogError> {
    match scan_rows(conn, stream, stream_id, from_seq, max_records, max_bytes) {
        Ok(b) => Ok(b),
        Err(e) if is_corruption(&e) => {
            point_reads(conn, stream, stream_id, from_seq, max_records, max_bytes)
        }
        Err(e) => Err(storage("reading records")(e)),
    }
}

fn scan_rows(
    conn: &Connection,
    stream: &Arc<str>,
    stream_id: i64,
    from_seq: u64,
    max_records: usize,
    max_bytes: usize,
) -> rusqlite::Result<ReadBatch> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM records WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT ?3"
    ))?;
    let lo = row_id(stream_id, from_seq.max(1));
    let hi = row_id(stream_id + 1, 0);
    let mut rows = stmt.query(params![lo, hi, max_records.max(1) as i64])?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let mut next = from_seq;
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let raw = raw_row(r)?;
        let seq = seq_of(raw.id);
        next = seq + 1;
        match decode_row(stream, &raw) {
            Ok(rec) => {
                bytes += rec.event.approx_size();
                out.push(rec);
            }
            Err(reason) => bad.push((seq, reason)),
        }
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(ReadBatch {
        records: out,
        next_seq: next,
        quarantined: bad,
    })
}

fn point_reads(
    conn: &Connection,
    stream: &Arc<str>,
    stream_id: i64,
    from_seq: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<ReadBatch, LogError> {
    let head: i64 = conn
        .query_row(
            "SELECT next_seq FROM streams WHERE id = ?1",
            [stream_id],
            |r| r.get(0),
        )
        .map_err(storage("reading a stream head"))?;
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE id = ?1"
        ))
        .map_err(storage("reading records"))?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let mut next = from_seq.max(1);
    let mut bytes = 0usize;
    let mut examined = 0usize;
    while next < head as u64 && examined < max_records.max(1) && bytes < max_bytes {
        let seq = next;
        next += 1;
        examined += 1;
        match stmt.query_row([row_id(stream_id, seq)], raw_row).optional() {
            Ok(Some(raw)) => match decode_row(stream, &raw) {
                Ok(rec) => {
                    bytes += rec.event.approx_size();
                    out.push(rec);
                }
                Err(reason) => bad.push((seq, reason)),
            },
            Ok(None) => {}
            Err(e) if is_corruption(&e) => bad.push((seq, UNREADABLE.to_string())),
            Err(e) => return Err(storage("reading records")(e)),
        }
    }
    Ok(ReadBatch {
        records: out,
        next_seq: next,
        quarantined: bad,
    })
}

pub fn load_stream_infos(
    conn: &Connection,
    policy: &dyn Fn(&str) -> StreamPolicy,
) -> Result<Vec<StreamInfo>, LogError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, name, next_seq, record_count, payload_bytes FROM streams ORDER BY name",
        )
        .map_err(storage("listing streams"))?;
    let rows: Vec<(i64, String, i64, i64, i64)> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .and_then(|it| it.collect())
        .map_err(storage("listing streams"))?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, name, next_seq, count, bytes) in rows {
        let first: Option<(i64, i64)> = conn
            .prepare_cached(
                "SELECT id, ingest_ts FROM records WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![row_id(id, 1), row_id(id + 1, 0)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(storage("listing streams"))?;
        let p = policy(&name);
        out.push(StreamInfo {
            first_seq: first.map_or(next_seq as u64, |(rid, _)| seq_of(rid)),
            next_seq: next_seq as u64,
            records: count.max(0) as u64,
            payload_bytes: bytes.max(0) as u64,
            oldest_ingest_ts_ms: first.map(|(_, ts)| ts),
            priority: p.priority,
            mirrored: p.mirrored,
            name,
        });
    }
    Ok(out)
}

pub fn oldest_from(
    conn: &Connection,
    stream_id: i64,
    from_seq: u64,
) -> Result<Option<i64>, LogError> {
    conn.prepare_cached(
        "SELECT ingest_ts FROM records WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT 1",
    )
    .and_then(|mut s| {
        s.query_row(
            params![row_id(stream_id, from_seq.max(1)), row_id(stream_id + 1, 0)],
            |r| r.get(0),
        )
        .optional()
    })
    .map_err(storage("finding the oldest unsent record"))
}

pub fn cursor(conn: &Connection, name: &str, stream: &str) -> Result<Option<u64>, LogError> {
    conn.prepare_cached(
        "SELECT c.next_seq FROM cursors c JOIN streams s ON s.id = c.stream_id
         WHERE c.name = ?1 AND s.name = ?2",
    )
    .and_then(|mut s| {
        s.query_row(params![name, stream], |r| r.get::<_, i64>(0))
            .optional()
    })
    .map(|o| o.map(|v| v as u64))
    .map_err(storage("reading a cursor"))
}

pub fn cursors(conn: &Connection) -> Result<Vec<CursorInfo>, LogError> {
    conn.prepare_cached(
        "SELECT c.name, s.name, c.next_seq, c.updated_ts FROM cursors c
         JOIN streams s ON s.id = c.stream_id ORDER BY c.name, s.name",
    )
    .and_then(|mut s| {
        s.query_map([], |r| {
            Ok(CursorInfo {
                cursor: r.get(0)?,
                stream: r.get(1)?,
                next_seq: r.get::<_, i64>(2)? as u64,
                updated_ts_ms: r.get(3)?,
            })
        })
        .and_then(|it| it.collect())
    })
    .map_err(storage("listing cursors"))
}

pub fn gaps(conn: &Connection, after_id: u64, limit: usize) -> Result<Vec<Gap>, LogError> {
    conn.prepare_cached(
        "SELECT g.id, s.name, g.first_seq, g.last_seq, g.count, g.reason, g.ts FROM gaps g
         JOIN streams s ON s.id = g.stream_id WHERE g.id > ?1 ORDER BY g.id LIMIT ?2",
    )
    .and_then(|mut s| {
        s.query_map(params![after_id as i64, limit as i64], |r| {
            Ok(Gap {
                id: r.get::<_, i64>(0)? as u64,
                stream: r.get(1)?,
                first_seq: r.get::<_, i64>(2)? as u64,
                last_seq: r.get::<_, i64>(3)? as u64,
                count: r.get::<_, i64>(4)? as u64,
                reason: r.get(5)?,
                ts_ms: r.get(6)?,
            })
        })
        .and_then(|it| it.collect())
    })
    .map_err(storage("listing gaps"))
}

pub fn gap_summary(conn: &Connection) -> Result<Vec<GapSummary>, LogError> {
    conn.prepare_cached(
        // Markers still kept plus the totals of those pruned after the uplink reported them.
        "SELECT s.name, u.kind, sum(u.ranges), sum(u.records) FROM
           (SELECT stream_id, substr(reason, 1, instr(reason || ':', ':') - 1) AS kind,
                   count(*) AS ranges, coalesce(sum(count), 0) AS records
              FROM gaps GROUP BY stream_id, kind
            UNION ALL
            SELECT stream_id, kind, ranges, records FROM gap_totals) u
         JOIN streams s ON s.id = u.stream_id GROUP BY s.name, u.kind ORDER BY s.name, u.kind",
    )
    .and_then(|mut s| {
        s.query_map([], |r| {
            Ok(GapSummary {
                stream: r.get(0)?,
                kind: r.get(1)?,
                ranges: r.get::<_, i64>(2)? as u64,
                records: r.get::<_, i64>(3)? as u64,
            })
        })
        .and_then(|it| it.collect())
    })
    .map_err(storage("summarising gaps"))
}

pub fn kv_get(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>, LogError> {
    conn.prepare_cached("SELECT value FROM kv WHERE key = ?1")
        .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
        .map_err(storage("reading a key"))
}

/// Bytes of database pages in use (page_count - freelist_count) and the file size in pages.
pub fn page_usage(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok((
        ((pages - free).max(0) * page_size) as u64,
        (pages.max(0) * page_size) as u64,
    ))
}

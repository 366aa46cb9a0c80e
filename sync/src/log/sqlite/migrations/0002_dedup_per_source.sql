-- edge-agent local log, schema version 2: deduplication scoped per source.
--
-- Version 1 keyed the dedup window by (stream, event_id), so one device's ids could suppress
-- another device's records (two printers whose receipt numbers coincide, a lane whose counter
-- reset). A record is now a duplicate only of a record of the same stream *and* source. A record
-- without a source is stored under source '' (so "no source" is one scope of its own).
--
-- Ids and sources longer than 128 bytes are stored in this table as 'sha256:' || 64 hex digits
-- (the writer computes it), which bounds every entry in bytes.

ALTER TABLE dedup ADD COLUMN source TEXT NOT NULL DEFAULT '';

-- Existing entries take the source of their record, so a redelivery of a message stored before
-- the upgrade is still recognised. One pass over the window (at most `dedup_window` rows, each a
-- rowid lookup), once. Entries whose record is gone keep ''.
UPDATE dedup SET source = coalesce(
    (SELECT r.source FROM records r WHERE r.id = (dedup.stream_id << 44) | dedup.seq),
    '');

DROP INDEX dedup_by_event;
CREATE UNIQUE INDEX dedup_by_event ON dedup (stream_id, source, event_id);

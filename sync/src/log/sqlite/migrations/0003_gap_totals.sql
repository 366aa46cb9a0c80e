-- edge-agent local log, schema version 3: reported gaps are pruned, their counts are kept.
--
-- A gap marker stays in `gaps` until the uplink has reported it to HQ (`edge.gaps`); then it is
-- deleted, so the table does not grow with every eviction for the life of the store. What
-- status shows ("gaps recorded") is the sum of the markers still here and these totals.
-- `kind` is the reason's text before its first ':' (e.g. 'evicted', 'corrupt').

CREATE TABLE gap_totals (
    stream_id INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    ranges    INTEGER NOT NULL,
    records   INTEGER NOT NULL,
    PRIMARY KEY (stream_id, kind)
) WITHOUT ROWID;

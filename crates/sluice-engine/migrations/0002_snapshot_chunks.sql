-- Owner: the snapshot (sluice-postgres snapshot.rs, chunks.rs). One row per key range
-- of a table, marked done in the transaction that holds its rows; the stream skips
-- what a chunk copied after a change already holds.
CREATE TABLE IF NOT EXISTS sluice.snapshot_chunks (
    pipeline text NOT NULL,
    table_name text NOT NULL,
    chunk int4 NOT NULL,
    lo int8,
    hi int8,
    done bool NOT NULL DEFAULT false,
    snapshot_lsn pg_lsn,
    rows int8,
    PRIMARY KEY (pipeline, table_name, chunk)
);

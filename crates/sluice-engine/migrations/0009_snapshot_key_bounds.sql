-- Owner: the snapshot (sluice-postgres snapshot.rs, chunks.rs). Tables whose key is not
-- a single integer column (uuid, text, composite keys) are split into key ranges too,
-- at boundaries sampled from the table: each bound is the key's columns as text, in
-- key order (NULL: open). `lo`/`hi` stay the integer keys' bounds.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'sluice' AND table_name = 'snapshot_chunks' AND column_name = 'lo_key') THEN
        ALTER TABLE sluice.snapshot_chunks ADD COLUMN lo_key text[], ADD COLUMN hi_key text[];
    END IF;
END $$;

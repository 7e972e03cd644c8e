-- Owner: resync (resync.rs). The rows a limited resync (a re-enrichment) reads again,
-- as data: {"columns": [...], "rows": [[text, ...], ...]}, bound as parameters of the
-- read on the source. The older `filter` column held SQL text and is no longer read (a
-- request that still has only a filter reads its whole table, a superset).
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'sluice' AND table_name = 'resyncs' AND column_name = 'keys') THEN
        ALTER TABLE sluice.resyncs ADD COLUMN keys jsonb;
    END IF;
END $$;

-- Owner: resync (resync.rs). A request to re-read tables while streaming, and how far
-- each table got.
CREATE TABLE IF NOT EXISTS sluice.resyncs (
    pipeline text NOT NULL,
    id int8 NOT NULL,
    table_name text NOT NULL,
    last_key text[],
    chunks int4 NOT NULL DEFAULT 0,
    rows int8 NOT NULL DEFAULT 0,
    deleted int8 NOT NULL DEFAULT 0,
    done bool NOT NULL DEFAULT false,
    requested_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    -- A resync limited to some rows (a re-enrichment), and why it was asked for.
    filter text,
    reason text,
    PRIMARY KEY (pipeline, id, table_name)
);
-- Tables from before those columns. Checked first: ALTER TABLE needs the table's
-- owner even when there is nothing to add, and pipelines may run as other roles.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'sluice' AND table_name = 'resyncs' AND column_name = 'filter') THEN
        ALTER TABLE sluice.resyncs ADD COLUMN filter text, ADD COLUMN reason text;
    END IF;
END $$;

-- Owner: the runner (pipeline/). What a sink has durably applied: the Postgres sink
-- moves its row in the same transaction as the rows it writes (exactly once).
CREATE TABLE IF NOT EXISTS sluice.pipelines (
    pipeline text PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL DEFAULT '0/0',
    end_lsn pg_lsn NOT NULL DEFAULT '0/0',
    applied_txns int8 NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Owner: slot recovery (recover.rs). A request to replace a pipeline's lost replication
-- slot; its resync (every table read again) is recorded in sluice.resyncs under `id`.
CREATE TABLE IF NOT EXISTS sluice.slot_recoveries (
    pipeline text PRIMARY KEY,
    id int8 NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);

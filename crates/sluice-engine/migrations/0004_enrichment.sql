-- Owner: enrichment (enrich/state.rs). Rows whose lookup failed (delivered without the
-- enrichment, or held back), and each enricher's settings, to notice a change.
CREATE TABLE IF NOT EXISTS sluice.enrich_failures (
    pipeline text NOT NULL,
    enricher text NOT NULL,
    table_name text NOT NULL,
    key text[] NOT NULL,
    delivered bool NOT NULL,
    replay bool NOT NULL,
    reason text NOT NULL,
    attempts int4 NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, enricher, table_name, key)
);
CREATE TABLE IF NOT EXISTS sluice.enrich_versions (
    pipeline text NOT NULL,
    enricher text NOT NULL,
    fingerprint text NOT NULL,
    PRIMARY KEY (pipeline, enricher)
);

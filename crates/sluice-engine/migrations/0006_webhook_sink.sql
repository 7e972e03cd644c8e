-- Owner: the webhook sink (crates/sinks/webhook). Events the endpoint refused, or that
-- kept failing after the retries.
CREATE TABLE IF NOT EXISTS sluice.webhook_dead_letters (
    id bigserial PRIMARY KEY,
    pipeline text NOT NULL,
    event_id text NOT NULL,
    table_name text NOT NULL,
    event_key text NOT NULL,
    status int,
    reason text NOT NULL,
    event text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

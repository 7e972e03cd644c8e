-- Owner: the search sink (crates/sinks/search). How far its own initial load got, and
-- documents the cluster refused.
CREATE TABLE IF NOT EXISTS sluice.search_loads (
    pipeline text NOT NULL,
    index_name text NOT NULL,
    last_key text,
    done boolean NOT NULL DEFAULT false,
    PRIMARY KEY (pipeline, index_name)
);
CREATE TABLE IF NOT EXISTS sluice.search_dead_letters (
    id bigserial PRIMARY KEY,
    pipeline text NOT NULL,
    index_name text NOT NULL,
    doc_id text NOT NULL,
    version bigint NOT NULL,
    status int NOT NULL,
    reason text NOT NULL,
    document text,
    created_at timestamptz NOT NULL DEFAULT now()
);

/// mimalloc rather than glibc's malloc: the search service's writer and tantivy's
/// indexing thread allocate on one thread and free on another, and glibc's arena locks
/// and `malloc_consolidate` took about half of the service's time (perf, initial load).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use sluice::config::PipelineConfig;
use sluice::metrics::Metrics;
use sluice::pipeline::Pipeline;
use sluice::sinks::SinkConfig;
use sluice_sink_iceberg::Maintenance;
use tokio::sync::watch;

/// Sluice moves data out of Postgres as it changes: a consistent snapshot, then every
/// committed change, applied exactly once to the sink, surviving crashes and restarts.
#[derive(Parser)]
#[command(name = "sluice", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (e.g. `info`, `sluice=debug`); also read from RUST_LOG.
    #[arg(long, global = true, default_value = "info", env = "RUST_LOG")]
    log: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until SIGINT/SIGTERM: snapshot the tables, then stream changes.
    ///
    /// Example config (pipeline.yaml):
    ///
    ///   pipeline: orders
    ///   source: {host: db1, user: repl, password: ..., database: shop, tables: [public.orders]}
    ///   sink: {postgres: {host: db2, user: app, password: ..., database: shop_copy}}
    ///
    /// Sluice creates the publication and slot (sluice_<pipeline>) and the target tables
    /// if missing. Stopping (Ctrl-C) flushes and confirms what was applied, then exits 0;
    /// a restart resumes where it stopped, with nothing lost and nothing applied twice.
    Run {
        /// The pipeline's YAML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        #[command(flatten)]
        dogstatsd: DogStatsdArgs,
        /// Log lines as text or JSON.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Read tables of a running pipeline again from the source, and bring the sink back
    /// in line with them, while the pipeline keeps streaming every table.
    ///
    /// The request is recorded in the pipeline's state database; the running pipeline
    /// (`sluice run` with the same config) reads each table in key order, chunk by
    /// chunk, between watermarks in its own stream, so no change is lost or undone.
    /// A Postgres sink without transforms also loses the rows the source no longer has.
    /// Progress survives restarts. Example:
    ///
    ///   sluice resync -c pipeline.yaml --table public.orders
    Resync {
        #[arg(long, short)]
        config: PathBuf,
        /// A table to read again (schema.table; repeat for more). Default: all of them.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Return once the request is recorded, without waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Bring back a pipeline whose replication slot the source invalidated (it held
    /// more WAL than max_slot_wal_keep_size; the pipeline halted saying so).
    ///
    /// The changes since the sink's position are gone from the source, so the running
    /// pipeline replaces the slot and reads every table again between watermarks in
    /// its new stream (as `sluice resync` does): the sink keeps serving its rows
    /// meanwhile, and a Postgres sink without transforms also loses the rows deleted
    /// while the slot was lost. Set source.on_slot_lost: resync to do this by itself.
    ///
    ///   sluice recover -c pipeline.yaml
    Recover {
        #[arg(long, short)]
        config: PathBuf,
        /// Return once the request is recorded, without waiting for the resync.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Check a config and both databases (or, for a mirror, both Kafka clusters)
    /// without changing anything.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The main HTTP server: the control plane under /v1/tenants (with
    /// --control-database), migration checks (POST /v1/migrations/check), the schema
    /// registry under /registry, the search service under /search (with --search-data),
    /// OpenAPI at /openapi.json.
    Server {
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Read-only connection string of the database whose catalog gives migration
        /// checks their context (which tables are published, columns, keys).
        #[arg(long, env = "SLUICE_SOURCE", hide_env_values = true)]
        source: Option<String>,
        /// Postgres connection string for the schema registry's storage; without it
        /// the registry routes are not served.
        #[arg(long, env = "SLUICE_REGISTRY_DATABASE", hide_env_values = true)]
        registry_database: Option<String>,
        /// Directory of the built-in search service's indices: serves its
        /// Elasticsearch API under /search (clients: url prefix /search).
        #[arg(long, env = "SLUICE_SEARCH_DATA")]
        search_data: Option<PathBuf>,
        /// The control database (Postgres connection string): turns on the control plane
        /// (tenants, tokens, sources, sinks, pipelines under /v1, durable workflows) and
        /// runs this server's share of the pipelines. Needs SLUICE_MASTER_KEY (64 hex
        /// characters: `openssl rand -hex 32`), which seals database passwords at rest.
        /// Every server sharing a control database needs the same key.
        #[arg(long, env = "SLUICE_CONTROL_DATABASE", hide_env_values = true)]
        control_database: Option<String>,
        /// This server's name in pipeline and workflow leases: unique among the servers
        /// sharing a control database, the same across restarts (a restarted server takes
        /// its own leases back at once). Default: HOSTNAME:PORT.
        #[arg(long, env = "SLUICE_SERVER_ID")]
        server_id: Option<String>,
        /// How long a lease lasts unrenewed: a dead server's pipelines move to the others
        /// after at most this long (renewed every 2s).
        #[arg(long, default_value = "15s", value_parser = humantime_parse)]
        lease: std::time::Duration,
        #[command(flatten)]
        dogstatsd: DogStatsdArgs,
        /// Serve HTTPS with this certificate chain (PEM); with --tls-key.
        #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP on an address other machines can reach (behind a proxy that
        /// terminates TLS). Without it, plain HTTP is served on loopback addresses only.
        #[arg(long, conflicts_with = "tls_cert")]
        plain_http: bool,
        /// Address ranges tenants may name in sources, sinks, enrichers and mirrors
        /// besides public addresses: loopback, private, link-local (cloud metadata
        /// lives there) and CIDRs, comma-separated. Default: none of them.
        #[arg(long, env = "SLUICE_ALLOW_EGRESS", default_value = "")]
        allow_egress: String,
        /// Indices each tenant may hold in the built-in search service (with the control
        /// plane on); the service holds 1000 at most in all.
        #[arg(long, env = "SLUICE_SEARCH_MAX_INDICES_PER_TENANT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        search_max_indices_per_tenant: u32,
        /// Pipelines each tenant may hold (each takes a replication slot on its source
        /// and a share of the servers' cores).
        #[arg(long, env = "SLUICE_MAX_PIPELINES_PER_TENANT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        max_pipelines_per_tenant: u32,
        /// Mirrors each tenant may hold.
        #[arg(long, env = "SLUICE_MAX_MIRRORS_PER_TENANT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        max_mirrors_per_tenant: u32,
    },
    /// Maintenance of the Iceberg tables of a pipeline whose sink is `iceberg:` (the sink
    /// also runs it on its own schedule: sink.iceberg.maintenance). Safe while the
    /// pipeline runs: the slow part runs beside it, and each result is committed on top
    /// of whatever the pipeline committed meanwhile.
    ///
    ///   sluice iceberg compact -c pipeline.yaml
    ///   sluice iceberg expire -c pipeline.yaml --older-than 1h
    #[command(subcommand)]
    Iceberg(IcebergCommand),
    /// Kafka to Kafka mirroring, exactly once, with exact consumer-offset translation.
    ///
    /// A mirror's config has a Kafka source and a Kafka sink (another cluster):
    ///
    ///   pipeline: orders_to_b
    ///   source: {kafka: {cluster: a, brokers: "a1:9092", topics_regex: "orders.*"}}
    ///   sink: {kafka: {cluster: b, brokers: "b1:9092"}}
    ///
    /// Records keep their key, value, headers, timestamp and partition, in topics named
    /// a.<topic> on the target (sink.kafka.topic_naming: identity keeps the name).
    ///
    ///   sluice mirror run -c mirror.yaml        (sluice run -c mirror.yaml does the same)
    ///   sluice mirror offsets my-group -c mirror.yaml
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Create the first platform-admin API token in a control database (prints it once;
    /// refuses when a platform admin token exists).
    Bootstrap {
        #[arg(long, env = "SLUICE_CONTROL_DATABASE", hide_env_values = true)]
        control_database: String,
    },
    /// The master key that seals the control plane's stored secrets.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Tenants: a team's space for sources, sinks, pipelines and tokens.
    Tenants {
        #[command(flatten)]
        conn: sluice::client::Connection,
        #[command(subcommand)]
        cmd: sluice::client::Tenants,
    },
    /// API tokens of a tenant (roles tenant_admin, tenant_viewer).
    Tokens {
        #[command(flatten)]
        conn: sluice::client::Connection,
        #[command(subcommand)]
        cmd: sluice::client::Tokens,
    },
    /// Source databases (Postgres) of a tenant.
    Sources {
        #[command(flatten)]
        conn: sluice::client::Connection,
        #[command(subcommand)]
        cmd: sluice::client::Resource,
    },
    /// Sinks (postgres, kafka, search) of a tenant.
    Sinks {
        #[command(flatten)]
        conn: sluice::client::Connection,
        #[command(subcommand)]
        cmd: sluice::client::Resource,
    },
    /// Enrichers of a tenant (lookup, http, expression), referenced by pipelines by name.
    Enrichers {
        #[command(flatten)]
        conn: sluice::client::Connection,
        #[command(subcommand)]
        cmd: sluice::client::Resource,
    },
    /// Pipelines of a tenant, provisioned and run by the servers.
    Pipelines {
        #[command(flatten)]
        conn: sluice::client::Connection,
        #[command(subcommand)]
        cmd: sluice::client::Pipelines,
    },
    /// Kafka-to-Kafka mirrors of a tenant, run by the servers (`sluice mirror` runs a
    /// mirror file locally).
    Mirrors {
        #[command(flatten)]
        conn: sluice::client::Connection,
        #[command(subcommand)]
        cmd: sluice::client::Mirrors,
    },
    /// Provisioning, teardown, pause and resume workflows, with their step history.
    Workflows {
        #[command(flatten)]
        conn: sluice::client::Connection,
        #[command(subcommand)]
        cmd: sluice::client::Workflows,
    },
    /// The built-in Confluent-compatible schema registry.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// The built-in Elasticsearch-compatible search service.
    #[command(subcommand)]
    Search(SearchCommand),
    /// Vet schema migrations before they run.
    #[command(subcommand)]
    Migrations(MigrationsCommand),
    /// Start two throwaway Postgres servers, load sample data, and replicate it live
    /// from one to the other while printing progress and lag.
    Demo {
        /// How long to keep writing changes.
        #[arg(long, default_value = "20s", value_parser = humantime_parse)]
        duration: std::time::Duration,
        /// Changes per second to write during the demo.
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Rows in the sample table before replication starts (the snapshot).
        #[arg(long, default_value_t = 200_000)]
        rows: u32,
    },
}

#[derive(Subcommand)]
enum MirrorCommand {
    /// Copy the source's topics to the target until SIGINT/SIGTERM. Each batch is one
    /// transaction on the target holding the records and the source positions they
    /// came from, so a crash neither loses nor duplicates a record for read_committed
    /// readers; source consumer groups' offsets are translated and written to the
    /// target every offsets.interval (for groups with no members there).
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Serve Prometheus metrics on this address (records copied, lag per partition
        /// in records and ms, restarts).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show where a source consumer group's committed offsets land on the target: the
    /// offset from which it reads exactly the records it had not read on the source.
    Offsets {
        /// The consumer group's id.
        group: String,
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-seal every stored secret (source and sink credentials, role passwords,
    /// webhook URLs) under the current master key, in one transaction.
    ///
    /// Rotating the master key:
    ///
    ///   1. new=$(openssl rand -hex 32)
    ///   2. restart every server with SLUICE_MASTER_KEY=$new and
    ///      SLUICE_MASTER_KEY_PREVIOUS=<old key> (they open both, seal with the new)
    ///   3. SLUICE_MASTER_KEY=$new SLUICE_MASTER_KEY_PREVIOUS=<old> sluice keys rotate
    ///   4. restart the servers without SLUICE_MASTER_KEY_PREVIOUS
    Rotate {
        #[arg(long, env = "SLUICE_CONTROL_DATABASE", hide_env_values = true)]
        control_database: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum IcebergCommand {
    /// Rewrite each table's live rows into new data files with the equality deletes
    /// applied, so readers that cannot apply deletes (pyiceberg 0.12) read it whole,
    /// and scans open a few files instead of two per commit.
    Compact {
        #[arg(long, short)]
        config: PathBuf,
        /// A source table whose Iceberg table to compact (schema.table; repeat for
        /// more). Default: all of the pipeline's.
        #[arg(long = "table")]
        tables: Vec<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Expire snapshots older than --older-than (the current one, and the newest --keep,
    /// stay), delete the files only they referenced, and remove orphan files (written by
    /// commits that never landed) older than --orphans-older-than.
    Expire {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long = "table")]
        tables: Vec<String>,
        #[arg(long, default_value = "1h", value_parser = humantime_parse)]
        older_than: std::time::Duration,
        #[arg(long, default_value_t = 1)]
        keep: usize,
        /// Younger unreferenced files may belong to a commit in flight: keep this above
        /// the sink's commit_interval.
        #[arg(long, default_value = "1h", value_parser = humantime_parse)]
        orphans_older_than: std::time::Duration,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Serve the Confluent Schema Registry REST API (Avro), stored in a Postgres database.
    ///
    /// Existing serializers and tools work unchanged: point them at http://ADDR. Each
    /// tenant gets its own context: subjects named `:.tenant:subject` have their own
    /// ids, versions and compatibility settings. Default compatibility: BACKWARD.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        addr: std::net::SocketAddr,
        /// Postgres connection string for the registry's storage (tables in schema
        /// `sluice_registry`, created if missing). Prefer SLUICE_REGISTRY_DATABASE to
        /// keep the password out of the process list.
        #[arg(long, env = "SLUICE_REGISTRY_DATABASE", hide_env_values = true)]
        database: String,
    },
}

#[derive(Subcommand)]
enum SearchCommand {
    /// Serve an Elasticsearch-compatible HTTP API (indices, mappings, _bulk, _doc,
    /// _search with bool/term/match/range/nested queries, sorting, aggregations).
    ///
    /// Existing clients work unchanged (opensearch-py, elasticsearch-py 7, curl): point
    /// them at http://ADDR. An acknowledged write is on disk (translog, fsync) before the
    /// answer and searchable within the index's refresh interval (default 50ms).
    Serve {
        #[arg(long, default_value = "127.0.0.1:9200")]
        addr: std::net::SocketAddr,
        /// Directory holding the indices (created if missing).
        #[arg(long)]
        data: PathBuf,
        /// Default refresh interval of new indices (`settings.index.refresh_interval`
        /// overrides it per index).
        #[arg(long, default_value = "50ms", value_parser = humantime_parse)]
        refresh_interval: std::time::Duration,
    },
    /// The Metrics Summary page on the built-in search service, fed live from Postgres.
    ///
    /// Starts a throwaway Postgres with orgs, metrics and metric configurations (at
    /// --scale 1: one org with 82,000 active metrics and 817,000 configurations), a
    /// pipeline that builds one document per metric (its org, its configurations nested,
    /// their count), and the search service; asks the page's queries of both Postgres (the
    /// join with facet counts) and the index, checks they give the same page, prints
    /// both timings, then serves the page at http://ADDR/ while changing configurations.
    Demo {
        /// Dataset size relative to the original page (0.1 = 8,200 metrics, 81,700 configurations).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Where the page is served.
        #[arg(long, default_value = "127.0.0.1:8088")]
        addr: std::net::SocketAddr,
        /// Where the search service listens (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        search_addr: std::net::SocketAddr,
        /// Configuration changes per second while serving (0: none).
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Stop after this long instead of at Ctrl-C.
        #[arg(long, value_parser = humantime_parse)]
        duration: Option<std::time::Duration>,
    },
}

#[derive(Subcommand)]
enum MigrationsCommand {
    /// Check migration SQL files: each statement is ALLOWED, a WARNING, NEEDS
    /// COORDINATION or BLOCKED, with the reason and the safe alternative.
    ///
    /// Without --source every table counts as replicated. With --source (a read-only
    /// connection string), Sluice reads which tables are published, their columns and
    /// keys, and checks each statement against the schema as the earlier statements
    /// left it. Acknowledge an intended breaking change in the file with
    /// `-- sluice:allow <rule-id> <reason>` before the statement.
    ///
    /// Exit codes: 0 allowed (warnings included), 1 blocked or needs coordination, 2 error.
    Check {
        /// SQL files; `-` reads standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Source database for catalog context, e.g. "host=db user=ro dbname=app"
        /// (SLUICE_SOURCE keeps a password out of the process list).
        #[arg(long, env = "SLUICE_SOURCE", hide_env_values = true)]
        source: Option<String>,
        /// Only this pipeline's tables count as replicated (its publication sluice_<name>).
        #[arg(long)]
        pipeline: Option<String>,
        /// Schema registry URL (http): each changed table's new Avro value schema is
        /// checked against subject `<pipeline>.<schema>.<table>-value` under that
        /// subject's compatibility mode. Needs --source and --pipeline.
        #[arg(long, requires_all = ["source", "pipeline"])]
        registry: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: Output,
    },
}

fn humantime_parse(s: &str) -> Result<std::time::Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn init_logs(filter: &str, json: bool) {
    // Server NOTICEs ("already exists, skipping") are noise at info.
    let filter = format!("tokio_postgres=warn,{filter}");
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(ansi);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: flushing and confirming what was applied");
        let _ = tx.send(true);
    });
    rx
}

async fn open_registry(dsn: &str) -> anyhow::Result<Arc<sluice_registry::Store>> {
    let cfg = sluice_postgres::parse_dsn(dsn).map_err(|e| anyhow::anyhow!("the registry database: {e}: check its connection string"))?;
    let store = sluice_registry::Store::open(cfg).await.map_err(anyhow::Error::msg)?;
    Ok(Arc::new(store))
}

/// Serves `app` on `addr` until SIGINT/SIGTERM.
async fn serve(addr: std::net::SocketAddr, app: axum::Router, what: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on --addr {addr}: {e}"))?;
    serve_on(listener, app, what, shutdown_signal()).await
}

async fn serve_on<L>(listener: L, app: axum::Router, what: &str, mut stop: watch::Receiver<bool>) -> anyhow::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    tracing::info!(addr = %listener.local_addr()?, "{what} listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await?;
    Ok(())
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, output, metrics_addr, .. } if sluice::mirror::is_mirror(&config) => {
            init_logs(&cli.log, output == Output::Json);
            sluice::mirror::run(sluice::mirror::load(&config)?, metrics_addr, shutdown_signal()).await
        }
        Command::Mirror(MirrorCommand::Run { config, metrics_addr, output }) => {
            init_logs(&cli.log, output == Output::Json);
            sluice::mirror::run(sluice::mirror::load(&config)?, metrics_addr, shutdown_signal()).await
        }
        Command::Mirror(MirrorCommand::Offsets { group, config, output }) => {
            init_logs("warn", false);
            sluice::mirror::offsets(sluice::mirror::load(&config)?, group, output == Output::Json).await
        }
        Command::Run { config, metrics_addr, dogstatsd, output } => {
            init_logs(&cli.log, output == Output::Json);
            let cfg = PipelineConfig::load(&config)?;
            let metrics = Arc::new(Metrics::default());
            if let Some(addr) = metrics_addr {
                sluice::metrics::serve(addr, cfg.pipeline.clone(), metrics.clone()).await?;
            }
            spawn_signals(&cfg, metrics.clone(), dogstatsd.connect()?);
            let mut p = Pipeline::new(cfg, metrics, shutdown_signal());
            p.progress_bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
            p.recover_hint = format!("sluice recover -c {}", config.display());
            p.run().await
        }
        Command::Resync { config, tables, no_wait, output } => {
            init_logs("warn", false);
            let cfg = PipelineConfig::load(&config)?;
            let tables = cfg.pick_tables(&tables).map_err(anyhow::Error::msg)?;
            let source = cfg.source.connection();
            let src = sluice_postgres::connect(&source, "source").await?;
            sluice::resync::check_keys(&src, &tables, &source.describe()).await.map_err(anyhow::Error::msg)?;
            let state = sluice_postgres::connect(&cfg.state_connection(), "state database").await?;
            let id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            sluice::resync::request(&state, &cfg.pipeline, id, &tables).await?;
            if output == Output::Text {
                eprintln!("resync {id} of {} table(s) requested; pipeline {} must be running to take it", tables.len(), cfg.pipeline);
            }
            wait_for_resync(&state, &cfg.pipeline, id, no_wait, output).await
        }
        Command::Recover { config, no_wait, output } => {
            init_logs("warn", false);
            let cfg = PipelineConfig::load(&config)?;
            let source = cfg.source.connection();
            let src = sluice_postgres::connect(&source, "source").await?;
            let slot = cfg.slot_name();
            if let Some(why) = sluice_postgres::recover_refusal(&slot, sluice_postgres::slot_info(&src, &slot).await?.as_ref()) {
                anyhow::bail!("{why}; to read tables again, run sluice resync -c {}", config.display());
            }
            let tables = cfg.tables();
            sluice::resync::check_keys(&src, &tables, &source.describe()).await.map_err(anyhow::Error::msg)?;
            let state = sluice_postgres::connect(&cfg.state_connection(), "state database").await?;
            let id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            let id = sluice::recover::request(&state, &cfg.pipeline, id, &tables).await?;
            if output == Output::Text {
                eprintln!(
                    "recovery {id} requested: pipeline {} replaces slot {slot} and reads {} table(s) again when it runs (sluice run -c {})",
                    cfg.pipeline,
                    tables.len(),
                    config.display()
                );
            }
            wait_for_resync(&state, &cfg.pipeline, id, no_wait, output).await
        }
        Command::Check { config, output } if sluice::mirror::is_mirror(&config) => {
            init_logs("warn", false);
            sluice::mirror::check(sluice::mirror::load(&config)?, output == Output::Json).await
        }
        Command::Check { config, output } => {
            init_logs("warn", false);
            let cfg = PipelineConfig::load(&config)?;
            let (_tx, rx) = watch::channel(false);
            let p = Pipeline::new(cfg.clone(), Arc::new(Metrics::default()), rx);
            let checked = p.check().await?;
            let tables: Vec<String> = checked.tables.iter().map(|t| t.name.to_string()).collect();
            if output == Output::Json {
                let v = serde_json::json!({
                    "ok": true,
                    "pipeline": cfg.pipeline,
                    "tables": tables,
                    "slot": cfg.slot_name(),
                    "slot_exists": checked.slot_exists,
                    "slot_lost": checked.slot_lost,
                    "publication": cfg.publication_name(),
                    "publication_exists": checked.publication_exists,
                });
                println!("{v}");
            } else {
                println!("ok: pipeline {} can replicate {} table(s): {}", cfg.pipeline, tables.len(), tables.join(", "));
                let slot = match (checked.slot_exists, checked.slot_lost) {
                    (_, true) => format!("was invalidated by the source (wal_status lost): run sluice recover -c {}", config.display()),
                    (true, false) => "exists".into(),
                    (false, false) => "will be created".into(),
                };
                println!("slot {} {slot}", cfg.slot_name());
            }
            Ok(())
        }
        Command::Iceberg(cmd) => {
            init_logs("warn", false);
            let (config, tables, output, what) = match cmd {
                IcebergCommand::Compact { config, tables, output } => {
                    (config, tables, output, Maintenance { compact: true, expire_older_than: None, keep: 1, orphans_older_than: None })
                }
                IcebergCommand::Expire { config, tables, older_than, keep, orphans_older_than, output } => (
                    config,
                    tables,
                    output,
                    Maintenance { compact: false, expire_older_than: Some(older_than), keep, orphans_older_than: Some(orphans_older_than) },
                ),
            };
            let cfg = PipelineConfig::load(&config)?;
            let SinkConfig::Iceberg(sink) = &cfg.sink else {
                anyhow::bail!("sluice iceberg: the sink of pipeline {} is {}, not iceberg", cfg.pipeline, cfg.sink.get().kind());
            };
            let tables = cfg.pick_tables(&tables).map_err(anyhow::Error::msg)?;
            let reports = sluice_sink_iceberg::maintain(sink, &cfg.pipeline, &tables, &what).await?;
            for r in &reports {
                if output == Output::Json {
                    println!("{}", serde_json::to_string(r)?);
                } else if what.compact {
                    println!(
                        "{}: {} rows in {} data and {} delete files rewritten into {} data files{} ({} ms)",
                        r.table,
                        r.rows,
                        r.data_files_before,
                        r.delete_files_before,
                        r.data_files_after,
                        if r.compaction_dropped { ", then dropped: the table was truncated meanwhile" } else { "" },
                        r.ms
                    );
                } else {
                    println!("{}: {} snapshots expired, {} files removed ({} ms)", r.table, r.snapshots_expired, r.files_removed, r.ms);
                }
            }
            Ok(())
        }
        Command::Migrations(_) => unreachable!("handled in main"),
        Command::Registry(RegistryCommand::Serve { addr, database }) => {
            init_logs(&cli.log, false);
            let store = open_registry(&database).await?;
            serve(addr, sluice_registry::router(store), "schema registry").await
        }
        Command::Search(SearchCommand::Serve { addr, data, refresh_interval }) => {
            init_logs(&cli.log, false);
            let api = sluice_search::open_api(&data, refresh_interval, None)
                .map_err(|e| anyhow::anyhow!("cannot open the search data directory {}: {e}", data.display()))?;
            serve(addr, api, "search service").await
        }
        Command::Search(SearchCommand::Demo { scale, addr, search_addr, rate, duration }) => {
            init_logs(&cli.log.replace("info", "warn"), false);
            let o = sluice::search_demo::DemoOptions { scale, addr, search_addr, rate, duration };
            sluice::search_demo::run(o, shutdown_signal()).await
        }
        Command::Server {
            addr,
            source,
            registry_database,
            search_data,
            control_database,
            server_id,
            lease,
            dogstatsd,
            tls_cert,
            tls_key,
            plain_http,
            allow_egress,
            search_max_indices_per_tenant,
            max_pipelines_per_tenant,
            max_mirrors_per_tenant,
        } => {
            init_logs(&cli.log, false);
            let tls = match (&tls_cert, &tls_key) {
                (Some(cert), Some(key)) => Some(sluice::https::server_config(cert, key)?),
                _ if addr.ip().is_loopback() || plain_http => None,
                _ => anyhow::bail!(
                    "--addr {addr} is reachable from other machines: give --tls-cert and --tls-key, or --plain-http behind a proxy that terminates TLS"
                ),
            };
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on --addr {addr}: {e}"))?;
            let addr = listener.local_addr()?;
            let stop = shutdown_signal();
            let control = match &control_database {
                Some(dsn) => {
                    let sealer = master_key()?;
                    let db = sluice::control::db::Db::new(dsn).map_err(anyhow::Error::msg)?;
                    db.migrate().await.map_err(|e| anyhow::anyhow!("control database: {e:#}: check --control-database"))?;
                    let id = server_id.unwrap_or_else(|| {
                        let host =
                            std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
                        format!("{host}:{}", addr.port())
                    });
                    tracing::info!(server_id = %id, "control plane on");
                    let ctl = sluice::control::Control::new(db, sealer, id, lease).await?;
                    ctl.set_egress(sluice::control::egress::Egress::parse(&allow_egress).map_err(anyhow::Error::msg)?);
                    ctl.set_quotas(sluice::control::api::Quotas {
                        pipelines: max_pipelines_per_tenant as usize,
                        mirrors: max_mirrors_per_tenant as usize,
                    });
                    if let Some(d) = dogstatsd.connect()? {
                        ctl.set_dogstatsd(d);
                    }
                    Some(ctl)
                }
                None => None,
            };
            let loops = control.as_ref().map(|c| c.spawn_loops(stop.clone())).unwrap_or_default();
            let registry = match &registry_database {
                Some(dsn) => Some(open_registry(dsn).await?),
                None => None,
            };
            let search = match &search_data {
                Some(data) => Some(
                    // Tenants share the service only behind the control plane's tokens.
                    sluice_search::open_api(
                        data,
                        sluice_search::DEFAULT_REFRESH,
                        control.is_some().then_some(search_max_indices_per_tenant as usize),
                    )
                    .map_err(|e| anyhow::anyhow!("cannot open the search data directory {} (--search-data): {e}", data.display()))?,
                ),
                None => None,
            };
            let app = sluice::server::router(sluice::server::ServerConfig::new(source), registry, search, control);
            match tls {
                Some(config) => serve_on(sluice::https::TlsListener::new(listener, config)?, app, "server (HTTPS)", stop).await?,
                None => serve_on(listener, app, "server", stop).await?,
            }
            // The supervisor stops this server's pipelines and hands their leases back.
            for l in loops {
                let _ = l.await;
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Rotate { control_database, output }) => {
            init_logs("warn", false);
            let sealer = master_key()?;
            let db = sluice::control::db::Db::new(&control_database).map_err(anyhow::Error::msg)?;
            db.migrate().await.map_err(|e| anyhow::anyhow!("control database: {e:#}: check --control-database"))?;
            let r = sluice::control::keys::rotate(&db, &sealer).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&r)?),
                Output::Text => {
                    for t in &r.tables {
                        println!("{:<16} {:>6} re-sealed {:>6} already under the current key", t.table, t.resealed, t.already_current);
                    }
                    println!("every stored secret is sealed under key {}: SLUICE_MASTER_KEY_PREVIOUS can be removed", r.key_id);
                }
            }
            Ok(())
        }
        Command::Bootstrap { control_database } => {
            init_logs("warn", false);
            let db = sluice::control::db::Db::new(&control_database).map_err(anyhow::Error::msg)?;
            db.migrate().await.map_err(|e| anyhow::anyhow!("control database: {e:#}: check --control-database"))?;
            // The sealer is not needed to create a token.
            let sealer = sluice::control::crypto::Sealer::from_hex(&"00".repeat(32).into()).map_err(anyhow::Error::msg)?;
            let ctl = sluice::control::Control::new(db, sealer, "bootstrap".into(), std::time::Duration::from_secs(15)).await?;
            match ctl.bootstrap().await? {
                Some(token) => {
                    println!("{token}");
                    eprintln!("platform admin token created: shown once, store it now (SLUICE_TOKEN)");
                    Ok(())
                }
                None => anyhow::bail!("a platform admin token already exists in this control database: use it to create others"),
            }
        }
        Command::Tenants { conn, cmd } => sluice::client::run(&conn, sluice::client::Command::Tenants(cmd)),
        Command::Tokens { conn, cmd } => sluice::client::run(&conn, sluice::client::Command::Tokens(cmd)),
        Command::Sources { conn, cmd } => sluice::client::run(&conn, sluice::client::Command::Sources(cmd)),
        Command::Sinks { conn, cmd } => sluice::client::run(&conn, sluice::client::Command::Sinks(cmd)),
        Command::Enrichers { conn, cmd } => sluice::client::run(&conn, sluice::client::Command::Enrichers(cmd)),
        Command::Pipelines { conn, cmd } => sluice::client::run(&conn, sluice::client::Command::Pipelines(cmd)),
        Command::Mirrors { conn, cmd } => sluice::client::run(&conn, sluice::client::Command::Mirrors(cmd)),
        Command::Workflows { conn, cmd } => sluice::client::run(&conn, sluice::client::Command::Workflows(cmd)),
        Command::Demo { duration, rate, rows } => {
            init_logs(&cli.log.replace("info", "warn"), false);
            sluice::demo::run(duration, rate, rows, shutdown_signal()).await
        }
    }
}

/// `migrations check`: exit 0 allowed, 1 blocked or needs coordination, 2 error.
async fn migrations_check(
    files: Vec<PathBuf>,
    source: Option<String>,
    pipeline: Option<String>,
    registry: Option<String>,
    format: Output,
) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let base = match &source {
        Some(dsn) => match sluice::migrations::load_model(dsn, pipeline.as_deref()).await {
            Ok(m) => m,
            Err(e) => return fail(&e),
        },
        None => sluice_ddl::Model::default(),
    };
    let mut inputs = Vec::new();
    for f in &files {
        if f.as_os_str() == "-" {
            let mut s = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
                return fail(&format!("cannot read standard input: {e}"));
            }
            inputs.push(("-".to_string(), s));
        } else {
            match std::fs::read_to_string(f) {
                Ok(s) => inputs.push((f.display().to_string(), s)),
                Err(e) => return fail(&format!("cannot read {}: {e}", f.display())),
            }
        }
    }
    let reg = registry.as_deref().zip(pipeline.as_deref());
    let (worst, reports) = match sluice::migrations::check_files(inputs, &base, reg).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if format == Output::Json {
        println!("{}", serde_json::json!({ "verdict": worst, "context": source.is_some(), "files": reports }));
    } else {
        print!("{}", sluice_ddl::render_text(&reports));
    }
    if worst >= sluice_ddl::Verdict::NeedsCoordination { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Command::Migrations(MigrationsCommand::Check { files, source, pipeline, registry, format }) = cli.command {
        return rt.block_on(migrations_check(files, source, pipeline, registry, format));
    }
    match rt.block_on(real_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the outermost message already names the thing and the fix.
            eprintln!("error: {e}");
            if std::env::var_os("SLUICE_ERROR_CHAIN").is_some() {
                for cause in e.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// Where to push DogStatsD metrics (a Datadog agent), beside Prometheus.
#[derive(clap::Args)]
struct DogStatsdArgs {
    /// Send metrics to this DogStatsD agent (host:port, UDP; usually 127.0.0.1:8125),
    /// tagged pipeline, sink, tenant (server) and table.
    #[arg(long, env = "SLUICE_DOGSTATSD")]
    dogstatsd: Option<String>,
    /// How often to send them.
    #[arg(long, env = "SLUICE_DOGSTATSD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    dogstatsd_interval: std::time::Duration,
}

impl DogStatsdArgs {
    fn connect(&self) -> anyhow::Result<Option<sluice::dogstatsd::DogStatsd>> {
        self.dogstatsd.as_deref().map(|a| sluice::dogstatsd::DogStatsd::connect(a, self.dogstatsd_interval)).transpose()
    }
}

/// `sluice run`'s own signals: DogStatsD metrics and the config's alert rules, on a
/// 2-second timer beside the pipeline.
fn spawn_signals(cfg: &PipelineConfig, metrics: Arc<Metrics>, mut statsd: Option<sluice::dogstatsd::DogStatsd>) {
    let alerts = cfg.alerts.clone();
    if statsd.is_none() && alerts.is_none() {
        return;
    }
    let (pipeline, sink) = (cfg.pipeline.clone(), cfg.sink.kind());
    let subject = sluice::alerts::Subject { pipeline: pipeline.clone(), tenant: None };
    let client = reqwest::Client::new();
    tokio::spawn(async move {
        let mut rules = sluice::alerts::Alerts::default();
        loop {
            if let Some(d) = statsd.as_mut()
                && d.due()
            {
                d.emit(&[("pipeline", &pipeline), ("sink", &sink)], &metrics);
            }
            if let Some(a) = &alerts {
                for n in rules.evaluate(&subject, &metrics, a) {
                    sluice::alerts::deliver(&client, &a.webhook_url, n);
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    });
}

/// Prints a resync's progress until every table is done (or at once with `no_wait`).
/// The control plane's sealer from SLUICE_MASTER_KEY (and, while a rotation is under
/// way, SLUICE_MASTER_KEY_PREVIOUS).
fn master_key() -> anyhow::Result<sluice::control::crypto::Sealer> {
    let key = std::env::var("SLUICE_MASTER_KEY").map_err(|_| {
        anyhow::anyhow!("SLUICE_MASTER_KEY: not set; the control plane seals passwords with it: set 64 hex characters (`openssl rand -hex 32`), the same on every server")
    })?;
    let previous = std::env::var("SLUICE_MASTER_KEY_PREVIOUS").ok().map(Into::into);
    sluice::control::crypto::Sealer::with_previous(&key.into(), previous.as_ref()).map_err(anyhow::Error::msg)
}

async fn wait_for_resync(state: &tokio_postgres::Client, pipeline: &str, id: i64, no_wait: bool, output: Output) -> anyhow::Result<()> {
    let mut last = String::new();
    loop {
        let p = sluice::resync::progress(state, pipeline, id).await?;
        let done = p.iter().all(|t| t.done);
        if output == Output::Text {
            let line: Vec<String> = p.iter().map(|t| format!("{} {} rows{}", t.table, t.rows, if t.done { " done" } else { "" })).collect();
            let line = line.join(", ");
            if line != last {
                eprintln!("{line}");
                last = line;
            }
        }
        if done || no_wait {
            if output == Output::Json {
                println!("{}", serde_json::json!({"id": id, "pipeline": pipeline, "done": done, "tables": p}));
            }
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

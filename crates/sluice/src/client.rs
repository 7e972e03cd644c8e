//! The `sluice` subcommands that talk to a server's control API: tenants, tokens,
//! sources, sinks, pipelines, workflows. Text tables for people, `--output json` for
//! scripts; any refusal is one line on stderr and a non-zero exit.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Where the API is and who is calling.
#[derive(Args, Clone)]
pub struct Connection {
    /// Base URL of a `sluice server` with a control database.
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// API token (`slc_...`); prefer the environment variable.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The tenant whose resources to use.
    #[arg(long, env = "SLUICE_TENANT", global = true)]
    pub tenant: Option<String>,
    /// `json` prints the API's JSON answer as one line.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub output: Format,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Tenants {
    /// List the tenants this token sees.
    List,
    /// Create a tenant (platform admins).
    Create { name: String },
    /// Show a tenant's resource counts.
    Show { name: String },
    /// Delete an empty tenant (platform admins).
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum Tokens {
    /// The tenant's tokens; with --all (a platform admin), every tenant's.
    List {
        #[arg(long)]
        all: bool,
    },
    /// Create a token; its value is printed once (only its hash is stored).
    Create {
        name: String,
        #[arg(long, value_parser = ["tenant_admin", "tenant_viewer"], default_value = "tenant_viewer")]
        role: String,
        /// How long it works (e.g. 90d, 12h); without it, until revoked.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// Revoke a token by id; with --all (a platform admin), any tenant's.
    Revoke {
        id: i64,
        #[arg(long)]
        all: bool,
    },
}

/// Sources and sinks: created from a YAML (or JSON) file.
#[derive(Subcommand)]
pub enum Resource {
    List,
    /// Create from a file: for a source `name, host, port, database, admin_user,
    /// admin_password`; for a sink `name` and one of `postgres:`, `kafka:`, `search:`.
    Create {
        #[arg(long, short)]
        file: PathBuf,
    },
    Show {
        name: String,
    },
    /// Replace from a file (same name).
    Update {
        #[arg(long, short)]
        file: PathBuf,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum Pipelines {
    List,
    /// Create from a YAML file and provision it (role, publication, slot, heartbeat,
    /// sink objects, snapshot), then it streams:
    ///
    ///   name: orders
    ///   source: main-db          # a source of this tenant
    ///   sink: replica            # a sink of this tenant
    ///   tables: [public.orders]
    ///   transforms: [...]        # optional, as in a pipeline file
    #[command(verbatim_doc_comment)]
    Create {
        #[arg(long, short)]
        file: PathBuf,
        /// Return at once instead of waiting for provisioning to finish.
        #[arg(long)]
        no_wait: bool,
    },
    /// Live status, lag and the last workflow.
    Show {
        name: String,
    },
    /// Change tables, transforms or options from a file; re-provisions.
    Update {
        #[arg(long, short)]
        file: PathBuf,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Read tables again from the source and bring the sink back in line, while the
    /// pipeline keeps streaming (a sink edited by hand, a consumer that lost data).
    /// Waits and shows progress.
    Resync {
        name: String,
        /// A table to read again (schema.table; repeat for more). Default: all of them.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Return at once instead of waiting for the resync to finish.
        #[arg(long)]
        no_wait: bool,
    },
    /// Bring back a pipeline halted because the source invalidated its replication slot
    /// (it held more WAL than max_slot_wal_keep_size): a new slot, and every table read
    /// again while the sink keeps serving its rows. Waits and shows progress.
    Recover {
        name: String,
        /// Return at once instead of waiting for the tables to be read again.
        #[arg(long)]
        no_wait: bool,
    },
    /// Tear down: stop, drop the slot, publication and role; --purge also the sink's
    /// tables or index and the pipeline's state.
    Delete {
        name: String,
        #[arg(long)]
        purge: bool,
    },
}

/// Kafka-to-Kafka mirrors run by the servers (a mirror file's keys plus `name`).
#[derive(Subcommand)]
pub enum Mirrors {
    List,
    /// Create from a YAML file; both clusters are checked first, then a server runs it:
    ///
    ///   name: orders-to-b
    ///   source:
    ///     kafka: {cluster: a, brokers: "a1:9092", topics_regex: "orders.*"}
    ///   sink:
    ///     kafka: {cluster: b, brokers: "b1:9092"}
    #[command(verbatim_doc_comment)]
    Create {
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Live status: records, batches, lag in records and ms, the server running it.
    Show {
        name: String,
    },
    /// Replace the spec from a file; the mirror restarts after its last committed batch.
    Update {
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Stop copying; a resume continues after the last committed batch.
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// How a source consumer group's committed offsets translate to the target.
    Offsets {
        name: String,
        group: String,
    },
    /// Tear down: stop, delete the offsets topic; --purge also the topics it copied into.
    Delete {
        name: String,
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Subcommand)]
pub enum Workflows {
    List {
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// A workflow's steps: each attempt with its server, times and error.
    Show {
        id: i64,
    },
    Cancel {
        id: i64,
    },
    /// Retry a failed or cancelled workflow from the step that failed.
    Retry {
        id: i64,
    },
}

pub enum Command {
    Tenants(Tenants),
    Tokens(Tokens),
    Sources(Resource),
    Sinks(Resource),
    Enrichers(Resource),
    Pipelines(Pipelines),
    Mirrors(Mirrors),
    Workflows(Workflows),
}

struct Api<'a> {
    c: &'a Connection,
    agent: ureq::Agent,
}

impl Api<'_> {
    fn tenant(&self) -> Result<String> {
        self.c.tenant.clone().context("no tenant: pass --tenant NAME or set SLUICE_TENANT")
    }

    fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Value> {
        let token = self.c.token.as_deref().context("no API token: set SLUICE_TOKEN (or pass --token)")?;
        let url = format!("{}{path}", self.c.url.trim_end_matches('/'));
        let auth = format!("Bearer {token}");
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            ("PUT", b) => {
                self.agent.put(&url).header("Authorization", &auth).header("Content-Type", "application/yaml").send(b.unwrap_or_default())
            }
            (_, b) => {
                self.agent.post(&url).header("Authorization", &auth).header("Content-Type", "application/yaml").send(b.unwrap_or_default())
            }
        };
        let mut resp = resp.map_err(|e| anyhow::anyhow!("cannot reach the Sluice API at {}: {e}: check --url / SLUICE_URL", self.c.url))?;
        let status = resp.status().as_u16();
        let v: Value = resp.body_mut().read_json().unwrap_or_else(|_| json!({}));
        if status >= 400 {
            let msg = v["error"]["message"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_string);
            bail!("{msg}");
        }
        Ok(v)
    }
}

fn read(file: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    // A malformed file is refused here, with its line, before anything is sent.
    serde_yaml::from_slice::<serde_yaml::Value>(&text).map_err(|e| anyhow::anyhow!("{}: not valid YAML: {e}", file.display()))?;
    Ok(text)
}

fn name_in(file: &Path) -> Result<String> {
    let v: serde_yaml::Value = serde_yaml::from_slice(&read(file)?)?;
    v.get("name").and_then(|n| n.as_str()).map(str::to_string).with_context(|| format!("{}: has no `name`", file.display()))
}

pub fn run(conn: &Connection, cmd: Command) -> Result<()> {
    let api = Api { c: conn, agent: ureq::Agent::config_builder().http_status_as_error(false).build().into() };
    let out = |v: &Value, text: &dyn Fn(&Value) -> String| {
        if conn.output == Format::Json {
            println!("{v}");
        } else {
            print!("{}", text(v));
        }
    };
    let list = |v: &Value, key: &str, cols: &[&str]| -> String {
        let mut s = cols.join("\t") + "\n";
        for item in v[key].as_array().into_iter().flatten() {
            let row: Vec<String> = cols
                .iter()
                .map(|c| match item.pointer(&format!("/{}", c.replace('.', "/"))) {
                    Some(Value::String(x)) => x.clone(),
                    Some(Value::Null) | None => "-".into(),
                    Some(x) => x.to_string(),
                })
                .collect();
            s += &(row.join("\t") + "\n");
        }
        s
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    match cmd {
        Command::Tenants(t) => match t {
            Tenants::List => out(&api.call("GET", "/v1/tenants", None)?, &|v| list(v, "tenants", &["name", "created_at"])),
            Tenants::Create { name } => {
                out(&api.call("POST", "/v1/tenants", Some(json!({ "name": name }).to_string().into_bytes()))?, &|_| {
                    format!("created tenant {name}\n")
                })
            }
            Tenants::Show { name } => out(&api.call("GET", &format!("/v1/tenants/{name}"), None)?, &pretty),
            Tenants::Delete { name } => {
                out(&api.call("DELETE", &format!("/v1/tenants/{name}"), None)?, &|_| format!("deleted tenant {name}\n"))
            }
        },
        Command::Tokens(t) => {
            let columns = ["id", "tenant", "name", "role", "created_at", "expires_at"];
            match t {
                Tokens::List { all: true } => out(&api.call("GET", "/v1/tokens", None)?, &|v| list(v, "tokens", &columns)),
                Tokens::Revoke { id, all: true } => {
                    out(&api.call("DELETE", &format!("/v1/tokens/{id}"), None)?, &|_| format!("revoked token {id}\n"))
                }
                t => {
                    let base = format!("/v1/tenants/{}/tokens", api.tenant()?);
                    match t {
                        Tokens::List { .. } => out(&api.call("GET", &base, None)?, &|v| list(v, "tokens", &columns)),
                        Tokens::Create { name, role, expires_in } => {
                            let mut body = json!({ "name": name, "role": role });
                            if let Some(e) = expires_in {
                                body["expires_in"] = json!(e);
                            }
                            out(&api.call("POST", &base, Some(body.to_string().into_bytes()))?, &|v| {
                                format!("{}\n(token {} for {role}: shown once, store it now)\n", v["token"].as_str().unwrap_or(""), v["id"])
                            })
                        }
                        Tokens::Revoke { id, .. } => {
                            out(&api.call("DELETE", &format!("{base}/{id}"), None)?, &|_| format!("revoked token {id}\n"))
                        }
                    }
                }
            }
        }
        Command::Sources(r) => resource(&api, "sources", r, &out, &list, &pretty)?,
        Command::Sinks(r) => resource(&api, "sinks", r, &out, &list, &pretty)?,
        Command::Enrichers(r) => resource(&api, "enrichers", r, &out, &list, &pretty)?,
        Command::Pipelines(p) => {
            let base = format!("/v1/tenants/{}/pipelines", api.tenant()?);
            match p {
                Pipelines::List => out(&api.call("GET", &base, None)?, &|v| {
                    list(
                        v,
                        "pipelines",
                        &["name", "desired", "status.state", "status.lag_last_ms", "status.events", "server", "last_workflow.state"],
                    )
                }),
                Pipelines::Create { file, no_wait } => {
                    let v = api.call("POST", &base, Some(read(&file)?))?;
                    let wf = v["workflow"].as_i64().unwrap_or_default();
                    if !no_wait {
                        wait_workflow(&api, wf)?;
                    }
                    out(&v, &|v| {
                        format!(
                            "pipeline {} created (provisioning workflow {wf}{})\n",
                            v["name"].as_str().unwrap_or(""),
                            if no_wait { "" } else { " succeeded" }
                        )
                    })
                }
                Pipelines::Show { name } => out(&api.call("GET", &format!("{base}/{name}"), None)?, &pretty),
                Pipelines::Update { file } => {
                    let name = name_in(&file)?;
                    out(&api.call("PUT", &format!("{base}/{name}"), Some(read(&file)?))?, &|v| {
                        format!("updating {name}: workflow {}\n", v["workflow"])
                    })
                }
                Pipelines::Pause { name } => out(&api.call("POST", &format!("{base}/{name}/pause"), None)?, &|v| {
                    format!("pausing {name}: workflow {}\n", v["workflow"])
                }),
                Pipelines::Resume { name } => out(&api.call("POST", &format!("{base}/{name}/resume"), None)?, &|v| {
                    format!("resuming {name}: workflow {}\n", v["workflow"])
                }),
                Pipelines::Resync { name, tables, no_wait } => {
                    let body = serde_json::to_vec(&serde_json::json!({ "tables": tables }))?;
                    let v = api.call("POST", &format!("{base}/{name}/resync"), Some(body))?;
                    let wf = v["workflow"].as_i64().unwrap_or_default();
                    if !no_wait {
                        wait_workflow(&api, wf)?;
                    }
                    out(&v, &|v| {
                        format!(
                            "resync of {name} ({}): workflow {wf}{}\n",
                            v["tables"].as_array().map_or(0, Vec::len).to_string() + " tables",
                            if no_wait { "" } else { " succeeded" }
                        )
                    })
                }
                Pipelines::Recover { name, no_wait } => {
                    let v = api.call("POST", &format!("{base}/{name}/recover"), None)?;
                    let wf = v["workflow"].as_i64().unwrap_or_default();
                    if !no_wait {
                        wait_workflow(&api, wf)?;
                    }
                    out(&v, &|v| {
                        format!(
                            "recovery of {name} ({} tables): workflow {wf}{}\n",
                            v["tables"].as_array().map_or(0, Vec::len),
                            if no_wait { "" } else { " succeeded" }
                        )
                    })
                }
                Pipelines::Delete { name, purge } => out(&api.call("DELETE", &format!("{base}/{name}?purge={purge}"), None)?, &|v| {
                    format!("tearing down {name}: workflow {}\n", v["workflow"])
                }),
            }
        }
        Command::Mirrors(m) => {
            let base = format!("/v1/tenants/{}/mirrors", api.tenant()?);
            match m {
                Mirrors::List => out(&api.call("GET", &base, None)?, &|v| {
                    list(v, "mirrors", &["name", "desired", "status.state", "status.records", "status.lag_records", "server"])
                }),
                Mirrors::Create { file } => out(&api.call("POST", &base, Some(read(&file)?))?, &|v| {
                    format!("mirror {} created\n", v["name"].as_str().unwrap_or(""))
                }),
                Mirrors::Show { name } => out(&api.call("GET", &format!("{base}/{name}"), None)?, &pretty),
                Mirrors::Update { file } => {
                    let name = name_in(&file)?;
                    out(&api.call("PUT", &format!("{base}/{name}"), Some(read(&file)?))?, &|_| format!("updated {name}; it restarts\n"))
                }
                Mirrors::Pause { name } => out(&api.call("POST", &format!("{base}/{name}/pause"), None)?, &|_| format!("pausing {name}\n")),
                Mirrors::Resume { name } => {
                    out(&api.call("POST", &format!("{base}/{name}/resume"), None)?, &|_| format!("resuming {name}\n"))
                }
                Mirrors::Offsets { name, group } => out(&api.call("GET", &format!("{base}/{name}/offsets/{group}"), None)?, &|v| {
                    list(v, "offsets", &["topic", "partition", "committed", "target_topic", "status", "target"])
                }),
                Mirrors::Delete { name, purge } => out(&api.call("DELETE", &format!("{base}/{name}?purge={purge}"), None)?, &|_| {
                    format!("tearing down {name}{}\n", if purge { " and the topics it copied into" } else { "" })
                }),
            }
        }
        Command::Workflows(w) => {
            let base = format!("/v1/tenants/{}/workflows", api.tenant()?);
            match w {
                Workflows::List { pipeline } => {
                    let q = pipeline.map(|p| format!("?pipeline={p}")).unwrap_or_default();
                    out(&api.call("GET", &format!("{base}{q}"), None)?, &|v| {
                        list(v, "workflows", &["id", "pipeline", "kind", "state", "step", "attempt", "error"])
                    })
                }
                Workflows::Show { id } => out(&api.call("GET", &format!("{base}/{id}"), None)?, &|v| {
                    let mut s = format!("workflow {id}: {} of {}, {}\n", v["kind"], v["pipeline"], v["state"]);
                    s += &list(v, "history", &["step", "attempt", "outcome", "started_at", "ended_at", "server", "error"]);
                    s
                }),
                Workflows::Cancel { id } => {
                    out(&api.call("POST", &format!("{base}/{id}/cancel"), None)?, &|v| format!("workflow {id}: {}\n", v["state"]))
                }
                Workflows::Retry { id } => {
                    out(&api.call("POST", &format!("{base}/{id}/retry"), None)?, &|v| format!("workflow {id}: {}\n", v["state"]))
                }
            }
        }
    }
    Ok(())
}

/// Prints a response: JSON as is with `--output json`, else through the text renderer.
type Printer<'a> = &'a dyn Fn(&Value, &dyn Fn(&Value) -> String);

fn resource(
    api: &Api<'_>,
    kind: &str,
    r: Resource,
    out: Printer<'_>,
    list: &dyn Fn(&Value, &str, &[&str]) -> String,
    pretty: &dyn Fn(&Value) -> String,
) -> Result<()> {
    let base = format!("/v1/tenants/{}/{kind}", api.tenant()?);
    match r {
        Resource::List => out(&api.call("GET", &base, None)?, &|v| {
            let cols: &[&str] = if kind == "sources" { &["name", "host", "port", "database", "admin_user"] } else { &["name"] };
            list(v, kind, cols)
        }),
        Resource::Create { file } => {
            out(&api.call("POST", &base, Some(read(&file)?))?, &|v| format!("created {} {}\n", &kind[..kind.len() - 1], v["name"]))
        }
        Resource::Show { name } => out(&api.call("GET", &format!("{base}/{name}"), None)?, pretty),
        Resource::Update { file } => {
            let name = name_in(&file)?;
            out(&api.call("PUT", &format!("{base}/{name}"), Some(read(&file)?))?, &|_| format!("updated {name}\n"))
        }
        Resource::Delete { name } => out(&api.call("DELETE", &format!("{base}/{name}"), None)?, &|_| format!("deleted {name}\n")),
    }
    Ok(())
}

/// Waits for a workflow to end; a failed or cancelled one is an error naming the step.
fn wait_workflow(api: &Api<'_>, id: i64) -> Result<()> {
    let path = format!("/v1/tenants/{}/workflows/{id}", api.tenant()?);
    let (mut shown, mut progress) = (0, String::new());
    loop {
        let v = api.call("GET", &path, None)?;
        // A resync's progress, when it moved.
        if let Some(p) = v["params"]["progress"].as_array().filter(|_| api.c.output == Format::Text) {
            let line: Vec<String> = p
                .iter()
                .map(|t| {
                    format!("{} {} rows{}", t["table"].as_str().unwrap_or(""), t["rows"], if t["done"] == true { " done" } else { "" })
                })
                .collect();
            let line = line.join(", ");
            if line != progress {
                eprintln!("  {line}");
                progress = line;
            }
        }
        let state = v["state"].as_str().unwrap_or("").to_string();
        let step = v["step"].as_str().unwrap_or("").to_string();
        // Each attempt once it has ended: step, outcome, error.
        let history = v["history"].as_array().cloned().unwrap_or_default();
        while let Some(h) = history.get(shown).filter(|h| !h["ended_at"].is_null()) {
            if api.c.output == Format::Text {
                let err = h["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default();
                eprintln!(
                    "  {} (attempt {}): {}{err}",
                    h["step"].as_str().unwrap_or(""),
                    h["attempt"],
                    h["outcome"].as_str().unwrap_or("")
                );
            }
            shown += 1;
        }
        match state.as_str() {
            "succeeded" => return Ok(()),
            "failed" | "cancelled" => bail!("workflow {id} {state} at step {step}: {}", v["error"].as_str().unwrap_or("")),
            _ => std::thread::sleep(std::time::Duration::from_millis(300)),
        }
    }
}

//! Where a Postgres database is: the source, a Postgres sink, a state database. Only
//! the settings; connecting is `sluice-postgres`'s.

use secrecy::SecretString;
use serde::Deserialize;

/// How to reach a Postgres database. The password never appears in logs or `Debug`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConnConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub database: String,
}

fn default_port() -> u16 {
    5432
}

impl PgConnConfig {
    /// Where this points, for messages: never includes the password.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.database)
    }
}

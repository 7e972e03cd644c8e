//! Where a Postgres database is: the source, a Postgres sink, a state database. Only
//! the settings; connecting is `sluice-postgres`'s.

use std::path::PathBuf;
use std::sync::Arc;

use secrecy::SecretString;
use serde::Deserialize;

use crate::egress::Egress;

/// How to reach a Postgres database. The password never appears in logs or `Debug`.
/// The TLS keys are libpq's, with libpq's meaning, so a DSN's settings carry over.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConnConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub database: String,
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM file of the certificate authorities trusted for `verify-ca`/`verify-full`
    /// (the public web roots when absent).
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// The same authorities as PEM text, for who may not name a file on the server
    /// (a tenant of `sluice server`); in place of `sslrootcert`.
    #[serde(default)]
    pub sslrootcert_pem: Option<String>,
    /// PEM files of a client certificate and its key, for certificate authentication.
    #[serde(default)]
    pub sslcert: Option<PathBuf>,
    #[serde(default)]
    pub sslkey: Option<PathBuf>,
    /// The policy this connection's host must pass, checked on the addresses actually
    /// connected to (a tenant's, under `sluice server`); none: any host. Never read
    /// from a config: the server sets it.
    #[serde(skip)]
    pub egress: Option<Arc<Egress>>,
}

/// libpq's `sslmode`. The default is libpq's too: TLS when the server offers it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, without checking its certificate.
    #[default]
    Prefer,
    /// TLS or nothing, without checking the certificate.
    Require,
    /// TLS with a certificate signed by a trusted authority, for any host name.
    VerifyCa,
    /// TLS with a trusted certificate issued for the host connected to.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS half of a [`PgConnConfig`], for configs that spell the connection's keys
/// out beside their own (serde cannot reject unknown keys through `flatten`).
#[derive(Clone, Debug, Default)]
pub struct PgTls {
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslrootcert_pem: Option<String>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
}

fn default_port() -> u16 {
    5432
}

impl PgConnConfig {
    /// A connection with libpq's default TLS (`prefer`).
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>, password: SecretString, database: impl Into<String>) -> Self {
        Self::with_tls(host, port, user, password, database, PgTls::default())
    }

    pub fn with_tls(
        host: impl Into<String>,
        port: u16,
        user: impl Into<String>,
        password: SecretString,
        database: impl Into<String>,
        tls: PgTls,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            user: user.into(),
            password,
            database: database.into(),
            sslmode: tls.sslmode,
            sslrootcert: tls.sslrootcert,
            sslrootcert_pem: tls.sslrootcert_pem,
            sslcert: tls.sslcert,
            sslkey: tls.sslkey,
            egress: None,
        }
    }

    /// This connection, allowed only where `policy` lets it go (none: anywhere).
    pub fn guarded(mut self, policy: Option<&Arc<Egress>>) -> Self {
        self.egress = policy.cloned();
        self
    }

    /// Where this points, for messages: never includes the password.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.database)
    }

    /// One line naming what is wrong with the TLS settings, if anything is.
    pub fn check_tls(&self) -> Result<(), String> {
        if self.sslcert.is_some() != self.sslkey.is_some() {
            return Err("sslcert and sslkey go together: give both files for certificate authentication, or neither".into());
        }
        if self.sslrootcert.is_some() && self.sslrootcert_pem.is_some() {
            return Err("sslrootcert and sslrootcert_pem both name the trusted authorities: give one of them".into());
        }
        if let Some(pem) = &self.sslrootcert_pem
            && !pem.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err("sslrootcert_pem holds no certificate: paste the authority's PEM, from -----BEGIN CERTIFICATE----- on".into());
        }
        if self.sslmode == SslMode::Disable && (self.sslrootcert.is_some() || self.sslrootcert_pem.is_some() || self.sslcert.is_some()) {
            return Err(
                "sslmode is disable but TLS files are given: set sslmode to verify-full (or remove sslrootcert/sslcert/sslkey)".into()
            );
        }
        if self.sslmode == SslMode::VerifyFull && self.host.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "sslmode verify-full checks the certificate against a host name, and host {} is an IP address: use the name in the server's certificate, or sslmode verify-ca",
                self.host
            ));
        }
        Ok(())
    }
}

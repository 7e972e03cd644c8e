//! Built-in alert rules, evaluated where the pipelines run (`sluice run` with an
//! `alerts:` block; the server, with each tenant's settings) and delivered to a webhook
//! as Slack-compatible JSON (`text`, plus the fields a program reads), with a resolve
//! message when the condition clears.
//!
//! The rules are the failures that wake CDC operators: a pipeline halted (a change the
//! sink refused, a lost slot), failing (errors in the last `window`), lagging (over
//! `lag_ms` for `lag_for`), a slot at risk (`wal_status` past `reserved`, or more WAL
//! retained than `retained_bytes`), dead letters growing and enrichment failing (in the
//! last `window`). State lives in memory: a restarted process fires what still holds
//! again, once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_core::source::WalStatus;

use crate::metrics::Metrics;

/// Where alerts go and when they fire; the same keys in a pipeline's YAML (`alerts:`)
/// and in a tenant's alert settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Receives a POST per firing and resolved alert (a Slack incoming webhook works).
    pub webhook_url: SecretString,
    /// Lag (source commit to sink commit) above this...
    #[serde(default = "default_lag_ms")]
    pub lag_ms: u64,
    /// ...for this long fires `lag_high`.
    #[serde(default = "default_lag_for", with = "humantime_serde")]
    pub lag_for: Duration,
    /// WAL held by the slot above this fires `slot_at_risk` (as does a `wal_status` past
    /// `reserved`).
    #[serde(default = "default_retained_bytes")]
    pub retained_bytes: i64,
    /// Errors, dead letters or enrichment failures within this window fire their rule.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
}

fn default_lag_ms() -> u64 {
    5_000
}
fn default_lag_for() -> Duration {
    Duration::from_secs(300)
}
fn default_retained_bytes() -> i64 {
    1 << 30
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}

impl AlertConfig {
    /// One line naming the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        let url = self.webhook_url.expose_secret();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err("alerts.webhook_url: must be an http:// or https:// URL".into());
        }
        if self.retained_bytes <= 0 {
            return Err("alerts.retained_bytes: must be a positive number of bytes".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    PipelineHalted,
    PipelineFailing,
    LagHigh,
    SlotAtRisk,
    DeadLettersGrowing,
    EnrichmentFailing,
}

impl Rule {
    pub const ALL: [Rule; 6] =
        [Rule::PipelineHalted, Rule::PipelineFailing, Rule::LagHigh, Rule::SlotAtRisk, Rule::DeadLettersGrowing, Rule::EnrichmentFailing];

    pub fn name(self) -> &'static str {
        match self {
            Rule::PipelineHalted => "pipeline_halted",
            Rule::PipelineFailing => "pipeline_failing",
            Rule::LagHigh => "lag_high",
            Rule::SlotAtRisk => "slot_at_risk",
            Rule::DeadLettersGrowing => "dead_letters_growing",
            Rule::EnrichmentFailing => "enrichment_failing",
        }
    }
}

/// One pipeline's rule state.
#[derive(Default)]
struct RuleState {
    /// The condition has held since.
    pending_since: Option<Instant>,
    firing_since: Option<(Instant, SystemTime)>,
}

/// Counters as last seen, and when each last grew.
#[derive(Default)]
struct Seen {
    errors: u64,
    dead_letters: u64,
    enrich_errors: u64,
    errors_grew: Option<Instant>,
    dead_letters_grew: Option<Instant>,
    enrich_errors_grew: Option<Instant>,
}

/// Which pipeline a notification is about.
#[derive(Debug, Clone)]
pub struct Subject {
    pub pipeline: String,
    pub tenant: Option<String>,
}

/// The evaluator: call [`Alerts::evaluate`] on a timer for each pipeline.
#[derive(Default)]
pub struct Alerts {
    rules: HashMap<(String, Rule), RuleState>,
    seen: HashMap<String, Seen>,
}

impl Alerts {
    /// The notifications due for `subject` now (firing or resolved).
    pub fn evaluate(&mut self, subject: &Subject, m: &Metrics, cfg: &AlertConfig) -> Vec<Value> {
        let now = Instant::now();
        let key = format!("{}/{}", subject.tenant.as_deref().unwrap_or(""), subject.pipeline);
        let seen = self.seen.entry(key.clone()).or_default();
        let grew = |last: &mut u64, at: &mut Option<Instant>, v: u64| {
            if v > *last {
                *at = Some(now);
            }
            *last = v;
            at.is_some_and(|t| now.duration_since(t) < cfg.window)
        };
        let failing = grew(&mut seen.errors, &mut seen.errors_grew, m.errors.load(Ordering::Relaxed));
        let dead = grew(&mut seen.dead_letters, &mut seen.dead_letters_grew, m.enrich_dead_letters.load(Ordering::Relaxed));
        let enrich = grew(&mut seen.enrich_errors, &mut seen.enrich_errors_grew, m.enrich_errors.load(Ordering::Relaxed));
        let status = m.wal_status();
        let retained = m.wal_retained_bytes.load(Ordering::Relaxed);
        let lag = m.lag_last_ms.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for rule in Rule::ALL {
            let (holds, wait, detail) = match rule {
                Rule::PipelineHalted => (m.halted.load(Ordering::Relaxed) == 1, Duration::ZERO, m.halt_reason().unwrap_or_default()),
                Rule::PipelineFailing => (failing, Duration::ZERO, format!("{} errors so far (see the log)", seen.errors)),
                Rule::LagHigh => (lag > cfg.lag_ms as i64, cfg.lag_for, format!("lag {lag} ms, threshold {} ms", cfg.lag_ms)),
                Rule::SlotAtRisk => (
                    matches!(status, WalStatus::Extended | WalStatus::Unreserved | WalStatus::Lost) || retained > cfg.retained_bytes,
                    Duration::ZERO,
                    format!("wal_status {}, {retained} bytes of WAL retained (threshold {})", status.as_str(), cfg.retained_bytes),
                ),
                Rule::DeadLettersGrowing => (dead, Duration::ZERO, format!("{} rows held back so far", seen.dead_letters)),
                Rule::EnrichmentFailing => (enrich, Duration::ZERO, format!("{} failed enrichment calls so far", seen.enrich_errors)),
            };
            let st = self.rules.entry((key.clone(), rule)).or_default();
            if holds {
                let since = *st.pending_since.get_or_insert(now);
                if st.firing_since.is_none() && now.duration_since(since) >= wait {
                    st.firing_since = Some((now, SystemTime::now()));
                    out.push(notification(subject, rule, "firing", &detail, None));
                }
            } else {
                st.pending_since = None;
                if let Some((at, _)) = st.firing_since.take() {
                    out.push(notification(subject, rule, "resolved", &detail, Some(now.duration_since(at))));
                }
            }
        }
        out
    }
}

fn notification(subject: &Subject, rule: Rule, status: &str, detail: &str, lasted: Option<Duration>) -> Value {
    let who = match &subject.tenant {
        Some(t) => format!("pipeline {} (tenant {t})", subject.pipeline),
        None => format!("pipeline {}", subject.pipeline),
    };
    let text = match lasted {
        None => format!(":red_circle: FIRING {}: {who}: {detail}", rule.name()),
        Some(d) => format!(":large_green_circle: RESOLVED {}: {who}, after {}s", rule.name(), d.as_secs()),
    };
    json!({
        "text": text,
        "status": status,
        "alert": rule.name(),
        "pipeline": subject.pipeline,
        "tenant": subject.tenant,
        "detail": detail,
        "at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    })
}

/// POSTs `body` to the webhook in the background, retrying a few times; never blocks
/// the caller, never logs the URL (it is a credential for Slack).
pub fn deliver(client: &reqwest::Client, url: &SecretString, body: Value) {
    let (client, url) = (client.clone(), url.expose_secret().to_string());
    tokio::spawn(async move {
        for attempt in 0..4u32 {
            match client.post(&url).json(&body).timeout(Duration::from_secs(10)).send().await {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => tracing::warn!(status = %r.status(), alert = %body["alert"], "alert webhook refused the alert"),
                Err(e) => tracing::warn!(error = %e.without_url(), alert = %body["alert"], "alert webhook unreachable"),
            }
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AlertConfig {
        serde_yaml::from_str("webhook_url: http://127.0.0.1:1/hook\nlag_ms: 100\nlag_for: 0s\nwindow: 1s\n").unwrap()
    }

    #[test]
    fn fires_once_and_resolves() {
        let (mut a, m, cfg) = (Alerts::default(), Metrics::default(), cfg());
        let s = Subject { pipeline: "orders".into(), tenant: Some("shop".into()) };
        assert!(a.evaluate(&s, &m, &cfg).is_empty());
        m.set_halted(Some("replication slot x was invalidated".into()));
        let n = a.evaluate(&s, &m, &cfg);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!((n[0]["alert"].as_str(), n[0]["status"].as_str()), (Some("pipeline_halted"), Some("firing")));
        assert!(n[0]["text"].as_str().unwrap().contains("tenant shop"));
        assert!(a.evaluate(&s, &m, &cfg).is_empty(), "fires once");
        m.set_halted(None);
        let n = a.evaluate(&s, &m, &cfg);
        assert_eq!((n[0]["alert"].as_str(), n[0]["status"].as_str()), (Some("pipeline_halted"), Some("resolved")));
        m.lag_last_ms.store(500, Ordering::Relaxed);
        assert_eq!(a.evaluate(&s, &m, &cfg)[0]["alert"], "lag_high");
    }

    #[test]
    fn bad_settings_are_refused() {
        let c: AlertConfig = serde_yaml::from_str("webhook_url: ftp://x\n").unwrap();
        assert!(c.validate().unwrap_err().contains("alerts.webhook_url"));
        assert!(serde_yaml::from_str::<AlertConfig>("webhook_url: http://x\nlag: 5\n").is_err());
    }
}

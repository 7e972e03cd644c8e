//! What the fetching enrichers share: a TTL cache of fetched fields by key, and a
//! circuit breaker that stops calling a source that keeps failing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_core::Datum;

/// Fields found for a key; `None` when the source has no such key (not a failure:
/// the fields are NULL, as in a left join).
pub(crate) type Found = Option<Vec<Datum>>;

pub(crate) struct Cache {
    ttl: Duration,
    max: usize,
    map: Mutex<HashMap<String, (Instant, Found)>>,
}

impl Cache {
    pub(crate) fn new(ttl: Duration, max: usize) -> Self {
        Self { ttl, max: max.max(1), map: Mutex::new(HashMap::new()) }
    }

    /// Splits `keys` into the cached answers and the keys still to fetch.
    pub(crate) fn get_many(&self, keys: &[String]) -> (HashMap<String, Found>, Vec<String>) {
        let now = Instant::now();
        let map = self.map.lock().expect("cache lock");
        let (mut hit, mut miss) = (HashMap::new(), Vec::new());
        for k in keys {
            match map.get(k) {
                Some((at, v)) if now.duration_since(*at) < self.ttl => {
                    hit.insert(k.clone(), v.clone());
                }
                _ => miss.push(k.clone()),
            }
        }
        (hit, miss)
    }

    pub(crate) fn put_many(&self, found: &HashMap<String, Found>) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut map = self.map.lock().expect("cache lock");
        if map.len() + found.len() > self.max {
            map.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        }
        if map.len() + found.len() > self.max {
            // Still full of live entries: drop about half (an arbitrary half is as
            // good as an LRU for the skewed key sets lookups see, and costs nothing
            // on the hit path).
            let mut n = 0usize;
            map.retain(|_, _| {
                n += 1;
                n.is_multiple_of(2)
            });
        }
        for (k, v) in found {
            map.insert(k.clone(), (now, v.clone()));
        }
    }

    pub(crate) fn invalidate(&self, keys: &[String]) {
        let mut map = self.map.lock().expect("cache lock");
        for k in keys {
            map.remove(k);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().expect("cache lock").len()
    }
}

/// Opens after `threshold` failed calls in a row; while open, calls fail at once.
/// After `open_for`, one call is let through: its success closes the breaker.
pub(crate) struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: Mutex<(u32, Option<Instant>)>,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, open_for: Duration) -> Self {
        Self { threshold: threshold.max(1), open_for, state: Mutex::new((0, None)) }
    }

    /// Whether a call may go out now.
    pub(crate) fn allows(&self) -> bool {
        let s = self.state.lock().expect("breaker lock");
        s.1.is_none_or(|until| Instant::now() >= until)
    }

    pub(crate) fn success(&self) {
        *self.state.lock().expect("breaker lock") = (0, None);
    }

    pub(crate) fn failure(&self) {
        let mut s = self.state.lock().expect("breaker lock");
        s.0 += 1;
        if s.0 >= self.threshold {
            s.1 = Some(Instant::now() + self.open_for);
        }
    }

    /// Runs `call` behind the breaker: refused at once while open, else retried
    /// `retries` times with a delay starting at `backoff` and doubling up to 5 s; the
    /// outcome is counted. `what` names the source in the messages.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, retries: u32, backoff: Duration, mut call: F) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        if !self.allows() {
            return Err(format!("{what} is failing; calls paused by the circuit breaker"));
        }
        let (mut delay, mut attempt) = (backoff, 0);
        loop {
            match call().await {
                Ok(v) => {
                    self.success();
                    return Ok(v);
                }
                Err(e) if attempt >= retries => {
                    self.failure();
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(source = %what, error = %e, attempt, "enrichment call failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Whether the last calls failed (a replay of earlier failures would fail too).
    pub(crate) fn failing(&self) -> bool {
        self.state.lock().expect("breaker lock").0 > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_hits_expire_and_invalidate() {
        let c = Cache::new(Duration::from_secs(60), 4);
        let found: HashMap<String, Found> =
            [("a".to_string(), Some(vec![Datum::Text("1".into())])), ("b".to_string(), None)].into_iter().collect();
        c.put_many(&found);
        let (hit, miss) = c.get_many(&["a".into(), "b".into(), "c".into()]);
        assert_eq!(hit.len(), 2);
        assert_eq!(hit["b"], None);
        assert_eq!(miss, vec!["c".to_string()]);
        c.invalidate(&["a".into()]);
        assert_eq!(c.get_many(&["a".into()]).1, vec!["a".to_string()]);
        let many: HashMap<String, Found> = (0..10).map(|i| (i.to_string(), None)).collect();
        c.put_many(&many);
        assert!(c.len() <= 11);
        let zero = Cache::new(Duration::ZERO, 4);
        zero.put_many(&found);
        assert_eq!(zero.len(), 0);
    }

    #[test]
    fn breaker_opens_and_half_opens() {
        let b = Breaker::new(2, Duration::from_millis(30));
        assert!(b.allows());
        b.failure();
        assert!(b.allows() && b.failing());
        b.failure();
        assert!(!b.allows());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allows());
        b.success();
        assert!(b.allows() && !b.failing());
    }
}

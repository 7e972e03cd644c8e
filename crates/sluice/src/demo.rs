//! `sluice demo`: two throwaway Postgres servers and a live pipeline between them.

pub async fn run(
    _duration: std::time::Duration,
    _rate: u32,
    _rows: u32,
    _shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    anyhow::bail!("demo: not built yet")
}

//! The engine's own tests: pipelines run in this process into the memory sink, against
//! a real Postgres cluster. Fast: no sink server, no child process.

mod runner;
mod state;

//! walvault's integration tests: one test binary, one module per topic (ripgrep's layout).
//! Every test runs against real services started by the harness (`walvault-tests`).

mod agent_stream;
mod audit;
mod backup_restore;
mod copy;
mod dump;
mod encryption;
mod harness;
mod incremental;
mod observability;
mod operator;
mod security;
mod storage_conformance;
mod synchronous;
mod verify;
mod walreader_vs_waldump;

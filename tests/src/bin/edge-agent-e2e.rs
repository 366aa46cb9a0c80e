//! The agent binary, built inside the test crate so tests can start, signal and kill it.
fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}

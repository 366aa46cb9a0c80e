//! Shared helpers of the benchmark binaries.

/// The config of a benchmarked release agent: store `s1`, its MQTT broker on `mqtt_port`, HTTP
/// on the port `edge_tests::agent::Agent` fills in, warnings only (so its log writes nothing that
/// counts), then `sections` (ingress rules, `[log]` settings under test, ...).
pub fn agent_config(mqtt_port: u16, sections: &str) -> String {
    format!(
        r#"[agent]
store_id = "s1"
data_dir = "{{data_dir}}"
log_level = "warn"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
client_id = "edge-agent-{{store}}"

[http]
listen = "127.0.0.1:{{http_port}}"

{sections}
"#
    )
}

/// Resident memory of process `pid` in KiB (`VmRSS`), 0 when it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

//! Integration tests: in-process peers on 127.0.0.1:0, the proxy in-process or as its binary.

mod support;

mod cli;
mod entra;
mod exchange;
mod forwarding;
mod fuzz_corpus;
mod hardening;
mod inbound;
mod lifetime;
mod online;
mod profiles;
mod rmcp_example;
mod shutdown;
mod telemetry;
mod tls;
mod upstream_pool;

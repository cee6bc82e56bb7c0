//! The binary's command line: `check-config` exit codes, messages, shipped configs, and the
//! effect of every `TXP_*` environment variable.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_token-exchange-proxy"))
}

fn check(path: &Path) -> (i32, String, String) {
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every proxy config the repository ships: `config/*.yaml` and `k8s/**/config*.yaml`.
fn shipped_configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>, k8s: bool) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out, k8s);
            } else {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
                if yaml && (!k8s || name.starts_with("config")) {
                    out.push(p);
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    walk(&root.join("config"), &mut out, false);
    walk(&root.join("k8s"), &mut out, true);
    out.sort();
    out
}

#[test]
fn every_shipped_config_passes_check_config() {
    let configs = shipped_configs();
    assert!(
        configs.iter().any(|p| p.ends_with("config/example.yaml")),
        "{configs:?}"
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    for path in configs {
        let (code, stdout, stderr) = check(&with_test_tls_pair(&path, scratch.path()));
        assert_eq!(code, 0, "{}: {stderr}", path.display());
        assert!(stdout.contains("upstream:"), "{stdout}");
    }
}

/// `path` itself, or for a config with `tls` (whose files only exist where it is deployed) a
/// copy in `dir` naming a freshly issued pair instead, so that `check-config` checks the rest
/// and that the pair is read and matched.
fn with_test_tls_pair(path: &Path, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(path).expect("read config");
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    let Some(tls) = doc.get_mut("tls").and_then(|t| t.as_mapping_mut()) else {
        return path.to_path_buf();
    };
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    crate::support::certs::Ca::new()
        .issue(&[1])
        .write(&cert, &key);
    for (name, file) in [("cert_file", &cert), ("key_file", &key)] {
        tls.insert(name.into(), file.display().to_string().into());
    }
    let copy = dir.join("config.yaml");
    std::fs::write(&copy, serde_yaml_ng::to_string(&doc).expect("YAML")).expect("write");
    copy
}

#[test]
fn unknown_key_exits_64_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "upstream: {url: 'http://127.0.0.1:8000'}\ninbound: {issuer: 'https://idp', audiences: [a]}\nexchange: {client_id: c, client_auth: {secret_file: /s}}\nupstreams: {}\n",
    )
    .expect("write");
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(stderr.contains("upstreams"), "{stderr}");
    assert!(stdout.is_empty());
}

#[test]
fn invalid_values_exit_64_one_line_per_problem_without_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listen: nowhere\nupstream: {url: 'http://127.0.0.1:8000', connect_timeout: 5 parsecs}\ninbound: {issuer: 'https://idp', audiences: [a]}\nexchange: {client_id: c, client_auth: {method: 'hunter2-secret-value'}}\n",
    )
    .expect("write");
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 64);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines.iter().any(|l| l.contains("listen:")));
    assert!(lines.iter().any(|l| l.contains("upstream.connect_timeout")));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("exchange.client_auth.method"))
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn flags_override_the_file_and_environment_overrides_the_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = bin()
        .args(["check-config", "--config"])
        .arg(root.join("config/example.yaml"))
        .args(["--upstream", "http://127.0.0.1:7001"])
        .env("TXP_UPSTREAM", "http://127.0.0.1:7002")
        .env("TXP_LISTEN", "127.0.0.1:7003")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("http://127.0.0.1:7001/"), "{stdout}");
    assert!(stdout.contains("listen: 127.0.0.1:7003"), "{stdout}");
}

/// Writes `yaml` to a file in `dir` and runs `check-config` on it.
fn check_yaml(dir: &tempfile::TempDir, yaml: &str) -> (i32, String, String) {
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).expect("write");
    check(&path)
}

#[test]
fn huge_durations_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, section) in [
        ("cache.max_ttl", "cache: {max_ttl: 100000000d}"),
        ("cache.expiry_margin", "cache: {expiry_margin: 100000000d}"),
        (
            "inbound.leeway",
            "inbound: {issuer: 'https://idp.example.com', audiences: [a], leeway: 100000000d}",
        ),
        (
            "upstream.connect_timeout",
            "upstream: {url: 'http://127.0.0.1:8000', connect_timeout: 100000000d}",
        ),
        (
            "exchange.timeout",
            "exchange: {client_id: c, client_auth: {secret_file: /s}, timeout: 100000000d}",
        ),
        ("shutdown.timeout", "shutdown: {timeout: 100000000d}"),
    ] {
        let top = section.split(':').next().expect("top-level key");
        let mut yaml: Vec<&str> = [
            "upstream: {url: 'http://127.0.0.1:8000'}",
            "inbound: {issuer: 'https://idp.example.com', audiences: [a]}",
            "exchange: {client_id: c, client_auth: {secret_file: /s}}",
        ]
        .into_iter()
        .filter(|l| !l.starts_with(top))
        .collect();
        yaml.push(section);
        let (code, stdout, stderr) = check_yaml(&dir, &yaml.join("\n"));
        assert_eq!(code, 64, "{key}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("config error: {key}: ")),
            "{key}: {stderr}"
        );
    }
}

/// What each option sets, for [`every_environment_variable_takes_effect`]: the long flag, its
/// variable, a value, and where `check-config` prints it (a path into the printed YAML) with
/// the value expected there.
#[rustfmt::skip]
const ENV_EFFECTS: &[(&str, &str, &str, &[&str], &str)] = &[
    ("listen", "TXP_LISTEN", "127.0.0.1:7101", &["listen"], "127.0.0.1:7101"),
    ("admin-listen", "TXP_ADMIN_LISTEN", "127.0.0.1:7102", &["admin_listen"], "127.0.0.1:7102"),
    ("upstream", "TXP_UPSTREAM", "http://127.0.0.1:7103", &["upstream", "url"], "http://127.0.0.1:7103/"),
    ("issuer", "TXP_ISSUER", "https://env-issuer.example", &["inbound", "issuer"], "https://env-issuer.example"),
    ("audience", "TXP_AUDIENCE", "env-aud-1,env-aud-2", &["inbound", "audiences"], "env-aud-1,env-aud-2"),
    ("mode", "TXP_MODE", "passthrough", &["mode"], "passthrough"),
    ("token-endpoint", "TXP_TOKEN_ENDPOINT", "https://env-idp.example/token", &["exchange", "token_endpoint"], "https://env-idp.example/token"),
    ("client-id", "TXP_CLIENT_ID", "env-client", &["exchange", "client_id"], "env-client"),
    ("client-secret-file", "TXP_CLIENT_SECRET_FILE", "/env/secret", &["exchange", "client_auth", "secret_file"], "/env/secret"),
    ("exchange-audience", "TXP_EXCHANGE_AUDIENCE", "env-xa-1,env-xa-2", &["exchange", "audience"], "env-xa-1,env-xa-2"),
    ("exchange-resource", "TXP_EXCHANGE_RESOURCE", "https://r1.example/,https://r2.example/", &["exchange", "resource"], "https://r1.example/,https://r2.example/"),
    ("exchange-scope", "TXP_EXCHANGE_SCOPE", "env.read env.write", &["exchange", "scope"], "env.read env.write"),
    ("log-format", "TXP_LOG_FORMAT", "text", &["log", "format"], "text"),
    ("log-level", "TXP_LOG_LEVEL", "debug", &["log", "level"], "debug"),
];

/// The config every [`ENV_EFFECTS`] run starts from: none of its values is one of theirs.
const ENV_BASE: &str = "upstream: {url: 'http://127.0.0.1:8000'}\ninbound: {issuer: 'https://idp.example.com', audiences: [a]}\nexchange: {token_endpoint: 'https://idp.example.com/token', client_id: c, client_auth: {secret_file: /s}, audience: [b], resource: ['https://r.example/'], scope: s}\nlog: {format: json, level: info}\n";

/// Runs `check-config` with only `env` in the environment; returns the printed config.
fn check_with_env(env: &[(&str, &str)]) -> serde_yaml_ng::Value {
    let out = bin()
        .arg("check-config")
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{env:?}: {stdout}{stderr}");
    serde_yaml_ng::from_str(&stdout).expect("check-config prints YAML")
}

/// The printed value at `path`, lists joined with commas.
fn printed(config: &serde_yaml_ng::Value, path: &[&str]) -> String {
    let v = path.iter().fold(config, |v, k| &v[*k]);
    match v {
        serde_yaml_ng::Value::Sequence(items) => items
            .iter()
            .map(|i| i.as_str().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(","),
        other => other.as_str().unwrap_or_default().to_string(),
    }
}

#[test]
fn every_environment_variable_takes_effect() {
    use clap::CommandFactory;
    // The table covers every option the command line has.
    let mut options: Vec<String> = token_exchange_proxy::cli::Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(String::from))
        .filter(|l| l != "help" && l != "version" && l != "config")
        .collect();
    options.sort();
    let mut covered: Vec<String> = ENV_EFFECTS.iter().map(|e| e.0.to_string()).collect();
    covered.sort();
    assert_eq!(options, covered, "an option without a row in ENV_EFFECTS");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("base.yaml");
    std::fs::write(&path, ENV_BASE).expect("write");
    let file = path.to_str().expect("utf-8 path");
    // TXP_CONFIG: the file is read without --config.
    let base = check_with_env(&[("TXP_CONFIG", file)]);
    assert_eq!(
        printed(&base, &["upstream", "url"]),
        "http://127.0.0.1:8000/"
    );
    for (flag, var, value, at, expected) in ENV_EFFECTS {
        assert_ne!(
            printed(&base, at),
            *expected,
            "{flag}: the base already has it"
        );
        let config = check_with_env(&[("TXP_CONFIG", file), (var, value)]);
        assert_eq!(printed(&config, at), *expected, "{var}={value}");
    }
}

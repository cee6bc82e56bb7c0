use super::*;
use crate::cli::Options;

const MINIMAL: &str = "
upstream: {url: 'http://127.0.0.1:8000'}
inbound: {issuer: 'https://idp.example.com/realms/mcp', audiences: [mcp-server]}
exchange:
  client_id: txp
  client_auth: {secret_file: /run/secret}
";

fn load_str(yaml: &str, options: &Options) -> Result<Config, ConfigError> {
    let raw = parse_yaml(yaml).map_err(|message| ConfigError {
        problems: vec![Problem {
            key: "config".into(),
            message,
        }],
    })?;
    validate(apply(raw, options))
}

fn keys(e: &ConfigError) -> Vec<&str> {
    e.problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
    let options = Options {
        config: Some(path),
        ..Options::default()
    };
    let config = load(&options).expect("example.yaml is valid");
    assert_eq!(config.mode, Mode::Exchange);
    assert_eq!(config.upstream.url.as_str(), "http://127.0.0.1:8000/");
    assert_eq!(config.inbound().audiences, vec!["mcp-server"]);
    assert_eq!(
        config.exchange().expect("exchange mode").audience,
        vec!["nextcloud"]
    );
}

#[test]
fn defaults_apply_when_keys_are_absent() {
    let config = load_str(MINIMAL, &Options::default()).expect("valid");
    assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(config.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
    assert_eq!(config.upstream.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(config.upstream.idle_timeout, None);
    assert_eq!(config.upstream.pool_idle_timeout, DEFAULT_POOL_IDLE_TIMEOUT);
    assert_eq!(config.cache.max_ttl, DEFAULT_CACHE_MAX_TTL);
    assert_eq!(config.shutdown.drain_delay, DEFAULT_DRAIN_DELAY);
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.inbound().algorithms.len(), DEFAULT_ALGORITHMS.len());
    assert_eq!(
        config.protected_resource.authorization_servers,
        vec!["https://idp.example.com/realms/mcp"]
    );
}

#[test]
fn precedence_is_flag_then_environment_then_file_then_default() {
    let yaml = format!(
        "{MINIMAL}\nlisten: 127.0.0.1:1001\nadmin_listen: 127.0.0.1:2001\nlog: {{format: text}}\n"
    );
    let env = Options::from_env(|k| match k {
        "TXP_LISTEN" => Some("127.0.0.1:1002".into()),
        "TXP_ADMIN_LISTEN" => Some("127.0.0.1:2002".into()),
        _ => None,
    });
    let flags = Options {
        listen: Some("127.0.0.1:1003".into()),
        ..Options::default()
    };
    let config = load_str(&yaml, &flags.over(env)).expect("valid");
    assert_eq!(
        config.listen.to_string(),
        "127.0.0.1:1003",
        "flag wins over env and file"
    );
    assert_eq!(
        config.admin_listen.to_string(),
        "127.0.0.1:2002",
        "env wins over file"
    );
    assert_eq!(config.log.format, LogFormat::Text, "file wins over default");
    assert_eq!(
        config.upstream.response_header_timeout,
        DEFAULT_RESPONSE_HEADER_TIMEOUT
    );
}

#[test]
fn unknown_key_is_named() {
    let err = load_str(
        &format!("{MINIMAL}\nupstream_url: x\n"),
        &Options::default(),
    )
    .expect_err("invalid");
    assert!(err.to_string().contains("upstream_url"), "{err}");
    let err = load_str(
        "upstream: {url: 'http://127.0.0.1:1', conect_timeout: 5s}",
        &Options::default(),
    )
    .expect_err("invalid");
    assert!(err.to_string().contains("conect_timeout"), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let yaml = "
listen: nonsense
upstream: {url: 'ftp://x', connect_timeout: soon}
inbound: {issuer: 'https://idp.example.com', audiences: [a], algorithms: [HS256, none]}
exchange: {client_id: c, client_auth: {method: client_secret_basic}, extra_params: {grant_type: x}}
shutdown: {timeout: forever}
";
    let err = load_str(yaml, &Options::default()).expect_err("invalid");
    let k = keys(&err);
    for key in [
        "listen",
        "upstream.url",
        "upstream.connect_timeout",
        "inbound.algorithms",
        "exchange.client_auth.secret_file",
        "exchange.extra_params",
        "shutdown.timeout",
    ] {
        assert!(k.contains(&key), "{key} not reported in {k:?}");
    }
    assert_eq!(err.to_string().lines().count(), err.problems.len());
}

#[test]
fn required_keys_are_named_when_missing() {
    let err = load_str("", &Options::default()).expect_err("invalid");
    let k = keys(&err);
    for key in [
        "upstream.url",
        "inbound.issuer",
        "inbound.audiences",
        "exchange.client_id",
    ] {
        assert!(k.contains(&key), "{key} not reported in {k:?}");
    }
}

#[test]
fn passthrough_mode_needs_no_exchange_client() {
    let yaml = "mode: passthrough\nupstream: {url: 'http://127.0.0.1:8000'}\ninbound: {issuer: 'https://idp', audiences: [a]}";
    let config = load_str(yaml, &Options::default()).expect("valid");
    assert!(config.exchange().is_none());
}

#[test]
fn plain_http_idp_is_refused_unless_loopback_or_allowed() {
    let yaml = |issuer: &str, allow: bool| {
        format!(
            "mode: passthrough\nupstream: {{url: 'http://127.0.0.1:8000'}}\ninbound: {{issuer: '{issuer}', audiences: [a]}}\nidp_tls: {{allow_plain_http: {allow}}}"
        )
    };
    let err =
        load_str(&yaml("http://idp.internal", false), &Options::default()).expect_err("refused");
    assert_eq!(keys(&err), vec!["inbound.issuer"]);
    assert!(load_str(&yaml("http://127.0.0.1:9", false), &Options::default()).is_ok());
    assert!(load_str(&yaml("http://localhost:9", false), &Options::default()).is_ok());
    assert!(load_str(&yaml("http://idp.internal", true), &Options::default()).is_ok());
}

#[test]
fn errors_never_echo_a_secret_looking_value() {
    // A secret pasted inline where a path or URL belongs must not be repeated in the error.
    let secret = "s3cr3t-VALUE-do-not-print";
    let yaml = format!(
        "upstream: {{url: 'http://127.0.0.1:1'}}\ninbound: {{issuer: 'https://idp', audiences: [a]}}\nexchange: {{client_id: c, client_auth: {{method: '{secret}'}}, token_endpoint: 'http://u:{secret}@idp.example.com/t'}}"
    );
    let err = load_str(&yaml, &Options::default()).expect_err("invalid");
    assert!(!err.to_string().contains(secret), "{err}");
    assert!(keys(&err).contains(&"exchange.client_auth.method"));
}

#[test]
fn pool_idle_timeout_is_read_and_zero_is_allowed() {
    for (value, expected) in [("250ms", Duration::from_millis(250)), ("0", Duration::ZERO)] {
        let yaml = MINIMAL.replace(
            "url: 'http://127.0.0.1:8000'",
            &format!("url: 'http://127.0.0.1:8000', pool_idle_timeout: '{value}'"),
        );
        let config = load_str(&yaml, &Options::default()).expect("valid");
        assert_eq!(config.upstream.pool_idle_timeout, expected, "{value}");
    }
    let yaml = MINIMAL.replace(
        "url: 'http://127.0.0.1:8000'",
        "url: 'http://127.0.0.1:8000', pool_idle_timeout: soon",
    );
    let err = load_str(&yaml, &Options::default()).expect_err("invalid");
    assert!(keys(&err).contains(&"upstream.pool_idle_timeout"), "{err}");
}

#[test]
fn idle_timeout_zero_means_none() {
    let config = load_str(&format!("{MINIMAL}\n"), &Options::default()).expect("valid");
    assert_eq!(config.upstream.idle_timeout, None);
    let yaml = MINIMAL.replace(
        "url: 'http://127.0.0.1:8000'",
        "url: 'http://127.0.0.1:8000', idle_timeout: 90s",
    );
    let config = load_str(&yaml, &Options::default()).expect("valid");
    assert_eq!(config.upstream.idle_timeout, Some(Duration::from_secs(90)));
}

/// `MINIMAL` with `extra` added inside `inbound: {…}`.
fn with_inbound(extra: &str) -> String {
    MINIMAL.replace(
        "audiences: [mcp-server]}",
        &format!("audiences: [mcp-server], {extra}}}"),
    )
}

#[test]
fn a_public_path_covering_every_path_is_refused() {
    // `/` is a prefix of every path; `//…` make every path public to a backend that merges
    // slashes; `''` and `*` are no paths at all.
    for entry in ["/", "//", "///", "", "*"] {
        let yaml = with_inbound(&format!("public_paths: ['/health', '{entry}']"));
        let err = load_str(&yaml, &Options::default()).expect_err(entry);
        assert_eq!(keys(&err), vec!["inbound.public_paths"], "{entry:?}: {err}");
    }
    let yaml = with_inbound("public_paths: ['/health', '/static/', '/.well-known/x']");
    let config = load_str(&yaml, &Options::default()).expect("narrow public paths are valid");
    assert_eq!(config.inbound().public_paths.len(), 3);
}

#[test]
fn a_cache_that_can_never_serve_an_entry_is_refused() {
    for (cache, key) in [
        (
            "{max_ttl: 300s, expiry_margin: 300s}",
            "cache.expiry_margin",
        ),
        ("{max_ttl: 60s, expiry_margin: 2m}", "cache.expiry_margin"),
        ("{expiry_margin: 10m}", "cache.expiry_margin"),
        ("{max_entries: 0}", "cache.max_entries"),
    ] {
        let err =
            load_str(&format!("{MINIMAL}cache: {cache}\n"), &Options::default()).expect_err(cache);
        assert_eq!(keys(&err), vec![key], "{cache}: {err}");
        if key == "cache.expiry_margin" {
            assert!(err.to_string().contains("cache.max_ttl"), "{err}");
        }
    }
    let config = load_str(
        &format!("{MINIMAL}cache: {{max_entries: 1, max_ttl: 300s, expiry_margin: 299s}}\n"),
        &Options::default(),
    )
    .expect("a margin below max_ttl is valid");
    assert_eq!(config.cache.expiry_margin, Duration::from_secs(299));
}

/// Every duration key, as `(key, YAML putting {value} there)`.
const DURATION_KEYS: &[(&str, &str)] = &[
    (
        "cors.max_age",
        "cors: {allowed_origins: ['*'], max_age: '{value}'}",
    ),
    (
        "upstream.connect_timeout",
        "upstream: {url: 'http://127.0.0.1:8000', connect_timeout: '{value}'}",
    ),
    (
        "upstream.response_header_timeout",
        "upstream: {url: 'http://127.0.0.1:8000', response_header_timeout: '{value}'}",
    ),
    (
        "upstream.idle_timeout",
        "upstream: {url: 'http://127.0.0.1:8000', idle_timeout: '{value}'}",
    ),
    (
        "upstream.pool_idle_timeout",
        "upstream: {url: 'http://127.0.0.1:8000', pool_idle_timeout: '{value}'}",
    ),
    (
        "inbound.leeway",
        "inbound: {issuer: 'https://idp.example.com', audiences: [a], leeway: '{value}'}",
    ),
    (
        "exchange.timeout",
        "exchange: {client_id: txp, client_auth: {secret_file: /run/secret}, timeout: '{value}'}",
    ),
    (
        "cache.max_ttl",
        "cache: {max_ttl: '{value}', expiry_margin: 1s}",
    ),
    (
        "cache.expiry_margin",
        "cache: {max_ttl: '{value}', expiry_margin: '{value}'}",
    ),
    ("shutdown.drain_delay", "shutdown: {drain_delay: '{value}'}"),
    ("shutdown.timeout", "shutdown: {timeout: '{value}'}"),
];

/// A complete config with `section` (one top-level key) replacing its default.
fn config_with(section: &str) -> String {
    let top = section.split(':').next().unwrap_or_default();
    let mut out: Vec<String> = [
        "upstream: {url: 'http://127.0.0.1:8000'}",
        "inbound: {issuer: 'https://idp.example.com', audiences: [a]}",
        "exchange: {client_id: txp, client_auth: {secret_file: /run/secret}}",
    ]
    .iter()
    .filter(|l| !l.starts_with(&format!("{top}:")))
    .map(|l| l.to_string())
    .collect();
    out.push(section.to_string());
    out.join("\n")
}

#[test]
fn durations_above_thirty_days_are_refused_naming_the_key() {
    for (key, section) in DURATION_KEYS {
        for value in ["100000000d", "31d", "720h 1s"] {
            let yaml = config_with(&section.replace("{value}", value));
            let err = load_str(&yaml, &Options::default()).expect_err(key);
            assert!(keys(&err).contains(key), "{key} = {value}: {err}");
            assert!(err.to_string().contains("30 days"), "{err}");
        }
        let yaml = config_with(&section.replace("{value}", "30d"));
        if *key != "cache.expiry_margin" {
            load_str(&yaml, &Options::default()).expect("30 days is accepted");
        }
    }
}

const TWO_PROFILES: &str = "
upstream: {url: 'http://127.0.0.1:8000'}
profiles:
  - name: corp
    inbound: {issuer: 'https://corp.example.com', audiences: [mcp-server]}
    exchange: {client_id: txp, client_auth: {secret_file: /run/corp}, audience: [nextcloud]}
  - name: partner
    inbound: {issuer: 'https://partner.example.com', audiences: [mcp]}
    exchange: {client_id: txp-p, client_auth: {secret_file: /run/partner}}
";

#[test]
fn profiles_are_read_in_order_with_their_own_sections() {
    let config = load_str(TWO_PROFILES, &Options::default()).expect("valid");
    let names: Vec<&str> = config.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["corp", "partner"]);
    assert_eq!(config.profiles[1].inbound.audiences, vec!["mcp"]);
    let partner = config.profiles[1].exchange.as_ref().expect("exchange mode");
    assert_eq!(partner.client_id, "txp-p");
    assert_eq!(partner.issuer, "https://partner.example.com");
    // Every profile's issuer is announced in the metadata.
    assert_eq!(
        config.protected_resource.authorization_servers,
        vec!["https://corp.example.com", "https://partner.example.com"]
    );
}

#[test]
fn the_one_profile_form_has_a_single_unnamed_profile() {
    let config = load_str(MINIMAL, &Options::default()).expect("valid");
    assert_eq!(config.profiles.len(), 1);
    assert_eq!(config.profiles[0].name, "");
}

#[test]
fn problems_inside_a_profile_name_the_profile() {
    let yaml = TWO_PROFILES.replace("audiences: [mcp]", "audiences: []");
    let err = load_str(&yaml, &Options::default()).expect_err("invalid");
    assert_eq!(keys(&err), ["profiles.partner.inbound.audiences"]);
}

#[test]
fn profiles_beside_a_top_level_section_are_refused() {
    let yaml =
        format!("{TWO_PROFILES}inbound: {{issuer: 'https://x.example.com', audiences: [a]}}\n");
    let err = load_str(&yaml, &Options::default()).expect_err("invalid");
    assert!(
        err.to_string()
            .contains("profiles: cannot be combined with a top-level inbound"),
        "{err}"
    );
}

#[test]
fn profile_names_must_be_unique_labels() {
    let duplicate = TWO_PROFILES.replace("name: partner", "name: corp");
    let err = load_str(&duplicate, &Options::default()).expect_err("invalid");
    assert_eq!(keys(&err), ["profiles.corp.name"]);
    let upper = TWO_PROFILES.replace("name: partner", "name: Partner");
    let err = load_str(&upper, &Options::default()).expect_err("invalid");
    assert_eq!(keys(&err), ["profiles[1].name"]);
}

#[test]
fn two_profiles_may_not_share_an_issuer_or_both_introspect() {
    let same = TWO_PROFILES.replace("https://partner.example.com", "https://corp.example.com");
    let err = load_str(&same, &Options::default()).expect_err("invalid");
    assert_eq!(keys(&err), ["profiles.partner.inbound.issuer"]);
    let introspect = "introspection: {endpoint: 'https://corp.example.com/introspect', client_id: rs, client_secret_file: /run/i}";
    let both = TWO_PROFILES
        .replace(
            "audiences: [mcp-server]",
            &format!("audiences: [mcp-server], {introspect}"),
        )
        .replace(
            "audiences: [mcp]",
            &format!("audiences: [mcp], {introspect}"),
        );
    let err = load_str(&both, &Options::default()).expect_err("invalid");
    assert_eq!(keys(&err), ["profiles"]);
}

#[test]
fn the_obo_grant_needs_a_scope() {
    let obo = MINIMAL.replace("client_id: txp", "client_id: txp\n  grant: jwt_bearer_obo");
    let err = load_str(&obo, &Options::default()).expect_err("invalid");
    assert_eq!(keys(&err), ["exchange.scope"]);
    let scoped = obo.replace(
        "grant: jwt_bearer_obo",
        "grant: jwt_bearer_obo\n  scope: api://backend/.default",
    );
    let config = load_str(&scoped, &Options::default()).expect("valid");
    assert_eq!(
        config.exchange().expect("exchange mode").grant,
        Grant::JwtBearerObo
    );
    let unknown = MINIMAL.replace("client_id: txp", "client_id: txp\n  grant: saml");
    let err = load_str(&unknown, &Options::default()).expect_err("invalid");
    assert_eq!(keys(&err), ["exchange.grant"]);
}

#[test]
fn traces_are_off_without_an_otlp_endpoint() {
    let config = load_str(MINIMAL, &Options::default()).expect("valid");
    assert_eq!(config.telemetry.otlp_endpoint, None);
    assert_eq!(config.telemetry.service_name, DEFAULT_SERVICE_NAME);
    assert_eq!(config.telemetry.sample_ratio, DEFAULT_SAMPLE_RATIO);
    let on = format!(
        "{MINIMAL}telemetry: {{otlp_endpoint: 'http://127.0.0.1:4318', sample_ratio: 0.01}}\n"
    );
    let config = load_str(&on, &Options::default()).expect("valid");
    assert_eq!(
        config.telemetry.otlp_endpoint.as_ref().map(Url::as_str),
        Some("http://127.0.0.1:4318/")
    );
    assert_eq!(config.telemetry.sample_ratio, 0.01);
}

#[test]
fn telemetry_problems_name_their_keys() {
    for (telemetry, key) in [
        ("{sample_ratio: 1.5}", "telemetry.sample_ratio"),
        ("{sample_ratio: -0.1}", "telemetry.sample_ratio"),
        ("{sample_ratio: .nan}", "telemetry.sample_ratio"),
        (
            "{otlp_endpoint: 'grpc://collector:4317'}",
            "telemetry.otlp_endpoint",
        ),
        (
            "{otlp_endpoint: 'http://u:p@collector:4318'}",
            "telemetry.otlp_endpoint",
        ),
        (
            "{otlp_endpoint: 'http://collector:4318/?a=b'}",
            "telemetry.otlp_endpoint",
        ),
        ("{service_name: ' '}", "telemetry.service_name"),
        ("{endpoint: 'http://collector:4318'}", "config"),
    ] {
        let yaml = format!("{MINIMAL}telemetry: {telemetry}\n");
        let e = load_str(&yaml, &Options::default()).expect_err(telemetry);
        assert_eq!(keys(&e), vec![key], "{telemetry}: {e}");
    }
}

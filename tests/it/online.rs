//! Start-up and online checks (README "Start-up and online checks"): `check-config --online`,
//! and the credentials probe the proxy runs at start.

use std::time::Duration;

use crate::support::issuer::{Issuer, Key};
use crate::support::token_endpoint::{ClientAuth, TokenEndpoint};
use crate::support::{client, eventually};

/// An issuer with a key, a token endpoint expecting `client_secret_basic` with `secret`, and a
/// config file whose secret file holds `configured`.
struct Setup {
    _issuer: Issuer,
    idp: TokenEndpoint,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    secret_file: std::path::PathBuf,
}

async fn setup(secret: &str, configured: &str, extra: &str) -> Setup {
    let issuer = Issuer::start().await;
    issuer.publish(&[&Key::ec("ec-1")]);
    let idp = TokenEndpoint::start(ClientAuth::Basic {
        id: "txp".into(),
        secret: secret.into(),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, configured).expect("write secret");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nlog: {{format: json, level: info}}\n\
             upstream: {{url: 'http://127.0.0.1:9'}}\n\
             inbound: {{issuer: '{}', audiences: [mcp]}}\n\
             exchange: {{token_endpoint: '{}', client_id: txp, client_auth: {{method: client_secret_basic, secret_file: '{}'}}, audience: [backend]}}\n{extra}",
            issuer.url(),
            idp.url(),
            secret_file.display(),
        ),
    )
    .expect("write config");
    Setup {
        _issuer: issuer,
        idp,
        dir,
        config,
        secret_file,
    }
}

/// Runs `check-config --online` on `config`: exit code and stderr.
async fn online(config: &std::path::Path) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-exchange-proxy"))
        .arg("check-config")
        .arg("--online")
        .arg("--config")
        .arg(config)
        .output()
        .await
        .expect("run");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_config_online_names_a_rejected_client_and_passes_a_good_one() {
    let s = setup("the-right-secret", "a-wrong-secret", "").await;
    let (code, stderr) = online(&s.config).await;
    assert_eq!(code, 69, "{stderr}");
    assert_eq!(
        stderr.trim(),
        "online check failed: token_endpoint: credentials rejected (invalid_client)"
    );
    assert!(!stderr.contains("a-wrong-secret"), "a secret was printed");
    assert_eq!(s.idp.probes(), 1);
    assert_eq!(s.idp.calls(), 0, "no exchange was made");

    std::fs::write(&s.secret_file, "the-right-secret").expect("write secret");
    let (code, stderr) = online(&s.config).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stderr, "");
}

#[tokio::test]
async fn check_config_online_names_each_unusable_piece() {
    let s = setup("x", "x", "").await;
    std::fs::remove_file(&s.secret_file).expect("remove");
    let (code, stderr) = online(&s.config).await;
    assert_eq!(code, 69);
    assert!(
        stderr.contains("online check failed: exchange.client_auth.secret_file: "),
        "{stderr}"
    );
    // An issuer that does not answer: discovery fails.
    let broken = s.dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "upstream: {url: 'http://127.0.0.1:9'}\n\
         inbound: {issuer: 'http://127.0.0.1:9/realms/x', audiences: [mcp]}\n\
         mode: passthrough\n",
    )
    .expect("write");
    let (code, stderr) = online(&broken).await;
    assert_eq!(code, 69);
    assert!(
        stderr.starts_with("online check failed: discovery: "),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn a_rejected_client_keeps_the_proxy_unready_until_its_secret_is_fixed() {
    let s = setup("the-right-secret", "a-wrong-secret", "").await;
    let text = std::fs::read_to_string(&s.config).expect("read");
    let yaml: String = text.lines().skip(3).collect::<Vec<_>>().join("\n");
    let proc = crate::support::ProxyProcess::spawn(&yaml);
    let admin = proc.admin_addr;
    let readyz = async || {
        let r = client()
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .expect("readyz");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    let rejected = eventually(Duration::from_secs(10), async || {
        let (status, body) = readyz().await;
        status == 503 && body.contains("token_endpoint: credentials rejected")
    })
    .await;
    assert!(rejected, "readyz: {:?}", readyz().await);
    // Log lines reach stdout in batches, a fraction of a second later.
    let logged = eventually(Duration::from_secs(3), async || {
        proc.logs.lock().expect("lock").iter().any(|l| {
            l.contains("\"level\":\"ERROR\"")
                && l.contains("rejects the proxy's client credentials")
        })
    })
    .await;
    assert!(logged, "no error logged");
    // The secret is fixed (the Secret's file rewritten): a re-probe lets the proxy be ready.
    std::fs::write(&s.secret_file, "the-right-secret").expect("write secret");
    let ready = eventually(Duration::from_secs(15), async || readyz().await.0 == 200).await;
    assert!(ready, "readyz: {:?}", readyz().await);
    assert!(s.idp.probes() >= 2);
}

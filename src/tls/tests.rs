use std::time::Duration;

use super::*;

#[path = "../../tests/it/support/certs.rs"]
#[allow(dead_code)]
mod certs;

use certs::Ca;

/// The pair's two paths in a fresh directory (kept alive by the returned guard).
fn files() -> (tempfile::TempDir, config::Tls) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = config::Tls {
        cert_file: dir.path().join("tls.crt"),
        key_file: dir.path().join("tls.key"),
        poll_interval: Duration::from_millis(10),
    };
    (dir, tls)
}

fn error_of(files: &config::Tls) -> TlsError {
    check(files).expect_err("the pair is refused")
}

#[test]
fn a_matching_pair_is_accepted_with_its_serial() {
    let (_dir, f) = files();
    Ca::new()
        .issue(&[0x5A, 0x01])
        .write(&f.cert_file, &f.key_file);
    assert_eq!(check(&f).expect("valid pair"), "5A01");
}

#[test]
fn the_key_of_another_certificate_is_refused_as_tls_key_file() {
    let (_dir, f) = files();
    let ca = Ca::new();
    let (a, b) = (ca.issue(&[1]), ca.issue(&[2]));
    std::fs::write(&f.cert_file, &a.chain_pem).expect("write");
    std::fs::write(&f.key_file, &b.key_pem).expect("write");
    let e = error_of(&f);
    assert!(matches!(e, TlsError::Mismatch { .. }), "{e:?}");
    assert_eq!(e.problem().key, "tls.key_file");
}

#[test]
fn unusable_files_are_refused_naming_the_key_and_path() {
    let ca = Ca::new();
    let good = ca.issue(&[3]);
    let half_cert = &good.chain_pem[..good.chain_pem.len() / 3];
    let half_key = &good.key_pem[..good.key_pem.len() / 2];
    for (cert, key, want_key, what) in [
        (
            "",
            good.key_pem.as_str(),
            "tls.cert_file",
            "empty certificate file",
        ),
        (
            half_cert,
            good.key_pem.as_str(),
            "tls.cert_file",
            "half-written certificate",
        ),
        (
            "not pem at all",
            good.key_pem.as_str(),
            "tls.cert_file",
            "no PEM",
        ),
        (
            good.chain_pem.as_str(),
            half_key,
            "tls.key_file",
            "half-written key",
        ),
        (
            good.chain_pem.as_str(),
            "",
            "tls.key_file",
            "empty key file",
        ),
        (
            good.chain_pem.as_str(),
            good.chain_pem.as_str(),
            "tls.key_file",
            "certificate as key",
        ),
    ] {
        let (_dir, f) = files();
        std::fs::write(&f.cert_file, cert).expect("write");
        std::fs::write(&f.key_file, key).expect("write");
        let p = error_of(&f).problem();
        assert_eq!(p.key, want_key, "{what}: {}", p.message);
        let path = if want_key == "tls.cert_file" {
            &f.cert_file
        } else {
            &f.key_file
        };
        assert!(
            p.message.contains(&path.display().to_string()),
            "{what}: {}",
            p.message
        );
    }
}

#[test]
fn a_missing_file_is_named() {
    let (_dir, f) = files();
    Ca::new().issue(&[4]).write(&f.cert_file, &f.key_file);
    std::fs::remove_file(&f.key_file).expect("remove");
    let p = error_of(&f).problem();
    assert_eq!(p.key, "tls.key_file");
    assert!(p.message.contains("cannot read"), "{}", p.message);
    assert!(p.message.contains("tls.key"), "{}", p.message);
}

#[test]
fn no_error_quotes_the_key() {
    let ca = Ca::new();
    let good = ca.issue(&[5]);
    // Every line of the key's base64, as it could end up in a PEM parser's message.
    let secret_lines: Vec<&str> = good
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let broken_key = good.key_pem.replacen("-----END", "-----EMD", 1);
    for key in [
        broken_key.as_str(),
        &good.key_pem[..good.key_pem.len() - 40],
    ] {
        let (_dir, f) = files();
        std::fs::write(&f.cert_file, &good.chain_pem).expect("write");
        std::fs::write(&f.key_file, key).expect("write");
        let p = error_of(&f).problem();
        for line in &secret_lines {
            assert!(!p.message.contains(line), "key material in: {}", p.message);
        }
        assert!(!format!("{:?}", check(&f)).contains(secret_lines[0]));
    }
}

#[test]
fn serials_print_as_openssl_prints_them() {
    assert_eq!(hex_serial(&[0x00, 0xF3, 0x0A]), "F30A");
    assert_eq!(hex_serial(&[0x01]), "01");
    assert_eq!(hex_serial(&[0x00]), "00");
    assert_eq!(hex_serial(&[]), "00");
}

/// A [`Tls`] serving a fresh pair of `ca`'s with serial `serial`.
fn serving(ca: &Ca, serial: &[u8]) -> (tempfile::TempDir, config::Tls, Tls) {
    let (dir, f) = files();
    ca.issue(serial).write(&f.cert_file, &f.key_file);
    let tls = Tls::load(&f).expect("loads");
    (dir, f, tls)
}

fn poll(tls: &mut Tls) -> Step {
    let contents = read(&tls.reload.files);
    tls.reload.poll(contents)
}

#[test]
fn a_new_pair_is_served_once_it_stayed_the_same_for_a_poll() {
    let ca = Ca::new();
    let (_dir, f, mut tls) = serving(&ca, &[0x10]);
    assert!(matches!(poll(&mut tls), Step::Unchanged));
    ca.issue(&[0x11]).write(&f.cert_file, &f.key_file);
    assert!(matches!(poll(&mut tls), Step::Settling));
    assert_eq!(tls.serial(), "10", "not before it settled");
    match poll(&mut tls) {
        Step::Reloaded { previous, serial } => {
            assert_eq!((previous.as_str(), serial.as_str()), ("10", "11"));
        }
        other => panic!("expected a reload, got {other:?}"),
    }
    assert_eq!(tls.serial(), "11");
    assert!(matches!(poll(&mut tls), Step::Unchanged));
}

#[test]
fn a_pair_written_one_file_at_a_time_is_not_loaded_half_way() {
    let ca = Ca::new();
    let (_dir, f, mut tls) = serving(&ca, &[0x20]);
    let next = ca.issue(&[0x21]);
    // The certificate first; the key one poll later: never a refusal.
    std::fs::write(&f.cert_file, &next.chain_pem).expect("write");
    assert!(matches!(poll(&mut tls), Step::Settling));
    std::fs::write(&f.key_file, &next.key_pem).expect("write");
    assert!(matches!(poll(&mut tls), Step::Settling));
    assert!(matches!(poll(&mut tls), Step::Reloaded { .. }));
    assert_eq!(tls.serial(), "21");
}

#[test]
fn a_broken_pair_is_refused_once_and_the_old_one_kept() {
    let ca = Ca::new();
    let (_dir, f, mut tls) = serving(&ca, &[0x30]);
    let other = ca.issue(&[0x31]);
    std::fs::write(&f.key_file, &other.key_pem).expect("write");
    assert!(matches!(poll(&mut tls), Step::Settling));
    match poll(&mut tls) {
        Step::Refused(e) => assert!(matches!(e, TlsError::Mismatch { .. }), "{e:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(tls.serial(), "30");
    // Reported once: the same broken files are not tried (nor logged) again.
    assert!(matches!(poll(&mut tls), Step::Unchanged));
    // A missing file is a state of its own, refused the same way.
    std::fs::remove_file(&f.cert_file).expect("remove");
    assert!(matches!(poll(&mut tls), Step::Settling));
    assert!(matches!(
        poll(&mut tls),
        Step::Refused(TlsError::Read { .. })
    ));
    // A good pair afterwards is served.
    other.write(&f.cert_file, &f.key_file);
    assert!(matches!(poll(&mut tls), Step::Settling));
    assert!(matches!(poll(&mut tls), Step::Reloaded { .. }));
    assert_eq!(tls.serial(), "31");
}

#[tokio::test]
async fn the_watch_task_counts_reloads_and_failures() {
    let ca = Ca::new();
    let (_dir, f, tls) = serving(&ca, &[0x40]);
    let current = tls.current.clone();
    let metrics = Arc::new(Metrics::default());
    let task = tokio::spawn(tls.watch(metrics.clone()));
    let wait_for = async |check: &dyn Fn() -> bool| {
        for _ in 0..500 {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    ca.issue(&[0x41]).write(&f.cert_file, &f.key_file);
    assert!(wait_for(&|| metrics.tls_reloads.get(RefreshResult::Success) == 1).await);
    assert_eq!(serial(&current.get()), "41");
    std::fs::write(&f.cert_file, "garbage").expect("write");
    assert!(wait_for(&|| metrics.tls_reloads.get(RefreshResult::Failure) == 1).await);
    assert_eq!(serial(&current.get()), "41");
    task.abort();
}

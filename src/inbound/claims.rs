//! Claim checks shared by JWTs (RFC 7519 §4.1, RFC 9068 §4) and introspection responses
//! (RFC 7662 §2.2, whose members carry the same names and meanings).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{InboundError, Principal};
use crate::config::Inbound;
use crate::metrics::RejectReason;

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly fractional. Anything but a
/// JSON number (a string, a boolean) fails to parse, so the token is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumericDate(pub i64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        let secs = if let Some(i) = n.as_i64() {
            i
        } else if n.as_u64().is_some() {
            i64::MAX
        } else {
            // `as` saturates at the bounds of i64; floor keeps "expires at 10.5" expiring at 10.
            n.as_f64().map_or(i64::MAX, |f| f.floor() as i64)
        };
        Ok(NumericDate(secs))
    }
}

/// A claim that is a string or an array of strings (`aud`, RFC 7519 §4.1.3; `scp`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// Every value.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, many) = match self {
            OneOrMany::One(s) => (Some(s.as_str()), &[][..]),
            OneOrMany::Many(v) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter().map(String::as_str))
    }
}

/// The claims the proxy reads. Other members are ignored; a known member with the wrong JSON
/// type makes the whole token malformed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub aud: Option<OneOrMany>,
    pub exp: Option<NumericDate>,
    pub nbf: Option<NumericDate>,
    pub iat: Option<NumericDate>,
    /// Space-separated (RFC 8693 §4.2, RFC 7662 §2.2); an array is tolerated.
    pub scope: Option<OneOrMany>,
    /// Array of scopes (Azure AD, Okta), or a space-separated string.
    pub scp: Option<OneOrMany>,
}

/// Where the claims came from; a JWT must carry `exp` and `iss`, an introspection response
/// need not (RFC 7662 §2.2 makes every member but `active` optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Jwt,
    Introspection,
}

/// The configured expectations.
#[derive(Debug, Clone)]
pub struct Rules {
    issuer: String,
    audiences: Vec<String>,
    leeway: i64,
    required_scopes: Vec<String>,
    /// `required_scopes` joined by spaces: the `scope` of a 403 (RFC 6750 §3).
    scope_challenge: String,
}

/// Shorthand for a 401 with a fixed description.
pub fn reject(reason: RejectReason, description: &'static str) -> InboundError {
    InboundError::Rejected {
        reason,
        description,
    }
}

impl Rules {
    /// Takes the issuer, audiences, leeway and required scopes from `inbound`.
    pub fn new(config: &Inbound) -> Self {
        let required_scopes: Vec<String> = config
            .required_scopes
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        Self {
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            leeway: i64::try_from(config.leeway.as_secs()).unwrap_or(i64::MAX),
            scope_challenge: required_scopes.join(" "),
            required_scopes,
        }
    }

    /// The clock skew tolerated, in seconds.
    pub fn leeway(&self) -> i64 {
        self.leeway
    }

    /// Checks `claims` at time `now` (seconds since the epoch). The order is fixed: lifetime,
    /// issuer, audience, scope, so that a token with several faults reports the first.
    pub fn check(
        &self,
        claims: &Claims,
        now: i64,
        source: Source,
    ) -> Result<Principal, InboundError> {
        let exp = match (claims.exp, source) {
            (Some(NumericDate(exp)), _) => Some(exp),
            (None, Source::Jwt) => {
                return Err(reject(RejectReason::Malformed, "token has no expiry"));
            }
            (None, Source::Introspection) => None,
        };
        // RFC 7519 §4.1.4: the current time must be before `exp`.
        if let Some(exp) = exp
            && now >= exp.saturating_add(self.leeway)
        {
            return Err(reject(RejectReason::Expired, "token expired"));
        }
        // RFC 7519 §4.1.5: not before `nbf`.
        if let Some(NumericDate(nbf)) = claims.nbf
            && now.saturating_add(self.leeway) < nbf
        {
            return Err(reject(RejectReason::NotYetValid, "token not yet valid"));
        }
        // A token issued in the future comes from a broken clock or a forger.
        if let Some(NumericDate(iat)) = claims.iat
            && iat > now.saturating_add(self.leeway)
        {
            return Err(reject(
                RejectReason::NotYetValid,
                "token issued in the future",
            ));
        }
        // RFC 9068 §4: `iss` must exactly match; no normalisation of a trailing slash.
        match (&claims.iss, source) {
            (Some(iss), _) if *iss == self.issuer => {}
            (None, Source::Introspection) => {}
            _ => return Err(reject(RejectReason::Issuer, "wrong issuer")),
        }
        // RFC 7519 §4.1.3 / RFC 9068 §4: `aud` must name this resource.
        let aud_ok = claims.aud.as_ref().is_some_and(|aud| {
            aud.iter()
                .any(|a| self.audiences.iter().any(|want| want == a))
        });
        if !aud_ok {
            return Err(reject(RejectReason::Audience, "wrong audience"));
        }
        if !self.has_required_scopes(claims) {
            return Err(InboundError::InsufficientScope {
                scope: self.scope_challenge.clone(),
            });
        }
        Ok(Principal {
            sub: claims.sub.as_deref().map(Arc::from),
            expires_at: exp.and_then(|e| u64::try_from(e).ok()),
            // Set by the validator, which knows how long the acceptance may be remembered.
            trusted_until: None,
            key_epoch: 0,
            profile: 0,
        })
    }

    /// True when every required scope is granted by `scope` or `scp`.
    fn has_required_scopes(&self, claims: &Claims) -> bool {
        if self.required_scopes.is_empty() {
            return true;
        }
        let granted: Vec<&str> = [&claims.scope, &claims.scp]
            .into_iter()
            .flatten()
            .flat_map(OneOrMany::iter)
            .flat_map(|s| s.split_ascii_whitespace())
            .collect();
        self.required_scopes
            .iter()
            .all(|want| granted.contains(&want.as_str()))
    }
}

/// Whether a decision may be cached: everything that does not change with time. A token that
/// is expired or not yet valid is decided afresh (the latter will become valid).
pub fn cacheable(decision: &Result<Principal, InboundError>) -> bool {
    match decision {
        Ok(_) => true,
        Err(InboundError::InsufficientScope { .. }) => true,
        Err(InboundError::Rejected { reason, .. }) => matches!(
            reason,
            RejectReason::Issuer | RejectReason::Audience | RejectReason::Inactive
        ),
        Err(InboundError::Unavailable) => false,
    }
}

/// How long a decision about a token expiring at `exp` may be remembered at `now`: until the
/// token's end (plus the leeway it is granted), and never longer than `cap`. `None` when the
/// token is already past it.
pub fn ttl(exp: Option<i64>, leeway: i64, now: i64, cap: Duration) -> Option<Duration> {
    let Some(exp) = exp else { return Some(cap) };
    let left = exp.saturating_add(leeway).saturating_sub(now);
    let left = u64::try_from(left).ok().filter(|s| *s > 0)?;
    Some(Duration::from_secs(left).min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000;

    fn rules(scopes: &[&str]) -> Rules {
        Rules {
            issuer: "https://idp.example.com/realms/mcp".into(),
            audiences: vec!["mcp-server".into(), "other".into()],
            leeway: 30,
            required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
            scope_challenge: scopes.join(" "),
        }
    }

    fn claims(json: serde_json::Value) -> Claims {
        serde_json::from_value(json).expect("claims parse")
    }

    fn good() -> serde_json::Value {
        serde_json::json!({
            "iss": "https://idp.example.com/realms/mcp",
            "sub": "alice",
            "aud": "mcp-server",
            "exp": NOW + 60,
            "iat": NOW,
        })
    }

    fn with(key: &str, value: serde_json::Value) -> Claims {
        let mut j = good();
        j[key] = value;
        claims(j)
    }

    fn without(key: &str) -> Claims {
        let mut j = good();
        j.as_object_mut().expect("object").remove(key);
        claims(j)
    }

    fn reason(r: Result<Principal, InboundError>) -> RejectReason {
        match r {
            Err(InboundError::Rejected { reason, .. }) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn valid_claims_yield_sub_and_expiry() {
        let p = rules(&[])
            .check(&claims(good()), NOW, Source::Jwt)
            .expect("valid");
        assert_eq!(
            p,
            Principal {
                sub: Some("alice".into()),
                expires_at: Some((NOW + 60) as u64),
                trusted_until: None,
                key_epoch: 0,
                profile: 0,
            }
        );
    }

    #[test]
    fn expiry_is_enforced_with_leeway() {
        let r = rules(&[]);
        assert!(
            r.check(&with("exp", (NOW - 29).into()), NOW, Source::Jwt)
                .is_ok()
        );
        assert_eq!(
            reason(r.check(&with("exp", (NOW - 30).into()), NOW, Source::Jwt)),
            RejectReason::Expired
        );
        assert_eq!(
            reason(r.check(&with("exp", (-5).into()), NOW, Source::Jwt)),
            RejectReason::Expired
        );
        assert_eq!(
            reason(r.check(&with("exp", 0.5.into()), NOW, Source::Jwt)),
            RejectReason::Expired
        );
    }

    #[test]
    fn jwt_without_exp_is_malformed_but_introspection_may_omit_it() {
        let r = rules(&[]);
        assert_eq!(
            reason(r.check(&without("exp"), NOW, Source::Jwt)),
            RejectReason::Malformed
        );
        assert!(r.check(&without("exp"), NOW, Source::Introspection).is_ok());
    }

    #[test]
    fn exp_as_string_does_not_parse() {
        let mut j = good();
        j["exp"] = "1900000000".into();
        assert!(serde_json::from_value::<Claims>(j).is_err());
    }

    #[test]
    fn huge_and_fractional_dates_do_not_overflow() {
        let c: Claims =
            serde_json::from_str(r#"{"exp":18446744073709551615,"nbf":1e300,"iat":-1e300}"#)
                .expect("parses");
        assert_eq!(c.exp, Some(NumericDate(i64::MAX)));
        assert_eq!(c.nbf, Some(NumericDate(i64::MAX)));
        assert_eq!(c.iat, Some(NumericDate(i64::MIN)));
        let r = rules(&[]);
        assert_eq!(
            reason(r.check(&c, NOW, Source::Jwt)),
            RejectReason::NotYetValid
        );
    }

    #[test]
    fn nbf_and_iat_in_the_future_are_not_yet_valid() {
        let r = rules(&[]);
        assert!(
            r.check(&with("nbf", (NOW + 30).into()), NOW, Source::Jwt)
                .is_ok()
        );
        assert_eq!(
            reason(r.check(&with("nbf", (NOW + 31).into()), NOW, Source::Jwt)),
            RejectReason::NotYetValid
        );
        assert!(
            r.check(&with("iat", (NOW + 30).into()), NOW, Source::Jwt)
                .is_ok()
        );
        assert_eq!(
            reason(r.check(&with("iat", (NOW + 31).into()), NOW, Source::Jwt)),
            RejectReason::NotYetValid
        );
    }

    #[test]
    fn issuer_must_match_exactly() {
        let r = rules(&[]);
        for bad in [
            "https://idp.example.com/realms/mcp/",
            "https://idp.example.com/realms/MCP",
            "https://idp.example.com/realms/mcp ",
        ] {
            assert_eq!(
                reason(r.check(&with("iss", bad.into()), NOW, Source::Jwt)),
                RejectReason::Issuer,
                "{bad}"
            );
        }
        assert_eq!(
            reason(r.check(&without("iss"), NOW, Source::Jwt)),
            RejectReason::Issuer
        );
        assert!(r.check(&without("iss"), NOW, Source::Introspection).is_ok());
        assert_eq!(
            reason(r.check(
                &with("iss", "https://evil".into()),
                NOW,
                Source::Introspection
            )),
            RejectReason::Issuer
        );
    }

    #[test]
    fn audience_as_string_or_array_must_contain_an_accepted_one() {
        let r = rules(&[]);
        assert!(
            r.check(
                &with("aud", serde_json::json!(["x", "other"])),
                NOW,
                Source::Jwt
            )
            .is_ok()
        );
        for bad in [
            serde_json::json!([]),
            serde_json::json!("x"),
            serde_json::json!(["x", "y"]),
            serde_json::json!(""),
        ] {
            assert_eq!(
                reason(r.check(&with("aud", bad.clone()), NOW, Source::Jwt)),
                RejectReason::Audience,
                "{bad}"
            );
        }
        assert_eq!(
            reason(r.check(&without("aud"), NOW, Source::Jwt)),
            RejectReason::Audience
        );
        assert_eq!(
            reason(r.check(&without("aud"), NOW, Source::Introspection)),
            RejectReason::Audience
        );
        assert!(serde_json::from_value::<Claims>(serde_json::json!({"aud": [1]})).is_err());
    }

    #[test]
    fn every_required_scope_must_be_granted_by_scope_or_scp() {
        let r = rules(&["notes.read", "notes.write"]);
        let ok = [
            with("scope", "openid notes.write  notes.read".into()),
            with("scp", serde_json::json!(["notes.read", "notes.write"])),
            with("scp", "notes.read notes.write".into()),
        ];
        for c in ok {
            assert!(r.check(&c, NOW, Source::Jwt).is_ok(), "{c:?}");
        }
        let missing = [
            with("scope", "notes.read".into()),
            without("scope"),
            with("scope", "notes.readnotes.write".into()),
        ];
        for c in missing {
            assert_eq!(
                r.check(&c, NOW, Source::Jwt),
                Err(InboundError::InsufficientScope {
                    scope: "notes.read notes.write".into()
                })
            );
        }
    }

    #[test]
    fn only_time_independent_decisions_are_cacheable() {
        let r = rules(&["a"]);
        assert!(cacheable(&r.check(
            &with("scope", "a".into()),
            NOW,
            Source::Jwt
        )));
        assert!(cacheable(&r.check(&without("scope"), NOW, Source::Jwt)));
        assert!(cacheable(&r.check(&without("aud"), NOW, Source::Jwt)));
        assert!(!cacheable(&r.check(
            &with("exp", (NOW - 30).into()),
            NOW,
            Source::Jwt
        )));
        assert!(!cacheable(&r.check(
            &with("nbf", (NOW + 99).into()),
            NOW,
            Source::Jwt
        )));
        assert!(!cacheable(&Err(InboundError::Unavailable)));
    }

    #[test]
    fn ttl_ends_with_the_token_and_respects_the_cap() {
        let cap = Duration::from_secs(300);
        assert_eq!(
            ttl(Some(NOW + 60), 30, NOW, cap),
            Some(Duration::from_secs(90))
        );
        assert_eq!(ttl(Some(NOW + 6000), 30, NOW, cap), Some(cap));
        assert_eq!(ttl(Some(NOW - 30), 30, NOW, cap), None);
        assert_eq!(ttl(None, 30, NOW, cap), Some(cap));
    }

    proptest! {
        #[test]
        fn cached_decisions_never_outlive_the_token(exp in any::<i64>(), now in 0i64..4_000_000_000, leeway in 0i64..600, cap in 1u64..100_000) {
            let cap = Duration::from_secs(cap);
            if let Some(t) = ttl(Some(exp), leeway, now, cap) {
                prop_assert!(t <= cap);
                prop_assert!(t > Duration::ZERO);
                prop_assert!(i128::from(now) + i128::from(t.as_secs()) <= i128::from(exp) + i128::from(leeway));
            }
        }
    }
}

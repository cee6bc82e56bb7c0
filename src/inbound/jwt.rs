//! Parsing of a compact JWS (RFC 7515 §7.1) before anything expensive runs.
//!
//! A token is split into exactly three segments; each must be base64url without padding
//! (RFC 7515 §2, "Base64url Encoding"), every decoded JSON text is scanned for nesting depth
//! before serde sees it, and the header is read into a closed struct so duplicate members are
//! refused. Only then may a key be looked up or a signature verified.
//!
//! jsonwebtoken supplies the algorithm names ([`Algorithm`]), and the keys and the signature
//! check ([`super::jwks`]); the header is read here, for the reasons given at [`Header`].

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::claims::Claims;

/// Deeper than any claim set an IdP issues (Keycloak's `resource_access.<client>.roles` is 3);
/// far below serde_json's own recursion limit of 128.
pub const MAX_JSON_DEPTH: usize = 20;

/// Legitimate headers are about 100 bytes; an `x5c` chain may reach a few KiB.
pub const MAX_HEADER_BYTES: usize = 8192;

/// Why a token could not be parsed. Each maps to `malformed`; the text is public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// The three segments of a compact JWS, still encoded.
#[derive(Debug, Clone, Copy)]
pub struct Segments<'a> {
    /// The encoded protected header.
    pub header: &'a str,
    /// The encoded payload.
    pub payload: &'a str,
    /// The encoded signature.
    pub signature: &'a str,
    /// `header.payload`: the JWS Signing Input (RFC 7515 §5.1 step 8).
    pub signing_input: &'a str,
}

/// Splits `token` into three segments, or `None` when it is not a compact JWS at all (two,
/// four or five segments: an opaque token, or a JWE).
pub fn split(token: &str) -> Option<Segments<'_>> {
    let mut it = token.splitn(4, '.');
    let (Some(header), Some(payload), Some(signature), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return None;
    };
    let signing_input = &token[..header.len() + 1 + payload.len()];
    Some(Segments {
        header,
        payload,
        signature,
        signing_input,
    })
}

/// Decodes one segment: base64url alphabet only, no padding, no stray bits.
pub fn decode_segment(segment: &str) -> Result<Vec<u8>, Malformed> {
    if segment.is_empty() || !segment.bytes().all(is_base64url) {
        return Err(Malformed("malformed token"));
    }
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| Malformed("malformed token"))
}

/// The alphabet of RFC 4648 §5.
fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// True when `token` is an RFC 6750 §2.1 `b64token`:
/// `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
pub fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty() && body.bytes().all(|b| B64TOKEN[usize::from(b)])
}

/// The RFC 6750 §2.1 `b64token` alphabet as a lookup table: one load per byte on the hot path.
static B64TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] =
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    table
};

/// True when no array or object in `json` nests deeper than `max`. A linear scan that tracks
/// strings and escapes, so that hostile nesting is refused before a recursive parser runs.
pub fn nesting_within(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// The JOSE header members the proxy reads (RFC 7515 §4.1). Members not listed are ignored;
/// a member listed twice is an error (serde refuses duplicate fields).
///
/// jsonwebtoken's `decode_header` is not used: its `Header` reads `alg` into its enum, so
/// `none` fails to parse instead of being refused as an algorithm; it types every member it
/// does not name as a string, so `{"crit":["x"],"x":true}` fails to parse instead of being
/// refused for its `crit`, and a header with a numeric private member (`"ver":1`), accepted
/// here, would be refused; and it reads `jwk` as a whole key. The rejection reasons would
/// change, and so would the tokens accepted.
#[derive(Debug, Deserialize)]
pub struct Header {
    /// `alg`: required.
    pub alg: String,
    /// `kid`: selects the key in the JWKS.
    pub kid: Option<String>,
    /// `typ`: see [`typ_accepted`].
    pub typ: Option<String>,
    /// `crit`: extensions the recipient must understand (RFC 7515 §4.1.11). The proxy
    /// understands none, so any `crit` is refused.
    pub crit: Option<IgnoredAny>,
    /// `jku` (RFC 7515 §4.1.2): a URL of a JWK Set chosen by the token. Never followed; refused.
    pub jku: Option<IgnoredAny>,
    /// `x5u` (RFC 7515 §4.1.5): a URL of a certificate chosen by the token. Never followed;
    /// refused.
    pub x5u: Option<IgnoredAny>,
    /// `jwk` (RFC 7515 §4.1.3): the key itself, embedded by whoever made the token. Never used;
    /// refused.
    pub jwk: Option<IgnoredAny>,
}

impl Header {
    /// The `alg`, when it names an algorithm the proxy can verify (see [`parse_alg`]).
    pub fn algorithm(&self) -> Option<Algorithm> {
        parse_alg(&self.alg)
    }

    /// The header rules beyond the algorithm, in this order: no key of its own
    /// (RFC 8725 §3.10, [`Header::names_own_key`]), no `crit` (the proxy understands no
    /// extension, RFC 7515 §4.1.11), and a `typ` made for an access token ([`typ_accepted`]).
    pub fn check(&self) -> Result<(), Malformed> {
        if self.names_own_key() {
            return Err(Malformed("token header names its own key"));
        }
        if self.crit.is_some() {
            return Err(Malformed("unsupported critical header"));
        }
        if !typ_accepted(self.typ.as_deref()) {
            return Err(Malformed("token type not accepted"));
        }
        Ok(())
    }

    /// True when the header points at a key outside the issuer's JWKS (`jku`, `x5u`, `jwk`).
    /// `x5c`/`x5t` are ignored instead: they only ever describe a key, and the proxy takes keys
    /// from the JWKS alone.
    pub fn names_own_key(&self) -> bool {
        self.jku.is_some() || self.x5u.is_some() || self.jwk.is_some()
    }
}

/// Decodes and parses the protected header.
pub fn parse_header(segment: &str) -> Result<Header, Malformed> {
    if segment.len() > MAX_HEADER_BYTES.div_ceil(3) * 4 {
        return Err(Malformed("malformed token"));
    }
    let bytes = decode_segment(segment)?;
    parse_json(&bytes)
}

/// Decodes and parses the payload as a JWT claims set (RFC 7519 §7.2 step 10).
pub fn parse_claims(segment: &str) -> Result<Claims, Malformed> {
    let bytes = decode_segment(segment)?;
    parse_json(&bytes)
}

/// Parses a JSON object after the nesting pre-check.
pub fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Malformed> {
    if !nesting_within(bytes, MAX_JSON_DEPTH) {
        return Err(Malformed("malformed token"));
    }
    serde_json::from_slice(bytes).map_err(|_| Malformed("malformed token"))
}

/// The asymmetric algorithms the proxy can verify, by their JWA name (RFC 7518 §3.1), as
/// jsonwebtoken reads them (exact, case-sensitive names). `none` is not one of them, and the
/// HMAC algorithms are dropped: a shared secret cannot prove that the issuer, rather than
/// another holder of the secret, signed a token.
pub fn parse_alg(name: &str) -> Option<Algorithm> {
    name.parse().ok().filter(|alg| is_asymmetric(*alg))
}

/// False for the HMAC algorithms, which are never accepted whatever the configuration says.
pub fn is_asymmetric(alg: Algorithm) -> bool {
    alg.family() != AlgorithmFamily::Hmac
}

/// `typ` values accepted for an access token: absent, `JWT` (RFC 7519 §5.1) or `at+jwt`
/// (RFC 9068 §2.1), compared case-insensitively and with an optional `application/` prefix
/// (RFC 7515 §4.1.9). Anything else (`dpop+jwt`, `logout+jwt`, `secevent+jwt`, …) is a token
/// made for another purpose.
pub fn typ_accepted(typ: Option<&str>) -> bool {
    let Some(typ) = typ else { return true };
    let bare = match typ.get(..12) {
        Some(prefix) if prefix.eq_ignore_ascii_case("application/") => &typ[12..],
        _ => typ,
    };
    bare.eq_ignore_ascii_case("jwt") || bare.eq_ignore_ascii_case("at+jwt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b64token_table_matches_rfc6750_alphabet() {
        for b in 0..=255u8 {
            let expected =
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
            assert_eq!(B64TOKEN[usize::from(b)], expected, "byte {b}");
        }
        assert!(is_b64token("abc.DEF-_~+/=="));
        assert!(!is_b64token("=="));
        assert!(!is_b64token("a b"));
    }
    use proptest::prelude::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn split_accepts_exactly_three_segments() {
        let s = split("aaa.bbb.ccc").expect("three segments");
        assert_eq!(
            (s.header, s.payload, s.signature, s.signing_input),
            ("aaa", "bbb", "ccc", "aaa.bbb")
        );
        assert!(split("aaa.bbb").is_none());
        assert!(split("a.b.c.d").is_none());
        assert!(split("a.b.c.d.e").is_none());
        assert!(split("opaque").is_none());
    }

    #[test]
    fn segments_must_be_unpadded_base64url() {
        assert_eq!(decode_segment(&b64("{}")).expect("valid"), b"{}");
        assert!(decode_segment("e30=").is_err(), "padding");
        assert!(decode_segment("e3+/").is_err(), "standard alphabet");
        assert!(decode_segment("e3 0").is_err(), "space");
        assert!(decode_segment("").is_err(), "empty");
        // "e31" decodes "{}" plus non-zero trailing bits: a second encoding of the same bytes.
        assert!(decode_segment("e31").is_err(), "trailing bits");
    }

    #[test]
    fn b64token_charset_follows_rfc6750() {
        assert!(is_b64token("abc.DEF-_~+/=="));
        assert!(!is_b64token(""));
        assert!(!is_b64token("=="));
        assert!(!is_b64token("a=b"));
        assert!(!is_b64token("a b"));
        assert!(!is_b64token("a\"b"));
        assert!(!is_b64token("é"));
    }

    #[test]
    fn nesting_scan_counts_only_structure_outside_strings() {
        assert!(nesting_within(br#"{"a":{"b":[1,2,{"c":3}]}}"#, 4));
        assert!(!nesting_within(br#"{"a":{"b":[1,2,{"c":3}]}}"#, 3));
        assert!(nesting_within(br#"{"a":"[[[[[[[[\"[[[["}"#, 1));
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(!nesting_within(deep.as_bytes(), MAX_JSON_DEPTH));
    }

    #[test]
    fn deeply_nested_claims_are_malformed() {
        let deep = format!(r#"{{"exp":1,"x":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        assert!(parse_claims(&b64(&deep)).is_err());
        let fine = format!(r#"{{"exp":1,"x":{}1{}}}"#, "[".repeat(5), "]".repeat(5));
        assert!(parse_claims(&b64(&fine)).is_ok());
    }

    #[test]
    fn header_with_duplicate_alg_is_refused() {
        assert!(parse_header(&b64(r#"{"alg":"RS256","alg":"none"}"#)).is_err());
        assert!(parse_header(&b64(r#"{"alg":"RS256","kid":"k"}"#)).is_ok());
        assert!(
            parse_header(&b64(r#"{"kid":"k"}"#)).is_err(),
            "alg is required"
        );
        assert!(parse_header(&b64(r#"["alg"]"#)).is_err(), "not an object");
        assert!(
            parse_header(&b64(r#"{"alg":"RS256","kid":7}"#)).is_err(),
            "kid not a string"
        );
    }

    #[test]
    fn header_key_references_are_detected() {
        for member in [
            r#""jku":"https://evil""#,
            r#""x5u":"https://evil""#,
            r#""jwk":{"kty":"RSA"}"#,
        ] {
            let h = parse_header(&b64(&format!(r#"{{"alg":"RS256",{member}}}"#))).expect("parses");
            assert!(h.names_own_key(), "{member}");
        }
        let h =
            parse_header(&b64(r#"{"alg":"RS256","x5c":["MIIB"],"x5t":"abc"}"#)).expect("parses");
        assert!(!h.names_own_key());
    }

    /// A header's verdict: the algorithm (or `None`), then the rules of [`Header::check`].
    fn verdict(json: &str) -> (Option<Algorithm>, Result<(), Malformed>) {
        let h = parse_header(&b64(json)).expect("parses");
        (h.algorithm(), h.check())
    }

    #[test]
    fn header_rules_refuse_own_keys_crit_and_other_types() {
        let refused = |why| (Some(Algorithm::RS256), Err(Malformed(why)));
        for (json, want) in [
            (
                r#"{"alg":"RS256","kid":"k","typ":"at+jwt"}"#,
                (Some(Algorithm::RS256), Ok(())),
            ),
            (
                r#"{"alg":"RS256","ver":1,"x5c":[1],"cty":5}"#,
                (Some(Algorithm::RS256), Ok(())),
            ),
            (r#"{"alg":"none"}"#, (None, Ok(()))),
            (r#"{"alg":"HS256"}"#, (None, Ok(()))),
            (
                r#"{"alg":"RS256","jku":"https://evil/jwks"}"#,
                refused("token header names its own key"),
            ),
            (
                r#"{"alg":"RS256","x5u":{"not":"a string"}}"#,
                refused("token header names its own key"),
            ),
            (
                r#"{"alg":"RS256","jwk":{"kty":"RSA"}}"#,
                refused("token header names its own key"),
            ),
            (
                r#"{"alg":"RS256","crit":["x"],"x":true}"#,
                refused("unsupported critical header"),
            ),
            (
                r#"{"alg":"RS256","crit":[]}"#,
                refused("unsupported critical header"),
            ),
            (
                r#"{"alg":"RS256","typ":"dpop+jwt"}"#,
                refused("token type not accepted"),
            ),
            // The order of the rules: an own key first, then `crit`, then `typ`.
            (
                r#"{"alg":"RS256","typ":"x","crit":["x"],"jku":"u"}"#,
                refused("token header names its own key"),
            ),
            (
                r#"{"alg":"RS256","typ":"x","crit":["x"]}"#,
                refused("unsupported critical header"),
            ),
        ] {
            assert_eq!(verdict(json), want, "{json}");
        }
    }

    /// What [`Header`] says about jsonwebtoken's own header: these parse here and are refused
    /// (or accepted) for their content, but jsonwebtoken cannot read them at all.
    #[test]
    fn jsonwebtoken_cannot_read_headers_the_proxy_judges() {
        for json in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"RS256","crit":["x"],"x":true}"#,
            r#"{"alg":"RS256","ver":1}"#,
        ] {
            assert!(parse_header(&b64(json)).is_ok(), "{json}");
            let token = format!("{}.e30.AAAA", b64(json));
            assert!(jsonwebtoken::decode_header(&token).is_err(), "{json}");
        }
    }

    #[test]
    fn only_asymmetric_algorithms_parse() {
        assert_eq!(parse_alg("RS256"), Some(Algorithm::RS256));
        assert_eq!(parse_alg("EdDSA"), Some(Algorithm::EdDSA));
        for good in [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
        ] {
            assert!(parse_alg(good).is_some_and(is_asymmetric), "{good}");
        }
        for bad in [
            "none", "None", "HS256", "HS384", "HS512", "rs256", "ES512", "",
        ] {
            assert_eq!(parse_alg(bad), None, "{bad}");
        }
    }

    #[test]
    fn typ_accepts_jwt_and_at_jwt_only() {
        for ok in [
            None,
            Some("JWT"),
            Some("jwt"),
            Some("at+jwt"),
            Some("AT+JWT"),
            Some("application/at+jwt"),
            Some("Application/JWT"),
        ] {
            assert!(typ_accepted(ok), "{ok:?}");
        }
        for bad in [
            "dpop+jwt",
            "logout+jwt",
            "JWE",
            "",
            "application/",
            "application/json",
            "at+jwt ",
        ] {
            assert!(!typ_accepted(Some(bad)), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics_the_parsers(s in ".{0,300}") {
            let _ = split(&s).map(|seg| (parse_header(seg.header).is_ok(), parse_claims(seg.payload).is_ok()));
            let _ = is_b64token(&s);
        }

        #[test]
        fn decoding_round_trips_exactly(bytes in proptest::collection::vec(any::<u8>(), 1..200)) {
            let enc = URL_SAFE_NO_PAD.encode(&bytes);
            prop_assert_eq!(decode_segment(&enc).expect("valid"), bytes);
        }
    }
}

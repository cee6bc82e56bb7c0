//! One AFL++ harness for every fuzz target of `token_exchange_proxy::fuzzing::TARGETS`: the
//! target's name is the only argument (`txp-fuzz jwks`), its corpus is `fuzz/corpus/<name>/`.
//! Built and run by `scripts/fuzz.sh` (README "Reliability").

use std::process::ExitCode;

use token_exchange_proxy::fuzzing::TARGETS;

fn main() -> ExitCode {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some((_, target)) = TARGETS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: txp-fuzz <{}>", names.join("|"));
        return ExitCode::from(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
    ExitCode::SUCCESS
}

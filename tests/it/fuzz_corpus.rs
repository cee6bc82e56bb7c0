//! The fuzz targets (README "Reliability") on plain `cargo test`: every input of the corpus
//! kept in `fuzz/corpus/<target>/` (seeds, inputs the fuzzer found interesting, and every
//! input that once crashed a parser) goes through its target again, and random bytes too.

use proptest::prelude::*;
use token_exchange_proxy::fuzzing::TARGETS;

/// The corpus directory of `target`.
fn corpus(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
fn every_corpus_input_goes_through_its_target() {
    for (name, target) in TARGETS {
        let mut inputs = 0;
        for entry in std::fs::read_dir(corpus(name)).expect("corpus directory") {
            let path = entry.expect("entry").path();
            let data = std::fs::read(&path).expect("read input");
            target(&data);
            inputs += 1;
        }
        assert!(inputs > 0, "no corpus for {name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic_a_parser(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        for (_, target) in TARGETS {
            target(&data);
        }
    }
}

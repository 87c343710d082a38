#![no_main]
// A whole session against real servants, bytes arriving in pieces. Corpus: fuzz/corpus/session.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fae::fuzzing::session(data));

#![no_main]
// The header transports' frame parser (THeader, TTHeader): frame, info headers, payload, and the session's
// walk of the same bytes. Corpus: fuzz/corpus/header_decode.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fae::fuzzing::header(data));

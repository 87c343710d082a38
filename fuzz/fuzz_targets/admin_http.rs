#![no_main]
// Admin HTTP requests as the admin port parses them. Corpus: fuzz/corpus/admin_http.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fae::fuzzing::admin_http(data));

#![no_main]
// memcached and Redis replies as a back-end connection parses them. Corpus: fuzz/corpus/backend_replies.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fae::fuzzing::backend_replies(data));

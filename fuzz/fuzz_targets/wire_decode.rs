#![no_main]
// The wire decoder on arbitrary bytes: scan, header, arguments. Corpus: fuzz/corpus/wire_decode.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fae::fuzzing::wire(data));

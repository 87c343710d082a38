#![no_main]
// The compact protocol's decoder: arbitrary bytes after a compact message's first byte, unframed and framed
// (scan, header, arguments, the resumable walk). Corpus: fuzz/corpus/compact_decode.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fae::fuzzing::compact(data));

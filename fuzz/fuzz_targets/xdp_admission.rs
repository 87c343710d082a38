#![no_main]
// IPv4 packets as the XDP path's device hands them to its admission (SYN budget, handshakes, other queues'
// connections) before smoltcp. Corpus: fuzz/corpus/xdp_admission.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fae_netstack::fuzzing::admission(data));

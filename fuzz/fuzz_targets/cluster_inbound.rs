#![no_main]
// Bytes on the cluster port: frames, raft messages, cluster RPC, handshake. Corpus: fuzz/corpus/cluster_inbound.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fae_cluster::fuzzing::inbound(data));

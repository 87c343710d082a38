//! Replays the cargo-fuzz corpus of the cluster port (fuzz/corpus/cluster_inbound) through the fuzz target's
//! own entry point, so every input the fuzzer kept is re-checked on every test run.

#[test]
fn cluster_inbound_corpus() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/cluster_inbound");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
        fae_cluster::fuzzing::inbound(&data);
        n += 1;
    }
    assert!(n >= 10, "{}: only {n} corpus inputs", dir.display());
    println!("cluster_inbound: replayed {n} inputs");
}

//! Replays the cargo-fuzz corpus of the XDP path's admission (fuzz/corpus/xdp_admission) through the fuzz
//! target's own entry point, so every input the fuzzer kept is re-checked on every test run.

#[test]
fn xdp_admission_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/xdp_admission");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
        fae_netstack::fuzzing::admission(&data);
        n += 1;
    }
    assert!(n >= 10, "{}: only {n} corpus inputs", dir.display());
    println!("xdp_admission: replayed {n} inputs");
}

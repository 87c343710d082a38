//! Replays the cargo-fuzz corpora (fuzz/corpus/*) through the fuzz targets' own entry points, so every input
//! the fuzzer kept is re-checked on every test run.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        run(&data);
        n += 1;
    }
    assert!(n >= 10, "{}: only {n} corpus inputs", dir.display());
    println!("{target}: replayed {n} inputs");
}

#[test]
fn wire_decode_corpus() {
    replay("wire_decode", fae::fuzzing::wire);
}

#[test]
fn compact_decode_corpus() {
    replay("compact_decode", fae::fuzzing::compact);
}

#[test]
fn header_decode_corpus() {
    replay("header_decode", fae::fuzzing::header);
}

#[test]
fn session_corpus() {
    replay("session", fae::fuzzing::session);
}

#[test]
fn backend_replies_corpus() {
    replay("backend_replies", fae::fuzzing::backend_replies);
}

#[test]
fn admin_http_corpus() {
    replay("admin_http", fae::fuzzing::admin_http);
}

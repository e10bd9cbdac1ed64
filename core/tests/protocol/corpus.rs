//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same drivers the
//! `cargo fuzz` targets call (`nowconnect_core::fuzzing`), on stable, under plain `cargo test`
//! (STYLE.md habit 9). A failing file names itself; reproduce it with
//! `cargo +nightly fuzz run <target> fuzz/corpus/<target>/<file>`.

use std::path::PathBuf;

use nowconnect_core::fuzzing;

/// Runs `driver` on every file of `fuzz/corpus/<target>/`; returns how many there were.
fn replay(target: &str, driver: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let run = std::panic::catch_unwind(|| driver(&data));
        assert!(run.is_ok(), "{target}: {} failed", path.display());
    }
    files.len()
}

#[test]
fn frame_decode_corpus() {
    let n = replay("frame_decode", fuzzing::frame_decode);
    // Every vector of vectors.txt is a seed, so the corpus can only be larger.
    assert!(n >= 40, "frame_decode corpus has only {n} files");
}

#[test]
fn session_corpus() {
    let n = replay("session", fuzzing::session);
    assert!(n >= 10, "session corpus has only {n} files");
}

#[test]
fn pair_corpus() {
    let n = replay("pair", fuzzing::pair);
    assert!(n >= 8, "pair corpus has only {n} files");
}

/// The drivers accept anything, including nothing.
#[test]
fn drivers_accept_empty_and_tiny_inputs() {
    for data in [&[][..], &[0], &[1], &[0xFF], &[7, 0, 0, 0]] {
        fuzzing::frame_decode(data);
        fuzzing::session(data);
        fuzzing::pair(data);
    }
}

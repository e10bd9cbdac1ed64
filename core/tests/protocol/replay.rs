//! Deterministic replay (STYLE.md habit 7): every transcript under `core/tests/transcripts/`
//! is fed to a fresh session and must give exactly the outputs written in it — transmitted
//! messages byte for byte — and the same bytes again on a second run.
//!
//! The format is documented in `core/src/transcript.rs`. After an intended behaviour change,
//! regenerate the expected outputs with
//! `NOWCONNECT_BLESS=1 cargo test -p nowconnect-core --test protocol replay`
//! and review the diff: the committed files are the contract.

use std::path::PathBuf;

use nowconnect_core::frame::Frame;
use nowconnect_core::transcript::{encode_text_frame, render_frame, Output, Transcript};

fn transcripts() -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

fn bless() -> bool {
    std::env::var_os("NOWCONNECT_BLESS").is_some_and(|v| v != "0")
}

#[test]
fn replay_transcripts() {
    let files = transcripts();
    assert!(
        files.len() >= 8,
        "expected at least 8 transcripts, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for (path, text) in &files {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let t = match Transcript::parse(text) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{name}: parse: {e}"));
                continue;
            }
        };
        let outputs = match t.run() {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if bless() {
            let new = t.render(&outputs);
            if new != *text {
                std::fs::write(path, &new).unwrap_or_else(|e| panic!("{name}: {e}"));
                eprintln!("blessed {name}");
            }
            // A blessed file must pass as written.
            let again = Transcript::parse(&new).and_then(|t2| t2.check(&outputs));
            if let Err(e) = again {
                failures.push(format!("{name}: blessed text does not round-trip: {e}"));
            }
        } else if let Err(e) = t.check(&outputs) {
            failures.push(format!(
                "{name}: {e}\n(if the change is intended: NOWCONNECT_BLESS=1 cargo test -p \
                 nowconnect-core --test protocol replay, then review the diff)"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// Same inputs, same outputs: a second run of every transcript gives identical bytes and events.
#[test]
fn replay_is_deterministic() {
    for (path, text) in transcripts() {
        let t = Transcript::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let first = t
            .run()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let second = t
            .run()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(first, second, "{}: two runs differ", path.display());
        let bytes = |o: &[Vec<Output>]| -> Vec<u8> {
            o.iter()
                .flatten()
                .filter_map(|x| match x {
                    Output::Tx(m) => Some(m.as_slice()),
                    _ => None,
                })
                .flatten()
                .copied()
                .collect()
        };
        assert_eq!(
            bytes(&first),
            bytes(&second),
            "{}: transmitted bytes differ",
            path.display()
        );
    }
}

/// The canonical text of every frame kind re-encodes to the codec's bytes.
#[test]
fn replay_frame_text_round_trips() {
    let frames = [
        Frame::Open {
            cid: 7,
            connector: "ldap",
            peer: "[::1]:5000",
        },
        Frame::OpenOk {
            cid: 7,
            backend: "",
        },
        Frame::Data {
            cid: 7,
            seq: 3,
            payload: b"a\"b\\c\n\x00\xff",
        },
        Frame::Data {
            cid: 1,
            seq: 0,
            payload: &[0x61; 300],
        },
        Frame::Window {
            cid: 7,
            increment: 1,
        },
        Frame::Rst {
            cid: 7,
            code: 999,
            reason: "caf\u{e9}",
        },
        Frame::Ping { opaque: u64::MAX },
        Frame::GoAway {
            code: 11,
            last_cid: 9,
            reason: "",
        },
        Frame::Renew { token: "e.y.J" },
    ];
    for f in frames {
        let text = render_frame(&f);
        let mut want = Vec::new();
        f.encode(&mut want);
        let mut got = Vec::new();
        encode_text_frame(&text, &mut got).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(got, want, "{text}");
    }
}

/// Mistakes in a transcript are reported with their line, not run.
#[test]
fn replay_rejects_malformed_transcripts() {
    let cases = [
        ("@10 recv PING opaque=1\n", "`new` must be the first input"),
        ("@10 new hub\n@5 timeout\n", "line 2: time goes backwards"),
        (
            "@0 new hub\nconfig window=1\n",
            "line 2: headers go before `new`",
        ),
        ("config windw=1\n@0 new hub\n", "unknown config key `windw`"),
        ("> tx PING opaque=1\n", "output line before any input"),
        (
            "@0 new hub\n@1 timeout\n    + PING opaque=1\n",
            "`+` continues `recv` or `cmd` only",
        ),
        (
            "@0 new hub\n@1 recv DATA cid=1 seq=0 \"x\n",
            "unterminated string",
        ),
        (
            "@0 new hub\n@1 cmd send 1 \"x\" extra\n",
            "unexpected `extra`",
        ),
        ("", "no `@<ms> new hub|agent` line"),
    ];
    for (text, want) in cases {
        match Transcript::parse(text) {
            Ok(_) => panic!("parsed: {text:?}"),
            Err(e) => assert!(e.contains(want), "{text:?}: got `{e}`, want `{want}`"),
        }
    }
    // A transcript whose expected `tx` line is missing a frame fails the check.
    let t = Transcript::parse(
        "@0 new hub\n> timer @10000\n@1 recv HELLO {\"agent_id\":\"a\",\"connectors\":[\"l\"]}\n\
         @1 cmd accept_hello {\"session\":\"s\",\"accepted\":[\"l\"]}\n> tx PING opaque=1\n",
    )
    .expect("parses");
    let out = t.run().expect("runs");
    let err = t.check(&out).expect_err("must not match");
    assert!(err.contains("line 3"), "{err}");
}

//! The bad-line policies: what a run stops at, reports, or only counts, and in which order a
//! worker meets bad lines.

use super::*;

#[test]
fn fail_policy_stops_at_a_bad_line() {
    let config = EngineConfig {
        bad_lines: BadLinePolicy::Fail,
        ..EngineConfig::default()
    };
    let sink = Record::default();
    let err = sum_range(&b"1 1\n2 x\n"[..], 0..8, &config, &pool(1), &sink).unwrap_err();
    match err {
        EngineError::BadLine(bad) => {
            assert_eq!((bad.offset, bad.reason), (4, Reason::NonDigit));
            assert_eq!(bad.raw, b"2 x");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A sink that keeps the offsets of the bad lines in the order they came.
#[derive(Default)]
struct BadOrder(Mutex<Vec<u64>>);

impl Sink for BadOrder {
    fn sums(&self, _: Vec<(i64, i64)>) -> Result<(), Stopped> {
        Ok(())
    }
    fn bad_line(&self, bad: BadLine) -> Result<(), Stopped> {
        self.0.lock().unwrap().push(bad.offset);
        Ok(())
    }
}

#[test]
fn one_worker_meets_bad_lines_in_file_order() {
    // A worker parses the two halves of a chunk side by side; bad lines in either half must
    // still reach the sink (and stop a Fail run) in file order.
    let mut data = Vec::new();
    let mut bad = Vec::new();
    for i in 0..4000 {
        if [5, 1900, 2100, 2101, 3999].contains(&i) || i % 700 == 650 {
            bad.push(data.len() as u64);
            data.extend_from_slice(b"x y\n");
        } else {
            data.extend_from_slice(format!("{i} {i}\n").as_bytes());
        }
    }
    for chunk_bytes in [1 << 20, 4096, 1000] {
        let config = EngineConfig {
            chunk_bytes,
            ..EngineConfig::default()
        };
        let sink = BadOrder::default();
        sum_range(&data[..], 0..data.len() as u64, &config, &pool(1), &sink).unwrap();
        assert_eq!(
            *sink.0.lock().unwrap(),
            bad,
            "chunks of {chunk_bytes} bytes"
        );
        let config = EngineConfig {
            bad_lines: BadLinePolicy::Fail,
            ..config
        };
        // From the middle of the file: the first bad line at or after it.
        let from = data.len() as u64 / 2;
        let first = *bad.iter().find(|&&b| b >= from).unwrap();
        match sum_range(&data[..], from..data.len() as u64, &config, &pool(1), &sink) {
            Err(EngineError::BadLine(bad)) => assert_eq!(bad.offset, first),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn skip_policy_counts_without_reporting() {
    let config = EngineConfig {
        bad_lines: BadLinePolicy::Skip,
        ..EngineConfig::default()
    };
    let sink = Record::default();
    let stats = sum_range(&b"1 1\nx\n\n"[..], 0..7, &config, &pool(1), &sink).unwrap();
    assert_eq!((stats.lines, stats.bad_lines), (3, 2));
    assert!(sink.bad.lock().unwrap().is_empty());
}

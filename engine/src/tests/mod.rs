//! Property tests: for random inputs (well-formed and with garbage), any split into units, any
//! thread count, chunk size and key cap give exactly the sums and bad-line counts of a simple
//! reference parser; so does the streaming path with any block size.

mod bad_lines;

use std::collections::BTreeMap;
use std::sync::Mutex;

use proptest::prelude::*;

use super::*;
use crate::stream::sum_reader;
use crate::worker::PREFETCH_LINES;
use tally_model::sums::agg;

/// What the reference and the engine must agree on.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    totals: BTreeMap<i64, i128>,
    lines: u64,
    bad: BTreeMap<u64, Reason>,
}

/// The reference: split on LF, classify each line plainly, sum in i128.
fn reference(data: &[u8], line_bytes_max: usize) -> Outcome {
    let mut out = Outcome::default();
    let mut offset = 0u64;
    let mut pieces: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if data.ends_with(b"\n") || data.is_empty() {
        pieces.pop();
    }
    for line in pieces {
        out.lines += 1;
        match classify(line, line_bytes_max) {
            Ok((id, amount)) => *out.totals.entry(id).or_default() += i128::from(amount),
            Err(reason) => {
                out.bad.insert(offset, reason);
            }
        }
        offset += line.len() as u64 + 1;
    }
    out
}

fn classify(line: &[u8], max: usize) -> Result<(i64, i64), Reason> {
    if line.len() > max {
        return Err(Reason::TooLong);
    }
    let line = if line.last() == Some(&b'\r') {
        &line[..line.len() - 1]
    } else {
        line
    };
    if line.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
        return Err(Reason::Binary);
    }
    if line.is_empty() {
        return Err(Reason::Empty);
    }
    let text = String::from_utf8_lossy(line);
    if text.contains('\t') || text.starts_with(' ') || text.ends_with(' ') || text.contains("  ") {
        return Err(Reason::Whitespace);
    }
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.len() {
        1 => return Err(Reason::MissingField),
        2 => {}
        _ => return Err(Reason::ExtraField),
    }
    let mut values = [0i64; 2];
    for (value, field) in values.iter_mut().zip(&fields) {
        if field.starts_with(['+', '-']) {
            return Err(Reason::Sign);
        }
        if !field.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Reason::NonDigit);
        }
        *value = field.parse().map_err(|_| Reason::OutOfRange)?;
    }
    Ok((values[0], values[1]))
}

/// A sink that records everything.
#[derive(Default)]
struct Record {
    totals: Mutex<BTreeMap<i64, i128>>,
    bad: Mutex<BTreeMap<u64, Reason>>,
    largest_batch: Mutex<usize>,
}

impl Sink for Record {
    fn sums(&self, batch: Vec<(i64, i64)>) -> Result<(), Stopped> {
        let mut largest = self.largest_batch.lock().unwrap();
        *largest = (*largest).max(batch.len());
        let mut totals = self.totals.lock().unwrap();
        for (id, sum) in batch {
            *totals.entry(id).or_default() += i128::from(sum);
        }
        Ok(())
    }
    fn bad_line(&self, bad: BadLine) -> Result<(), Stopped> {
        assert!(bad.raw.len() <= EngineConfig::RAW_BYTES_MAX);
        assert!(
            self.bad
                .lock()
                .unwrap()
                .insert(bad.offset, bad.reason)
                .is_none(),
            "reported twice"
        );
        Ok(())
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// The engine's outcome over units cut at `cuts`; with `held`, the units' sums stay in the
/// workers' maps ([`sum_range_held`]) and leave once at the end.
fn engine_outcome(
    data: &[u8],
    cuts: &[usize],
    config: &EngineConfig,
    threads: usize,
    held: bool,
) -> Outcome {
    let sink = Record::default();
    let maps = Held::new();
    let pool = pool(threads);
    let mut bounds: Vec<u64> = cuts.iter().map(|&c| (c.min(data.len())) as u64).collect();
    bounds.push(0);
    bounds.push(data.len() as u64);
    bounds.sort_unstable();
    bounds.dedup();
    let mut lines = 0;
    let mut bad_lines = 0;
    for unit in bounds.windows(2) {
        let stats = if held {
            sum_range_held(data, unit[0]..unit[1], config, &pool, &sink, &maps).unwrap()
        } else {
            sum_range(data, unit[0]..unit[1], config, &pool, &sink).unwrap()
        };
        assert_eq!(stats.bytes, unit[1] - unit[0]);
        lines += stats.lines;
        bad_lines += stats.bad_lines;
    }
    maps.flush(&pool, &sink).unwrap();
    assert!(maps.is_empty());
    let bad = sink.bad.into_inner().unwrap();
    assert_eq!(
        bad_lines,
        bad.len() as u64,
        "every bad line counted and reported"
    );
    let per_worker = (config.keys_max / threads).max(1);
    assert!(
        // Memory bound: what is held (≤ keys_max) plus one batch of about emit_at sums and at
        // most one drained table or partition.
        *sink.largest_batch.lock().unwrap()
            <= 2 * per_worker.min(1 << 16) + per_worker / agg::PARTITIONS + 64,
        "bounded batches"
    );
    Outcome {
        totals: sink.totals.into_inner().unwrap(),
        lines,
        bad,
    }
}

/// One line of a random file.
fn line() -> impl Strategy<Value = Vec<u8>> {
    let number = prop_oneof![
        6 => (0u64..100).prop_map(|n| n.to_string()),
        2 => (0u64..20_000_000).prop_map(|n| n.to_string()),
        1 => Just(i64::MAX.to_string()),
        1 => (i64::MAX as u64 - 3..=i64::MAX as u64 + 3).prop_map(|n| n.to_string()),
        1 => "[0-9]{1,22}",
    ];
    let good = (number.clone(), number.clone(), prop::bool::weighted(0.2))
        .prop_map(|(a, b, crlf)| format!("{a} {b}{}", if crlf { "\r" } else { "" }).into_bytes());
    let garbage = prop_oneof![
        Just(Vec::new()),
        Just(b"\r".to_vec()),
        "[ 0-9a-z+\\-\t\r]{1,12}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>().prop_filter("no LF", |b| *b != b'\n'), 1..12),
        "[0-9]{1,3}( [0-9]{1,3}){2,3}".prop_map(String::into_bytes),
        "[0-9]{1,3} [0-9]{1,3}\r[0-9a-z \r]{1,3}".prop_map(String::into_bytes),
        "[0-9]{1,9}[ \t]{1,2}[0-9]{1,9}[ \t]{0,2}".prop_map(String::into_bytes),
        Just("1 \u{0663}".as_bytes().to_vec()),
        Just("1\u{a0}2".as_bytes().to_vec()),
        Just(b"12 34\x00".to_vec()),
        (40usize..120).prop_map(|n| vec![b'7'; n]),
    ];
    prop_oneof![8 => good, 2 => garbage]
}

fn file() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(line(), 0..200), any::<bool>()).prop_map(|(lines, final_lf)| {
        let mut data = lines.join(&b'\n');
        if final_lf && !data.is_empty() {
            data.push(b'\n');
        }
        data
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_split_matches_the_reference(
        data in file(),
        cuts in prop::collection::vec(0usize..4000, 0..6),
        threads in 1usize..4,
        chunk_bytes in 1usize..200,
        keys_max in 1usize..12,
        line_bytes_max in 40usize..70,
        held in any::<bool>(),
    ) {
        let config = EngineConfig { keys_max, line_bytes_max, chunk_bytes, bad_lines: BadLinePolicy::DeadLetter };
        let expected = reference(&data, line_bytes_max);
        let got = engine_outcome(&data, &cuts, &config, threads, held);
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn streaming_matches_the_reference(
        data in file(),
        block_bytes in 1usize..400,
        threads in 1usize..3,
    ) {
        let config = EngineConfig { keys_max: 5, line_bytes_max: 40, chunk_bytes: 64, bad_lines: BadLinePolicy::DeadLetter };
        let expected = reference(&data, 40);
        let sink = Record::default();
        let stats = sum_reader(&data[..], &config, &pool(threads), &sink, block_bytes).unwrap();
        prop_assert_eq!(stats.bytes, data.len() as u64);
        let got = Outcome { totals: sink.totals.into_inner().unwrap(), lines: stats.lines, bad: sink.bad.into_inner().unwrap() };
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn empty_input_and_missing_final_newline() {
    let config = EngineConfig::default();
    assert_eq!(
        engine_outcome(b"", &[], &config, 2, false),
        Outcome::default()
    );
    let got = engine_outcome(b"5 1\n5 2", &[], &config, 2, false);
    assert_eq!(got.totals, BTreeMap::from([(5, 3)]));
    assert_eq!(got.lines, 2);
    let got = engine_outcome(b"5 1\r\n6 2\r\n", &[3], &config, 1, false);
    assert_eq!(got.totals, BTreeMap::from([(5, 1), (6, 2)]));
}

#[test]
fn every_pair_is_added_whatever_the_number_of_lines_per_chunk() {
    // Pairs are added a few lines after their parse (PREFETCH_LINES): chunks with fewer lines
    // than that, exactly that many, and many more must all add every pair, across bad lines
    // (the careful path) and 13-digit ids in between.
    for lines in [
        1,
        PREFETCH_LINES - 1,
        PREFETCH_LINES,
        PREFETCH_LINES + 1,
        1000,
    ] {
        let mut data = Vec::new();
        let mut expected = Outcome::default();
        for i in 0..lines as i64 {
            let id = i % 7;
            if i % 5 == 3 {
                data.extend_from_slice(format!("{} {}\n", 1_000_000_000_000 + id, i).as_bytes());
                *expected.totals.entry(1_000_000_000_000 + id).or_default() += i128::from(i);
            } else {
                data.extend_from_slice(format!("{id} {i}\n").as_bytes());
                *expected.totals.entry(id).or_default() += i128::from(i);
            }
            if i % 11 == 10 {
                data.extend_from_slice(b"bad\n");
            }
        }
        for chunk_bytes in [16, 64, 1 << 20] {
            let config = EngineConfig {
                chunk_bytes,
                ..EngineConfig::default()
            };
            let got = engine_outcome(&data, &[], &config, 1, false);
            assert_eq!(
                got.totals, expected.totals,
                "{lines} lines, {chunk_bytes}-byte chunks"
            );
        }
    }
}

#[test]
fn one_huge_line_is_one_bad_line() {
    let mut data = vec![b'1'; 5 << 20];
    data.extend_from_slice(b"\n1 1\n");
    let config = EngineConfig {
        chunk_bytes: 1 << 20,
        ..EngineConfig::default()
    };
    let got = engine_outcome(&data, &[100, 3 << 20], &config, 2, false);
    assert_eq!(got.lines, 2);
    assert_eq!(got.bad, BTreeMap::from([(0, Reason::TooLong)]));
    assert_eq!(got.totals, BTreeMap::from([(1, 1)]));
}

#[test]
fn partial_sums_split_instead_of_overflowing() {
    let line = format!("3 {}\n", i64::MAX);
    let data = line.repeat(5);
    let got = engine_outcome(data.as_bytes(), &[], &EngineConfig::default(), 1, false);
    assert_eq!(got.totals, BTreeMap::from([(3, 5 * i128::from(i64::MAX))]));
}

#[test]
fn memory_is_bounded_by_keys_max() {
    // 10,000 distinct consumers through a cap of 100 keys: no batch exceeds the cap.
    let data: String = (0..10_000).map(|i| format!("{i} 1\n")).collect();
    let config = EngineConfig {
        keys_max: 100,
        ..EngineConfig::default()
    };
    let sink = Record::default();
    let stats = sum_range(
        data.as_bytes(),
        0..data.len() as u64,
        &config,
        &pool(2),
        &sink,
    )
    .unwrap();
    assert!(*sink.largest_batch.lock().unwrap() <= 100);
    assert!(stats.batches >= 100);
    assert_eq!(sink.totals.lock().unwrap().len(), 10_000);
}

#[test]
fn partitioned_aggregation_matches_the_reference() {
    // 400k distinct consumers, each on several lines, past the direct table's 256k keys in
    // each worker: the workers switch to partitions; with keys_max 350k partitions also flush
    // on their own, and with 100k the direct table does.
    let mut data = String::new();
    let mut x: u64 = 1;
    for _ in 0..1_600_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let id = (x >> 33) % 400_000;
        data.push_str(&format!("{id} {}\n", x % 1000));
    }
    let expected = reference(data.as_bytes(), 4096);
    const { assert!(agg::DIRECT_KEYS_MAX < 340_000) };
    for (keys_max, threads) in [(350_000, 1), (50_000_000, 2), (100_000, 2)] {
        let config = EngineConfig {
            keys_max,
            chunk_bytes: 1 << 20,
            ..EngineConfig::default()
        };
        for held in [false, true] {
            let got = engine_outcome(data.as_bytes(), &[8_000_000], &config, threads, held);
            assert_eq!(
                got, expected,
                "keys_max {keys_max}, {threads} threads, held {held}"
            );
        }
    }
}

/// A sink that counts the pairs it receives.
#[derive(Default)]
struct Count(std::sync::atomic::AtomicUsize);

impl Sink for Count {
    fn sums(&self, batch: Vec<(i64, i64)>) -> Result<(), Stopped> {
        self.0.fetch_add(batch.len(), Ordering::Relaxed);
        Ok(())
    }
    fn bad_line(&self, _: BadLine) -> Result<(), Stopped> {
        Ok(())
    }
}

#[test]
fn held_maps_send_a_consumer_of_many_ranges_once_per_worker() {
    // 1,000 consumers in each of 5 ranges: summed one by one, each range sends them all
    // again; held, nothing leaves until the flush, and then at most once per worker.
    let data: String = (0..5_000).map(|i| format!("{} 1\n", i % 1000)).collect();
    let data = data.as_bytes();
    let cut = data.len() as u64 / 5;
    let config = EngineConfig {
        chunk_bytes: 1024,
        ..EngineConfig::default()
    };
    let pool = pool(2);
    let (apart, held_sink) = (Count::default(), Count::default());
    let held = Held::new();
    for i in 0..5 {
        let range = i * cut..if i == 4 {
            data.len() as u64
        } else {
            (i + 1) * cut
        };
        sum_range(data, range.clone(), &config, &pool, &apart).unwrap();
        sum_range_held(data, range, &config, &pool, &held_sink, &held).unwrap();
    }
    assert!(apart.0.load(Ordering::Relaxed) >= 5 * 990);
    assert_eq!(
        held_sink.0.load(Ordering::Relaxed),
        0,
        "nothing left before the flush"
    );
    assert!(!held.is_empty());
    held.flush(&pool, &held_sink).unwrap();
    let sent = held_sink.0.load(Ordering::Relaxed);
    assert!((1000..=2000).contains(&sent), "sent {sent}");
    assert!(held.is_empty());
}

#[test]
fn a_failed_range_leaves_nothing_held() {
    let config = EngineConfig {
        bad_lines: BadLinePolicy::Fail,
        ..EngineConfig::default()
    };
    let pool = pool(2);
    let sink = Record::default();
    let held = Held::new();
    sum_range_held(&b"1 2\n3 4\n"[..], 0..8, &config, &pool, &sink, &held).unwrap();
    assert!(!held.is_empty());
    let bad = b"5 6\nnot a line\n";
    assert!(sum_range_held(&bad[..], 0..bad.len() as u64, &config, &pool, &sink, &held).is_err());
    assert!(
        held.is_empty(),
        "the sums of the failed range's transaction are dropped"
    );
    held.flush(&pool, &sink).unwrap();
    assert!(sink.totals.lock().unwrap().is_empty());
}

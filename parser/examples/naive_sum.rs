//! The baseline a Rust programmer writes first: `BufRead::lines` + `split` + `std::HashMap`.
//! Used only by scripts/bench-parse, to compare `tally sum` against.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};

fn main() -> std::io::Result<()> {
    let mut totals: HashMap<i64, i128> = HashMap::new();
    for path in std::env::args().skip(1) {
        for line in BufReader::new(std::fs::File::open(path)?).lines() {
            let line = line?;
            let mut fields = line.split(' ');
            if let (Some(id), Some(amount)) = (fields.next(), fields.next()) {
                if let (Ok(id), Ok(amount)) = (id.parse::<i64>(), amount.parse::<i64>()) {
                    *totals.entry(id).or_default() += i128::from(amount);
                }
            }
        }
    }
    let mut totals: Vec<_> = totals.into_iter().collect();
    totals.sort_unstable();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (id, total) in totals {
        writeln!(out, "{id} {total}")?;
    }
    out.flush()
}

//! tally-aggregator: the optional stage `tally.sums` → `tally.totals` (merging sums across
//! units and files before the database). Not built yet: the db-client reads `tally.sums`
//! directly, which is correct, only with more database writes when many files share
//! consumers. The crate holds the stage's place in the layout.

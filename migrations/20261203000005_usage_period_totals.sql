-- Usage of all consumers per period (docs/architecture.md "Usage periods"): what
-- `GET /v1/usage/total` and the console's chart read, instead of summing every consumer's
-- row of the range (10M consumers an hour make a month 7 billion rows).
--
-- Kept by the writers of consumer_period_totals in the same transaction as their rows (the
-- db-client, `tally standalone`, `tally rollup`), so that for every period its total here
-- equals the sum of its rows there. A period has up to 64 rows, one per slot (a writer's
-- backend pid modulo 64): parallel writers add to different rows instead of waiting on one.
CREATE TABLE usage_period_totals (
    period_start TIMESTAMPTZ NOT NULL,
    slot         SMALLINT    NOT NULL,
    total        NUMERIC     NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (period_start, slot)
);

-- What is there already.
INSERT INTO usage_period_totals (period_start, slot, total)
SELECT period_start, 0, sum(total) FROM consumer_period_totals GROUP BY period_start;

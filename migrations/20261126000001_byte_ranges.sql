-- Units name byte ranges: a file version may be split differently by different announcements,
-- and a version that grew from an earlier one counts only its new bytes. A file version is
-- complete when all of its bytes are summed (the unit that completes it says so), not when a
-- number of units is reached.
ALTER TABLE ingested_files
    ADD COLUMN file_bytes BIGINT  NOT NULL DEFAULT 0,
    ADD COLUMN complete   BOOLEAN NOT NULL DEFAULT false;
UPDATE ingested_files SET complete = (units_ingested = units_total), file_bytes = bytes;
ALTER TABLE ingested_files DROP COLUMN units_total;

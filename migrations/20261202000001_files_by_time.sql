-- The files ledger newest first, for `tally api`'s GET /v1/files (keyset paging on the time a
-- file was first counted, which never changes once set).
CREATE INDEX ingested_files_by_time ON ingested_files (first_ingested_at DESC, file_id DESC);

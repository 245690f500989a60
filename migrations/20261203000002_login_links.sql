-- The console's login links (`tally api login-link`) are single use across every api
-- replica: a replica records a link's nonce here before it signs a browser in, and a nonce
-- already here refuses the link. Rows older than a day are deleted as links are used (a
-- link is valid for one minute).
CREATE TABLE api_login_links_used (
    nonce   TEXT        PRIMARY KEY,
    used_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

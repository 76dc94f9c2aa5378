-- groupsync warehouse schema: the single source of truth for every table and view.
-- Applied idempotently on every write (CREATE ... IF NOT EXISTS / CREATE OR REPLACE VIEW).
-- Times are TIMESTAMPTZ in UTC. The public interface (documented in README.md) is every
-- table and view below except those whose name starts with an underscore.

-- connected_apps: one row per configured connection that the pipeline has talked to.
CREATE TABLE IF NOT EXISTS connected_apps (
    connection      VARCHAR PRIMARY KEY,   -- the connection's name in the connections file
    app             VARCHAR NOT NULL,      -- office365 | google_workspace | box | dropbox | salesforce
    tenant_id       VARCHAR,               -- the app's tenant / enterprise id (no secrets)
    first_seen_at   TIMESTAMPTZ NOT NULL,  -- first time the pipeline used this connection
    catalog_refreshed_at TIMESTAMPTZ       -- last successful group catalog refresh
);

-- group_catalog: the groups that exist in each app, as of the last catalog refresh.
-- A refresh replaces the connection's rows as a whole: a group gone from the app is gone here.
CREATE TABLE IF NOT EXISTS group_catalog (
    app                 VARCHAR NOT NULL,
    connection          VARCHAR NOT NULL,
    remote_group_id     VARCHAR NOT NULL,  -- the app's id for the group
    name                VARCHAR NOT NULL,  -- display name (not unique in most apps)
    description         VARCHAR,
    mail                VARCHAR,
    kind                VARCHAR,           -- e.g. microsoft365, security, mail-enabled security, distribution
    remote_member_count BIGINT,            -- people in the group per the app (nested flattened); NULL if unknown
    seen_at             TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (connection, remote_group_id)
);

-- user_groups: the groups groupsync tracks, imported by a person or maintained automatically.
CREATE TABLE IF NOT EXISTS user_groups (
    group_id        VARCHAR PRIMARY KEY,   -- '<connection>:<remote_group_id>' for imported groups
    name            VARCHAR NOT NULL,      -- display name at the last sync
    type            VARCHAR NOT NULL CHECK (type IN ('imported', 'automatic')),
    connection      VARCHAR,
    remote_group_id VARCHAR,
    imported_at     TIMESTAMPTZ,           -- when the first import committed; tags start here
    last_synced_at  TIMESTAMPTZ,           -- when members were last read from the app
    member_count    BIGINT NOT NULL,       -- current members (open intervals in group_memberships)
    deleted_at      TIMESTAMPTZ            -- set when the group disappeared from the app
);

-- accounts: people's accounts in each connected app, as last seen. One row per
-- (connection, account_id), kept so by the writer; no index, so bulk merges stay fast.
CREATE TABLE IF NOT EXISTS accounts (
    connection          VARCHAR NOT NULL,
    account_id          VARCHAR NOT NULL,  -- the app's user id
    email               VARCHAR,           -- mail, else the sign-in name
    display_name        VARCHAR,
    user_principal_name VARCHAR,           -- sign-in name (Graph userPrincipalName)
    user_type           VARCHAR,           -- the app's word: Graph 'Member' / 'Guest'
    is_external         BOOLEAN NOT NULL,  -- guest, or an outside account (#EXT# sign-in name)
    enabled             BOOLEAN,
    first_seen_at       TIMESTAMPTZ NOT NULL,
    last_seen_at        TIMESTAMPTZ NOT NULL
);

-- group_memberships: membership history. One row per stay of an account in a group:
-- [valid_from, valid_to); valid_to NULL means the account is a member now.
CREATE TABLE IF NOT EXISTS group_memberships (
    group_id    VARCHAR NOT NULL,
    connection  VARCHAR NOT NULL,
    account_id  VARCHAR NOT NULL,
    valid_from  TIMESTAMPTZ NOT NULL,
    valid_to    TIMESTAMPTZ
);

-- group_syncs: one row per committed import or re-sync of a group: what was read and changed.
CREATE TABLE IF NOT EXISTS group_syncs (
    group_id            VARCHAR NOT NULL,
    synced_at           TIMESTAMPTZ NOT NULL,  -- the commit time; intervals open/close at it
    run_id              VARCHAR,               -- the Dagster run that did it
    members             BIGINT NOT NULL,       -- people in the group after the sync
    joined              BIGINT NOT NULL,       -- intervals opened
    "left"              BIGINT NOT NULL,       -- intervals closed
    remote_member_count BIGINT,                -- what the app's own count said (checked against members)
    other_members       VARCHAR,               -- JSON {type: count} of non-people skipped (devices, groups...)
    nested_groups       BIGINT NOT NULL,       -- nested groups expanded
    pages               BIGINT NOT NULL,       -- API pages read
    duration_seconds    DOUBLE NOT NULL
);

-- group_members: who is in each group now, with their account details.
CREATE OR REPLACE VIEW group_members AS
SELECT m.group_id,
       g.name          AS group_name,
       m.connection,
       m.account_id,
       a.email,
       a.display_name,
       a.user_type,
       a.is_external,
       m.valid_from    AS member_since
FROM group_memberships AS m
JOIN user_groups AS g ON g.group_id = m.group_id
LEFT JOIN accounts AS a ON a.connection = m.connection AND a.account_id = m.account_id
WHERE m.valid_to IS NULL;

-- groupsync warehouse schema: the single source of truth for every table and view.
-- The tables live in a DuckLake (storage/lake.py). Applied when the lake's recorded schema version
-- (_schema_state) differs from this file's. DuckLake has no keys, constraints or sequences: the
-- writers keep each table's documented key unique (they are serialized by the lake's writer lock).
-- Times are TIMESTAMPTZ in UTC. The public interface (documented in README.md) is every
-- table and view below except those whose name starts with an underscore.

-- connected_apps: one row per configured connection that the pipeline has talked to.
CREATE TABLE IF NOT EXISTS connected_apps (
    connection      VARCHAR NOT NULL,      -- the connection's name in the connections file (key)
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
    seen_at             TIMESTAMPTZ NOT NULL   -- key: (connection, remote_group_id)
);

-- user_groups: the groups groupsync tracks, imported by a person or maintained automatically.
CREATE TABLE IF NOT EXISTS user_groups (
    group_id        VARCHAR NOT NULL,      -- key; '<connection>:<remote_group_id>' for imported groups
    name            VARCHAR NOT NULL,      -- display name at the last sync
    type            VARCHAR NOT NULL,      -- imported | automatic
    connection      VARCHAR,
    remote_group_id VARCHAR,
    imported_at     TIMESTAMPTZ,           -- when the first import committed; tags start here
    last_synced_at  TIMESTAMPTZ,           -- when members were last read from the app
    member_count    BIGINT NOT NULL,       -- current members (open intervals in group_memberships)
    deleted_at      TIMESTAMPTZ,           -- set when the group disappeared from the app
    group_key       INTEGER NOT NULL       -- small number that activity tags store (millions of
                                           -- rows) instead of group_id: set once, never reused
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
    pages               BIGINT NOT NULL,       -- API pages read (hourly syncs: by the whole connection)
    duration_seconds    DOUBLE NOT NULL,
    mode                VARCHAR                -- import | delta | full (hourly syncs); NULL before v0.2
);

-- import_requests: every request to import a group (command line or Dagster launchpad) and its
-- outcome. A copy of the control store (control.sqlite3), refreshed at every warehouse write and
-- corrected by the warehouse itself (a request whose run committed its import is done);
-- `groupsync requests` shows the live state.
CREATE TABLE IF NOT EXISTS import_requests (
    request_id       BIGINT NOT NULL,       -- key
    connection       VARCHAR NOT NULL,
    group_reference  VARCHAR NOT NULL,      -- what the person asked for: id or exact name
    remote_group_id  VARCHAR,               -- the group's id in the app, once resolved
    group_name       VARCHAR,
    notify_email     VARCHAR,               -- who is emailed when the import ends
    source           VARCHAR NOT NULL,      -- cli | launchpad | retry
    retry_of         BIGINT,                -- the failed request this one retries
    status           VARCHAR NOT NULL,      -- pending | running | done | failed | canceled
    requested_at     TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    run_id           VARCHAR,               -- the Dagster run that carried it out
    error            VARCHAR,               -- why it failed
    members          BIGINT,
    joined           BIGINT,
    "left"           BIGINT,
    nested_groups    BIGINT,
    pages            BIGINT,
    duration_seconds DOUBLE,
    request_key      VARCHAR,               -- unique forever
    launched_at      TIMESTAMPTZ,
    progress_pages   BIGINT,
    progress_members BIGINT
);

-- connection_sync_state: where each connection's hourly sync stands.
CREATE TABLE IF NOT EXISTS connection_sync_state (
    connection         VARCHAR NOT NULL,    -- key
    delta_link         VARCHAR,             -- the app's resume point (Graph @odata.deltaLink)
    chain_started_at   TIMESTAMPTZ,         -- when the current delta chain began (a full read)
    last_synced_at     TIMESTAMPTZ,         -- last committed sync of any kind
    last_full_sync_at  TIMESTAMPTZ,
    last_full_sync_reason VARCHAR,          -- first sync | periodic | delta state expired ... | requested
    api_root           VARCHAR              -- the API root and tenant delta_link belongs to
);

-- membership_holds: syncs that would have removed too many members of a group, held back.
-- While a hold is 'held' the group is not changed; `groupsync confirm-shrink` or the next full
-- sync showing the same loss applies it.
CREATE TABLE IF NOT EXISTS membership_holds (
    group_id        VARCHAR NOT NULL,
    detected_at     TIMESTAMPTZ NOT NULL,
    run_id          VARCHAR,
    mode            VARCHAR NOT NULL,       -- delta | full: the sync that saw the loss
    members_before  BIGINT NOT NULL,
    members_after   BIGINT NOT NULL,
    "left"          BIGINT NOT NULL,
    status          VARCHAR NOT NULL,       -- held | confirmed | agreed | withdrawn
    resolved_at     TIMESTAMPTZ
);

-- _remote_direct_members (internal): each app group's DIRECT members of every type, as the
-- delta chain last left them; imported groups' people are the transitive closure over it.
CREATE TABLE IF NOT EXISTS _remote_direct_members (
    connection      VARCHAR NOT NULL,
    parent_id       VARCHAR NOT NULL,       -- the group's id in the app
    member_id       VARCHAR NOT NULL,
    member_type     VARCHAR NOT NULL        -- user | group | device | servicePrincipal | ...
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

-- activities: events from the apps' audit logs, normalized. One row per app event:
-- (connection, source, event_id) is unique (ingest drops events it already holds); the
-- Management Activity API's content types share one id space, so an Id is stored once across them.
-- No index holds the key: an ART index on it made the file 7.6x bigger and inserts 3-5x slower.
-- The merge checks it instead and fails rather than store an event twice (activity_writes.py).
CREATE TABLE IF NOT EXISTS activities (
    activity_id      BIGINT NOT NULL,       -- groupsync's id; increases in ingest order
    connection       VARCHAR NOT NULL,
    app              VARCHAR NOT NULL,      -- office365 | ...
    source           VARCHAR NOT NULL,      -- the log: signIns | directoryAudits | Audit.SharePoint | Audit.General
    event_id         VARCHAR NOT NULL,      -- the app's id for the event
    occurred_at      TIMESTAMPTZ NOT NULL,  -- when it happened (UTC)
    actor_account_id VARCHAR,               -- who acted: accounts.account_id; NULL when unknown
    actor_email      VARCHAR,               -- who acted, as the app names them (sign-in name or email)
    actor_type       VARCHAR,               -- user | anonymous (a sharing link) | application | system
    action           VARCHAR NOT NULL,      -- the app's word: Sign-in, FileAccessed, Add member to group ...
    object_name      VARCHAR,               -- file or resource acted on
    object_id        VARCHAR,               -- its id or URL
    ip_address       VARCHAR,
    country          VARCHAR,               -- ISO 3166-1 alpha-2, when the app geolocates the event
    city             VARCHAR,
    user_agent       VARCHAR,
    success          BOOLEAN,               -- NULL when the app does not say
    raw              VARCHAR,               -- the event as received (JSON text: query it with raw::JSON)
    ingested_at      TIMESTAMPTZ NOT NULL
);
-- One folder of Parquet files per day of occurred_at: "the last 7 days" reads a week of files,
-- and retention drops whole days (storage/maintenance.py).
ALTER TABLE activities SET PARTITIONED BY (year(occurred_at), month(occurred_at), day(occurred_at));

-- activity_sources_state: how far each audit log has been read, per connection.
CREATE TABLE IF NOT EXISTS activity_sources_state (
    connection       VARCHAR NOT NULL,
    source           VARCHAR NOT NULL,
    read_until       TIMESTAMPTZ,           -- events made available before this were read; the
                                            -- next read starts an overlap window earlier
    last_read_at     TIMESTAMPTZ,           -- last successful read
    events_read      BIGINT NOT NULL DEFAULT 0,  -- received by the last read (repeats included)
    events_new       BIGINT NOT NULL DEFAULT 0,  -- of them, new to groupsync
    gap_before       TIMESTAMPTZ,           -- set when the app no longer kept events back to the
                                            -- previous read: events before this were lost
    last_error       VARCHAR,               -- why the last attempt failed; NULL after a success
    last_error_at    TIMESTAMPTZ            -- key: (connection, source)
);

-- _sign_in_names (internal): the account each lower-case sign-in name signed in as, one row per
-- UTC day it did (the sign-ins pair the name with the directory id). Resolving a file event's
-- actor reads these rows instead of 30 days of sign-ins (storage/activity_writes.py). Only
-- appended (an update would add a delete file to every file it touches); maintenance deletes
-- the days past the 30 that count.
CREATE TABLE IF NOT EXISTS _sign_in_names (
    connection   VARCHAR NOT NULL,
    name         VARCHAR NOT NULL,
    account_id   VARCHAR NOT NULL,
    signed_in_on DATE NOT NULL              -- key: (connection, name, account_id, signed_in_on)
);

-- activity_groups: the groups each activity is tagged with. A group tags an activity when the
-- actor was a member at occurred_at (valid_from <= occurred_at < valid_to) and the group was
-- imported (automatic groups: created) at or before occurred_at. Written once, when the activity
-- is ingested; never changed after.
-- Stored by group_key (an INTEGER) rather than group_id: writing tens of millions of string ids
-- cost as much as the tagging join itself (bench/tagging.py). The view activity_groups below
-- shows them by group_id.
CREATE TABLE IF NOT EXISTS _activity_group_keys (
    activity_id BIGINT NOT NULL,
    group_key   INTEGER NOT NULL,
    occurred_on DATE NOT NULL               -- the activity's day (UTC): partitions as activities do
);
-- By the day itself (one folder per day, as activities): year/month/day transforms of the DATE
-- made writing 41.7M tags 1.8x slower (bench/tagging.py).
ALTER TABLE _activity_group_keys SET PARTITIONED BY (occurred_on);

-- _tagging_state (internal): activities up to this activity_id have been tagged.
CREATE TABLE IF NOT EXISTS _tagging_state (
    tagged_through BIGINT NOT NULL
);

-- alerts: what the policies raised. One row per policy, actor and burst (threshold policies) or
-- run (other policies).
CREATE TABLE IF NOT EXISTS alerts (
    alert_id         VARCHAR NOT NULL,      -- key; stable: re-evaluating the same activities gives the same id
    policy           VARCHAR NOT NULL,
    severity         VARCHAR NOT NULL,      -- low | medium | high | critical
    raised_at        TIMESTAMPTZ NOT NULL,
    connection       VARCHAR NOT NULL,
    actor_account_id VARCHAR,
    actor_email      VARCHAR,
    groups           VARCHAR[] NOT NULL,    -- the actor's tagged groups that matched the policy
    activity_ids     BIGINT[] NOT NULL,     -- the activities that raised it (at most 1,000)
    activity_count   BIGINT NOT NULL,
    first_at         TIMESTAMPTZ NOT NULL,  -- earliest and latest of those activities
    last_at          TIMESTAMPTZ NOT NULL,
    summary          VARCHAR NOT NULL,      -- one line for people
    notified_at      TIMESTAMPTZ            -- when the policy's email went out
);

-- _policy_state (internal): activities up to this activity_id have been evaluated by the policy.
CREATE TABLE IF NOT EXISTS _policy_state (
    policy            VARCHAR NOT NULL,     -- key
    evaluated_through BIGINT NOT NULL,
    definition_hash   VARCHAR NOT NULL      -- of the fields that decide matching: a change
                                            -- starts the policy again from new activities
);

-- activity_groups: the groups each activity is tagged with, by group_id.
CREATE OR REPLACE VIEW activity_groups AS
SELECT k.activity_id, g.group_id
FROM _activity_group_keys AS k
JOIN user_groups AS g ON g.group_key = k.group_key;

-- activities_tagged: every activity with the names and ids of the groups it is tagged with.
CREATE OR REPLACE VIEW activities_tagged AS
SELECT a.*,
       coalesce(t.group_names, []::VARCHAR[]) AS groups,
       coalesce(t.group_ids, []::VARCHAR[])   AS group_ids
FROM activities AS a
LEFT JOIN (
    SELECT k.activity_id,
           list(g.name ORDER BY g.name)       AS group_names,
           list(g.group_id ORDER BY g.name)   AS group_ids
    FROM _activity_group_keys AS k
    JOIN user_groups AS g ON g.group_key = k.group_key
    GROUP BY k.activity_id
) AS t ON t.activity_id = a.activity_id;

-- group_activities: one row per activity and group it is tagged with ("activities of group X").
CREATE OR REPLACE VIEW group_activities AS
SELECT g.group_id,
       g.name AS group_name,
       g.type AS group_type,
       a.*
FROM _activity_group_keys AS k
JOIN user_groups AS g ON g.group_key = k.group_key
JOIN activities AS a ON a.activity_id = k.activity_id;

-- _schema_state (internal): the version of this file the lake was last brought up to.
CREATE TABLE IF NOT EXISTS _schema_state (
    schema_version VARCHAR NOT NULL,
    applied_at     TIMESTAMPTZ NOT NULL
);

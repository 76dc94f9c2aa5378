"""Generated data for bench/scale.py: the population and the audit events, all by SQL.

Values are drawn from hashes of a sequence number (deterministic) and GUIDs from
gen_random_uuid() (random, as the vendors' are), so compression sees what it would see in a
real tenant: 100,000 accounts with home addresses, agents and places; four Office 365 logs with
raw JSON of the vendor's shape and size (about 1.2 KB an event).
"""

from __future__ import annotations

from typing import Any

import duckdb

from groupsync_pipeline.sandbox.activity_stream import ADMIN_SIGN_IN_APPS, SIGN_IN_APPS

CONNECTION = "bench"
DOMAIN = "contoso.example"
HR_STRIDE = 97  # accounts n with n % 97 == 0 are in HR (about 1 %)
# ----------------------------------------------------------------------------------

# (country, city, state, latitude, longitude): where accounts sign in from, most in the US.
PLACES = [
    ("US", "Redmond", "Washington", 47.68, -122.12),
    ("US", "New York", "New York", 40.71, -74.0),
    ("US", "Chicago", "Illinois", 41.88, -87.63),
    ("US", "Austin", "Texas", 30.27, -97.74),
    ("US", "San Francisco", "California", 37.77, -122.42),
    ("US", "Atlanta", "Georgia", 33.75, -84.39),
    ("GB", "London", "England", 51.51, -0.13),
    ("DE", "Berlin", "Berlin", 52.52, 13.4),
    ("FR", "Paris", "Ile-de-France", 48.86, 2.35),
    ("IN", "Bengaluru", "Karnataka", 12.97, 77.59),
    ("CA", "Toronto", "Ontario", 43.65, -79.38),
    ("NL", "Amsterdam", "North Holland", 52.37, 4.9),
]
BROWSERS = [
    "Edge 120.0.2210",
    "Chrome 121.0.6167",
    "Firefox 122.0",
    "Safari 17.2",
    "Edge 121.0.2277",
]
SYSTEMS = ["Windows 10", "Windows 11", "MacOs", "iOS 17", "Android 14"]
AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/121.0.0.0 Safari/537.36 Edg/121.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/121.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.2 Safari/605.1.15",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17126; Pro)",
    "OneDriveMpc-Transform_Thumbnail/1.0",
    "Microsoft SkyDriveSync 24.010.0114.0003 ship; Windows NT 10.0 (19045)",
]
# (appDisplayName, appId, resourceDisplayName, resourceId, clientAppUsed): the sandbox's own,
# four everyday apps and the Azure Portal.
APPS = [*SIGN_IN_APPS[:4], ADMIN_SIGN_IN_APPS[0]]
FILE_OPS = [
    "FileAccessed",
    "FileAccessed",
    "FileAccessed",
    "FilePreviewed",
    "FileModified",
    "FileDownloaded",
    "FileUploaded",
    "FileSyncDownloadedFull",
    "PageViewed",
]
MAIL_OPS = [
    "MailItemsAccessed",
    "MailItemsAccessed",
    "MailItemsAccessed",
    "Send",
    "MoveToDeletedItems",
    "Update",
]
DIR_OPS = [
    ("Update user", "UserManagement", "Update"),
    ("Add member to group", "GroupManagement", "Assign"),
    ("Remove member from group", "GroupManagement", "Unassign"),
    ("Reset user password", "UserManagement", "Update"),
    ("Add app role assignment to service principal", "ApplicationManagement", "Assign"),
]
SITES = ["HR", "Finance", "Engineering", "Sales", "Marketing", "Legal", "Executives", "IT"]
EXTENSIONS = ["docx", "xlsx", "pptx", "pdf", "txt", "png", "one", "msg"]


def _lit(value: Any) -> str:
    """A SQL literal of a Python constant (lists, tuples as lists, strings, numbers)."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_lit(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def _pick(values: list[Any], roll: str) -> str:
    """SQL: one of ``values`` chosen by the [0, 1) expression ``roll``."""
    return f"{_lit(values)}[1 + floor({roll} * {len(values)})::BIGINT]"


MACROS = """
CREATE OR REPLACE TEMP MACRO u01(a, b) AS (hash(a, b) >> 11)::DOUBLE / 9007199254740992.0;
CREATE OR REPLACE TEMP MACRO guid(s) AS (
    substr(md5(s), 1, 8) || '-' || substr(md5(s), 9, 4) || '-' || substr(md5(s), 13, 4) || '-'
    || substr(md5(s), 17, 4) || '-' || substr(md5(s), 21, 12));
CREATE OR REPLACE TEMP MACRO js(s) AS CASE WHEN s IS NULL THEN 'null' ELSE '"' || s || '"' END;
CREATE OR REPLACE TEMP MACRO iso7(t, i) AS
    strftime(t::TIMESTAMP, '%Y-%m-%dT%H:%M:%S.%f') || (i % 10) || 'Z';
CREATE OR REPLACE TEMP MACRO iso0(t) AS strftime(t::TIMESTAMP, '%Y-%m-%dT%H:%M:%S');
"""

# The population, rebuilt identically from range() in any session that generates.
ACCOUNTS = f"""
CREATE OR REPLACE TEMP TABLE acct AS
SELECT n AS acct_no, guid('acct' || n) AS account_id,
       CASE WHEN u01(n, 1) < 0.05 THEN 'guest' || n || '_partner.example#EXT#@{DOMAIN}'
            ELSE 'user' || n || '@{DOMAIN}' END AS upn,
       'User ' || n AS display_name, u01(n, 1) < 0.05 AS is_guest,
       {_lit([[str(v) for v in p] for p in PLACES])}
           [1 + floor(u01(n, 2) ^ 1.5 * {len(PLACES)})::BIGINT] AS place,
       (20 + floor(u01(n, 3) * 180))::INT || '.' || floor(u01(n, 4) * 256)::INT || '.'
           || floor(u01(n, 5) * 256)::INT || '.' || floor(u01(n, 6) * 254 + 1)::INT AS home_ip,
       {_pick(BROWSERS, "u01(n, 7)")} AS browser, {_pick(SYSTEMS, "u01(n, 8)")} AS os,
       {_pick(AGENTS, "u01(n, 9)")} AS agent
FROM range($accounts) AS t(n)
"""

POPULATION = f"""
INSERT INTO accounts
SELECT '{CONNECTION}', account_id, upn, display_name, upn,
       CASE WHEN is_guest THEN 'Guest' ELSE 'Member' END, is_guest, true,
       TIMESTAMPTZ '2026-01-05 09:00:00+00', $now
FROM acct;

INSERT INTO user_groups (group_id, name, type, connection, remote_group_id, imported_at,
                         last_synced_at, member_count, deleted_at, group_key)
SELECT '{CONNECTION}:' || guid('group' || g),
       CASE WHEN g = 0 THEN 'HR' ELSE {_pick(SITES, "u01(g, 40)")} || ' team ' || g END,
       'imported', '{CONNECTION}', guid('group' || g),
       -- most imported before the data starts, some while it grows
       $t0 - INTERVAL 30 DAY + to_seconds(floor(u01(g, 41) ^ 3 * 100 * 86400)),
       $now, 0, NULL, g + 1
FROM range($groups) AS t(g);

-- Each account in 1-8 groups (mean about 4; group numbers skewed so sizes vary), HR by rule;
-- 20 % of memberships have an earlier, closed stay; 10 % of open ones began during the data.
INSERT INTO group_memberships
WITH pairs AS (
    SELECT DISTINCT a.acct_no, a.account_id,
           1 + floor(u01(a.acct_no * 16 + j, 42) ^ 2 * ($groups - 1))::BIGINT AS g
    FROM acct AS a, range(8) AS r(j)
    WHERE j < 1 + floor(u01(a.acct_no, 43) * 7)
    UNION ALL
    SELECT acct_no, account_id, 0 FROM acct WHERE acct_no % {HR_STRIDE} = 0
), stays AS (
    SELECT p.*, hash(p.acct_no, p.g) AS h, ug.group_id, ug.imported_at
    FROM pairs AS p JOIN user_groups AS ug ON ug.group_key = p.g + 1
)
SELECT group_id, '{CONNECTION}', account_id,
       CASE WHEN u01(h, 1) < 0.9 THEN imported_at
            ELSE greatest(imported_at, $t0 + to_seconds(floor(u01(h, 2) * $span_s))) END,
       NULL
FROM stays
UNION ALL
SELECT group_id, '{CONNECTION}', account_id, imported_at - INTERVAL 200 DAY,
       imported_at - INTERVAL 100 DAY + to_seconds(floor(u01(h, 3) * 86400 * 90))
FROM stays WHERE u01(h, 4) < 0.2;

UPDATE user_groups SET member_count = c FROM (
    SELECT group_id AS gid, count(*) AS c FROM group_memberships WHERE valid_to IS NULL
    GROUP BY ALL) WHERE group_id = gid;
"""


def _events_sql(staged: bool) -> str:
    """SELECT the events of sequence numbers [$lo, $hi), the ``i``-th at $t_start + (i - $lo)
    * $step_us (plus up to 30 s), as stored (``staged`` False: actors resolved, file events
    located) or as an ingest stages them (actor ids and places left to the merge)."""
    signin_json = """
    '{"id":"' || eid || '","createdDateTime":"' || iso7(t, i) || '","userDisplayName":"'
    || display_name || '","userPrincipalName":"' || upn || '","userId":"' || account_id
    || '","appId":"' || app[2] || '","appDisplayName":"' || app[1] || '","ipAddress":"' || ip
    || '","clientAppUsed":"' || app[5] || '","correlationId":"' || cid
    || '","conditionalAccessStatus":"notApplied","isInteractive":true,"riskDetail":"none",'
    || '"riskLevelAggregated":"none","riskLevelDuringSignIn":"none","riskState":"none",'
    || '"riskEventTypes":[],"resourceDisplayName":"' || app[3] || '","resourceId":"' || app[4]
    || '","status":{"errorCode":' || CASE WHEN ok THEN '0,"failureReason":null,'
    || '"additionalDetails":null}' ELSE '50126,"failureReason":"Error validating credentials '
    || 'due to invalid username or password.","additionalDetails":"The user didn''t enter the '
    || 'right credentials."}' END
    || ',"deviceDetail":{"deviceId":"","displayName":null,"operatingSystem":"' || os
    || '","browser":"' || browser || '","isCompliant":null,"isManaged":null,"trustType":null}'
    || ',"location":{"city":"' || place[2] || '","state":"' || place[3]
    || '","countryOrRegion":"' || place[1] || '","geoCoordinates":{"altitude":null,'
    || '"latitude":' || (place[4]::DOUBLE + (h % 1000) / 10000.0) || ',"longitude":'
    || (place[5]::DOUBLE - (h % 997) / 10000.0) || '}},"appliedConditionalAccessPolicies":['
    || '{"id":"de7e60eb-ed89-4d73-8205-2227def6b7c9","displayName":"Require MFA for admins",'
    || '"enforcedGrantControls":[],"enforcedSessionControls":[],"result":"notEnabled"},'
    || '{"id":"6701123a-b4c6-48af-8565-565c8bf7cabc","displayName":"Block legacy '
    || 'authentication","enforcedGrantControls":[],"enforcedSessionControls":[],'
    || '"result":"notEnabled"}]}'"""
    common = """
    '{"CreationTime":"' || iso0(t) || '","Id":"' || eid
    || '","OrganizationId":"6e7c5f2a-1b3d-4c8e-9f0a-2b4c6d8e0f1a","Operation":"' || op
    || '","RecordType":' || CASE WHEN src = 'Audit.SharePoint' THEN '6' ELSE '2' END
    || ',"ResultStatus":"Succeeded","UserKey":"' || CASE WHEN src = 'Audit.SharePoint'
    THEN 'i:0h.f|membership|' || account_id || '@live.com' ELSE account_id END
    || '","UserType":0,"Version":1,"Workload":"' || CASE WHEN src = 'Audit.SharePoint'
    THEN 'SharePoint' ELSE 'Exchange' END || '","ClientIP":"' || ip || '","UserId":"' || upn"""
    sharepoint_json = f"""{common}
    || '","ObjectId":"' || object_id || '","CorrelationId":"' || cid
    || '","EventSource":"SharePoint","ItemType":"File","ListId":"' || guid('list' || site_no)
    || '","ListItemUniqueId":"' || guid('item' || file_no) || '","Site":"' || guid('site'
    || site_no) || '","UserAgent":"' || agent || '","WebId":"' || guid('web' || site_no)
    || '","GeoLocation":"NAM","IsManagedDevice":' || CASE WHEN is_guest THEN 'false' ELSE
    'true' END || ',"SourceFileExtension":"' || ext || '","SiteUrl":"https://contoso'
    || '.sharepoint.com/sites/' || site || '/","SourceFileName":"' || object_name
    || '","SourceRelativeUrl":"Shared Documents/' || folder || '"}}'"""
    exchange_json = f"""{common}
    || '","AppId":"00000002-0000-0ff1-ce00-000000000000","ClientIPAddress":"' || ip
    || '","ClientInfoString":"Client=OWA;Action=ViaProxy","ExternalAccess":false,'
    || '"InternalLogonType":0,"LogonType":0,"LogonUserSid":"S-1-5-21-' || (h % 10000000000)
    || '","MailboxGuid":"' || cid || '","MailboxOwnerUPN":"' || upn || '","OrganizationName"'
    || ':"contoso.onmicrosoft.com","OriginatingServer":"BN0PR04MB' || (h % 9000 + 1000)
    || ' (15.20.8207.017)"' || CASE WHEN op = 'MailItemsAccessed' THEN ',"OperationProperties":'
    || '[{{"Name":"MailAccessType","Value":"Bind"}},{{"Name":"IsThrottled","Value":"False"}}],'
    || '"OperationCount":' || (1 + h % 12) ELSE '' END || '}}'"""
    directory_json = """
    '{"id":"' || eid || '","category":"' || dir[2] || '","correlationId":"' || cid
    || '","result":"success","resultReason":"","activityDisplayName":"' || op
    || '","activityDateTime":"' || iso7(t, i) || '","loggedByService":"Core Directory",'
    || '"operationType":"' || dir[3] || '","initiatedBy":{"user":{"id":"' || account_id
    || '","displayName":null,"userPrincipalName":"' || upn || '","ipAddress":"' || ip
    || '","userType":null,"homeTenantId":null,"homeTenantName":null},"app":null},'
    || '"targetResources":[{"id":"' || target_id || '","displayName":null,"type":"User",'
    || '"userPrincipalName":"' || target_upn || '","groupType":null,"modifiedProperties":'
    || '[{"displayName":"Included Updated Properties","oldValue":null,"newValue":'
    || '"\\"JobTitle\\""}]}],"additionalDetails":[{"key":"User-Agent","value":"' || agent
    || '"}]}'"""
    account_id = (
        "CASE WHEN src = 'signIns' OR src = 'directoryAudits' THEN account_id END"
        if staged
        else "account_id"
    )
    place = (
        "CASE WHEN src = 'signIns' THEN place[{k}] END"
        if staged
        else ("CASE WHEN src = 'signIns' OR located THEN place[{k}] END")
    )
    return f"""
WITH ev AS (
    SELECT i, (hash(i, 77) >> 1)::BIGINT AS h, u01(i, 71) AS kind_roll,
           $t_start + to_microseconds(((i - $lo) * $step_us)::BIGINT
                                      + floor(u01(i, 72) * 30e6)::BIGINT) AS t,
           -- busy accounts act far more than quiet ones
           floor(u01(i, 73) ^ 1.5 * $accounts)::BIGINT AS acct_no,
           gen_random_uuid()::VARCHAR AS eid, gen_random_uuid()::VARCHAR AS cid
    FROM range($lo, $hi) AS r(i)
), e AS (
    SELECT ev.*, a.*,
           CASE WHEN kind_roll < 0.30 THEN 'signIns' WHEN kind_roll < 0.70 THEN 'Audit.SharePoint'
                WHEN kind_roll < 0.92 THEN 'Audit.Exchange' ELSE 'directoryAudits' END AS src,
           u01(i, 74) < 0.04 AS ok_fail,
           u01(i, 75) < 0.7 AS located,
           CASE WHEN u01(i, 76) < 0.75 THEN a.home_ip ELSE
               (20 + (h >> 8) % 180) || '.' || (h >> 16) % 256 || '.' || (h >> 24) % 256 || '.'
               || 1 + (h >> 32) % 254 END AS ip,
           {_lit([list(a) for a in APPS])}[1 + (h >> 40) % {len(APPS)}] AS app,
           {_lit([list(d) for d in DIR_OPS])}[1 + (h >> 44) % {len(DIR_OPS)}] AS dir,
           {_lit(SITES)}[1 + (h >> 20) % {len(SITES)}] AS site, (h >> 20) % 400 AS site_no,
           (h >> 12) % 200000 AS file_no, {_lit(EXTENSIONS)}[1 + (h >> 36) % {len(EXTENSIONS)}]
               AS ext,
           'Projects/' || (h >> 28) % 50 AS folder
    FROM ev JOIN acct AS a USING (acct_no)
), f AS (
    SELECT e.*, NOT ok_fail AS ok,
           CASE src WHEN 'signIns' THEN 'Sign-in'
                    WHEN 'Audit.SharePoint' THEN {_lit(FILE_OPS)}[1 + (h >> 48) % {len(FILE_OPS)}]
                    WHEN 'Audit.Exchange' THEN {_lit(MAIL_OPS)}[1 + (h >> 48) % {len(MAIL_OPS)}]
                    ELSE dir[1] END AS op,
           'Report ' || file_no || '.' || ext AS object_name,
           'https://contoso.sharepoint.com/sites/' || site || '/Shared Documents/' || folder
               || '/Report ' || file_no || '.' || ext AS object_id,
           guid('acct' || (h >> 24) % $accounts) AS target_id,
           'user' || (h >> 24) % $accounts || '@{DOMAIN}' AS target_upn
    FROM e
)
SELECT i AS seq, src AS source,
       CASE WHEN src = 'directoryAudits'
            THEN 'Directory_' || eid || '_' || upper(substr(md5(cid), 1, 5)) || '_'
                 || lpad(((h >> 8) % 100000000)::VARCHAR, 8, '0')
            ELSE eid END AS event_id,
       t AS occurred_at,
       {account_id} AS actor_account_id,
       CASE WHEN src = 'Audit.SharePoint' OR src = 'Audit.Exchange' THEN lower(upn) ELSE upn END
           AS actor_email,
       'user' AS actor_type,
       op AS action,
       CASE src WHEN 'signIns' THEN app[1] WHEN 'Audit.SharePoint' THEN object_name
                WHEN 'directoryAudits' THEN target_upn END AS object_name,
       CASE src WHEN 'signIns' THEN app[2] WHEN 'Audit.SharePoint' THEN object_id
                WHEN 'directoryAudits' THEN target_id END AS object_id,
       ip AS ip_address,
       {place.format(k=1)} AS country, {place.format(k=2)} AS city,
       CASE src WHEN 'signIns' THEN browser || ' (' || os || ')'
                WHEN 'Audit.SharePoint' THEN agent END AS user_agent,
       CASE WHEN src = 'signIns' THEN ok ELSE true END AS success,
       CASE src WHEN 'signIns' THEN {signin_json}
                WHEN 'Audit.SharePoint' THEN {sharepoint_json}
                WHEN 'Audit.Exchange' THEN {exchange_json}
                ELSE {directory_json} END AS raw
FROM f
"""


def prepare_generator(conn: duckdb.DuckDBPyConnection, accounts: int) -> None:
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("SET enable_progress_bar = false")
    for statement in MACROS.split(";\n"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(ACCOUNTS, {"accounts": accounts})


def _script(conn: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> None:
    for statement in sql.split(";\n"):
        if statement.strip():
            conn.execute(statement, {k: v for k, v in params.items() if f"${k}" in statement})

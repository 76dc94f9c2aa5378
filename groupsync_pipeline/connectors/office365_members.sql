-- How Graph's member objects read (GET /groups/{id}/transitiveMembers, one item each), for
-- MemberPage items in member_items(item JSON), keeping their order. Same rules as
-- account_from_user and _member_type in office365.py, which read single users
-- (test_member_rows_match_python). Nothing the service sends can fail this: a value of
-- another JSON type than the documented one reads as NULL, and an item that is not an
-- object, or whose id is not a non-empty string, is "invalid" (counted, not stored).
WITH parsed AS (
    SELECT item, json_type(item) = 'OBJECT' AS is_object,
           from_json(item, '{"@odata.type": "JSON", "id": "JSON", "displayName": "JSON",
                             "mail": "JSON", "userPrincipalName": "JSON", "userType": "JSON",
                             "accountEnabled": "JSON"}') AS m
    FROM member_items
), fields AS (
    -- text only when the service sent text (as _text in office365.py)
    SELECT item, is_object,
           json_type(m.id) AS id_type, m.id ->> '$' AS id,
           CASE WHEN json_type(m."@odata.type") = 'VARCHAR' THEN m."@odata.type" ->> '$' END
               AS odata_type,
           CASE WHEN json_type(m.userPrincipalName) = 'VARCHAR'
                THEN m.userPrincipalName ->> '$' END AS upn,
           CASE WHEN json_type(m.userType) = 'VARCHAR' THEN m.userType ->> '$' END AS user_type,
           CASE WHEN json_type(m.mail) = 'VARCHAR' THEN m.mail ->> '$' END AS mail,
           CASE WHEN json_type(m.displayName) = 'VARCHAR' THEN m.displayName ->> '$' END
               AS display_name,
           CASE WHEN json_type(m.accountEnabled) = 'BOOLEAN' THEN m.accountEnabled::BOOLEAN END
               AS enabled
    FROM parsed
)
SELECT CASE WHEN NOT is_object OR id_type IS DISTINCT FROM 'VARCHAR' OR id = '' THEN 'invalid'
            -- "#microsoft.graph.user" -> "user"
            WHEN coalesce(odata_type, '') <> '' THEN string_split(odata_type, '.')[-1]
            -- some answers omit @odata.type; only users carry a userPrincipalName
            WHEN json_exists(item, '$.userPrincipalName') THEN 'user'
            ELSE 'unknown' END AS kind,
       id AS account_id,
       coalesce(nullif(mail, ''), upn) AS email,
       display_name,
       upn AS user_principal_name,
       user_type,
       -- guests, and external people invited as members (their UPN carries #EXT#)
       coalesce(user_type = 'Guest', false) OR contains(upper(coalesce(upn, '')), '#EXT#')
           AS is_external,
       enabled
FROM fields

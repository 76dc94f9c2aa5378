"""Alert policies: rules over tagged activities that raise rows in ``alerts``.

Policy file
-----------
YAML, read from the file named by ``GROUPSYNC_POLICIES``; when unset, the bundled
``example_policies.yaml`` applies. ``policies: []`` turns every policy off::

    policies:
      - name: HR documents opened          # required, unique (case-insensitive)
        severity: medium                   # required: low | medium | high | critical
        description: ...                   # optional, free text
        include_groups: [HR]               # actor tagged with ANY of these (name or group_id);
                                           # absent or empty = everyone
        exclude_groups: [IT admins]        # actor tagged with any of these: no match
        apps: [office365]                  # activities.app, exact (case-insensitive)
        actions: [FileAccessed, FilePreviewed]   # activities.action, exact (case-sensitive)
        countries: {not_in: [US]}          # or {in: [GB, FR]}: ISO 3166-1 alpha-2
        object_name: "*.docx"              # glob or list of globs on object_name, case-insensitive
        object_site: "https://contoso.sharepoint.com/sites/hr/*"   # glob(s) on object_id
        success: false                     # activities.success (NULL never matches)
        threshold: {count: 30, window: 1h} # alert when ONE actor has >= count matches in a window
        notify: [secops@example.com]       # emailed when the policy raises alerts

Every condition present must hold (AND); a list inside one condition is ANY-of (OR). A field
that takes a list also takes a single string. Globs: ``*`` any run, ``?`` one character,
``[abc]`` / ``[a-z]`` / ``[!abc]`` a character class; every other character (``%``, ``_``,
``.``...) is literal. Quote two-letter codes YAML reads as booleans (``'NO'``, ``'ON'``).

Matching rules
--------------
* Groups are the activity's tags (``activity_groups``: the groups the actor was in when it
  happened). An entry matches a group whose ``group_id`` equals it or whose name equals it
  case-insensitively; a name shared by groups of several connections matches all of them. An
  entry matching no group in ``user_groups`` is not an error (the group may be imported later):
  evaluation returns a warning for it.
* Countries: an activity with no country (the app did not geolocate it) matches neither
  ``in`` nor ``not_in``: "not in US" means "seen somewhere known that is not the US".
* The actor is ``(connection, actor_account_id)``, else the lower-cased ``actor_email``.

Evaluation (``evaluate_policies``)
----------------------------------
* Incremental: each policy remembers in ``_policy_state`` the last ``activity_id`` it evaluated;
  a run considers activities above it, up to the highest id already tagged
  (``_tagging_state.tagged_through``), so untagged activities wait for their groups.
* A new policy, or one whose definition changed (a hash of the fields that decide matching: not
  severity, description or notify), starts at the current highest activity id: it never alerts
  on history. Renaming a policy makes it a new policy.
* Without ``threshold``: one alert per policy, actor and run, listing the run's matching
  activities (``activity_ids`` holds the first 1,000; ``activity_count`` is exact).
* With ``threshold``: a matching activity is a *trigger* when the actor's matching activities
  in ``[its time - window, its time]`` number at least ``count``. Triggers at most ``window``
  apart form one *burst*, and a burst raises one alert, covering the matches from its first
  trigger's window start to its last trigger. The window looks back at already evaluated
  activities (30 matches last run + 15 now in one hour raise the alert), but a burst whose
  first trigger was already a trigger in an earlier run only continues an alerted burst: no
  second alert, however long it lasts. Nor is one raised when an alert of the policy for the
  same actor already overlaps the burst's time span (late-arriving events reshaping a burst).
* ``alert_id`` = sha256(policy, connection, actor, lowest activity id in the alert): running
  again over the same activities gives the same ids, and existing ids are never inserted twice.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import duckdb
import pandas as pd
import yaml

from groupsync_pipeline.config import ConfigError, check_email_address
from groupsync_pipeline.storage.tagging import tagged_through
from groupsync_pipeline.yaml_located import Located, LocatedLoader, yaml_error_text

POLICIES_ENV = "GROUPSYNC_POLICIES"
EXAMPLE_POLICIES = "example_policies.yaml"

SEVERITIES = ("low", "medium", "high", "critical")
MAX_ALERT_ACTIVITY_IDS = 1000
MAX_WINDOW = dt.timedelta(days=30)  # the lookback scans 2 windows of history per run
MAX_NAME_LENGTH = 200

_FIELDS = (
    "name",
    "severity",
    "description",
    "include_groups",
    "exclude_groups",
    "apps",
    "actions",
    "countries",
    "object_name",
    "object_site",
    "success",
    "threshold",
    "notify",
)
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_COUNTRY = re.compile(r"^[A-Z]{2}$")


class PolicyError(ConfigError):
    """A policy file that cannot be used; the message names the file, policy and field."""


@dataclass(frozen=True)
class Threshold:
    count: int
    window: dt.timedelta

    @property
    def window_text(self) -> str:
        seconds = int(self.window.total_seconds())
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"{seconds // size}{unit}"
        return f"{seconds}s"


@dataclass(frozen=True)
class Policy:
    name: str
    severity: str
    description: str = ""
    include_groups: tuple[str, ...] = ()
    exclude_groups: tuple[str, ...] = ()
    apps: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    countries_in: tuple[str, ...] | None = None
    countries_not_in: tuple[str, ...] | None = None
    object_name: tuple[str, ...] = ()
    object_site: tuple[str, ...] = ()
    success: bool | None = None
    threshold: Threshold | None = None
    notify: tuple[str, ...] = ()
    source: str = field(default="", compare=False)

    def definition_hash(self) -> str:
        """A hash of what decides matching; editing severity, description or notify keeps it."""
        normalized = {
            "include_groups": sorted(self.include_groups),
            "exclude_groups": sorted(self.exclude_groups),
            "apps": sorted(self.apps),
            "actions": sorted(self.actions),
            "countries_in": sorted(self.countries_in) if self.countries_in is not None else None,
            "countries_not_in": (
                sorted(self.countries_not_in) if self.countries_not_in is not None else None
            ),
            "object_name": sorted(self.object_name),
            "object_site": sorted(self.object_site),
            "success": self.success,
            "threshold": (
                [self.threshold.count, int(self.threshold.window.total_seconds())]
                if self.threshold
                else None
            ),
        }
        text = json.dumps(normalized, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# -- loading and validation -------------------------------------------------------------------


def load_policies(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] = os.environ
) -> list[Policy]:
    """The policies in ``path``, else ``$GROUPSYNC_POLICIES``, else the bundled examples."""
    if path is None:
        path = environ.get(POLICIES_ENV, "").strip() or None
    if path is None:
        text = resources.files("groupsync_pipeline").joinpath(EXAMPLE_POLICIES).read_text()
        return parse_policies(text, f"(bundled {EXAMPLE_POLICIES})")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None
    return parse_policies(text, str(path))


def parse_policies(text: str, source: str = "(policies)") -> list[Policy]:
    """Validate a policy document; PolicyError says where and what is wrong."""
    try:
        document = yaml.load(text, Loader=LocatedLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: {yaml_error_text(exc)}") from None
    if document is None:
        raise PolicyError(f"{source}: the file is empty (expected 'policies:' with a list)")
    if not isinstance(document, dict):
        raise PolicyError(f"{source}: expected a mapping with the key 'policies'")
    for key in document:
        if key != "policies":
            raise PolicyError(f"{source}: unknown top-level key {key!r}{_did_you_mean(key)}")
    if "policies" not in document:
        raise PolicyError(f"{source}: missing the key 'policies'")
    entries = document["policies"]
    if entries is None:
        entries = []  # "policies:" with nothing under it: no policies, as with []
    if not isinstance(entries, list):
        raise PolicyError(f"{source}: 'policies' must be a list of policies")
    policies: list[Policy] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        policy = _parse_policy(source, index, entry)
        folded = policy.name.casefold()
        if folded in seen:
            raise PolicyError(
                f"{source}: {_where(entry, 'name')}policy #{index + 1} '{policy.name}': "
                f"field 'name': duplicate name (policy #{seen[folded] + 1} has it already)"
            )
        seen[folded] = index
        policies.append(policy)
    return policies


def _did_you_mean(key: object, choices: Sequence[str] = ("policies",)) -> str:
    close = difflib.get_close_matches(str(key), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _where(entry: object, key: str | None = None) -> str:
    """'line N: ' of ``key`` in a mapping read by LocatedLoader (else of the mapping), or ''."""
    if not isinstance(entry, Located):
        return ""
    return f"line {entry.lines.get(key, entry.line)}: "


Fail = Callable[[str, str], PolicyError]


def _parse_policy(source: str, index: int, entry: Any) -> Policy:
    label = f"policy #{index + 1}"
    if not isinstance(entry, dict):
        raise PolicyError(f"{source}: {label}: expected a mapping of fields, not {_kind(entry)}")
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        label = f"{label} '{name.strip()}'"

    def fail(field_name: str, problem: str) -> PolicyError:
        where = _where(entry, field_name)
        return PolicyError(f"{source}: {where}{label}: field '{field_name}': {problem}")

    for key in entry:
        if key not in _FIELDS:
            hint = _did_you_mean(key, _FIELDS) or f" (allowed: {', '.join(_FIELDS)})"
            raise fail(str(key), f"unknown field{hint}")

    if name is None:
        raise fail("name", "missing")
    if not isinstance(name, str) or not name.strip():
        raise fail("name", "must be a non-empty string")
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH or any(not c.isprintable() for c in name):
        raise fail("name", f"at most {MAX_NAME_LENGTH} printable characters")

    severity = entry.get("severity")
    if severity is None:
        raise fail("severity", f"missing (one of: {', '.join(SEVERITIES)})")
    if not isinstance(severity, str) or severity.strip().lower() not in SEVERITIES:
        raise fail("severity", f"unknown severity {severity!r} (one of: {', '.join(SEVERITIES)})")

    description = entry.get("description") or ""
    if not isinstance(description, str):
        raise fail("description", "must be text")

    def strings(key: str) -> tuple[str, ...]:
        value = entry.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise fail(key, f"must be a string or a list of strings, not {_kind(value)}")
        result: list[str] = []
        for item in items:
            if not isinstance(item, str) or not item.strip():
                raise fail(key, f"entries must be non-empty strings, not {item!r}")
            result.append(item.strip())
        return tuple(dict.fromkeys(result))  # drop repeats, keep order

    include_groups = strings("include_groups")
    exclude_groups = strings("exclude_groups")
    apps = tuple(app.lower() for app in strings("apps"))
    actions = strings("actions")
    object_name = strings("object_name")
    object_site = strings("object_site")
    for key, globs in (("object_name", object_name), ("object_site", object_site)):
        for pattern in globs:
            try:
                glob_to_regex(pattern)
            except ValueError as exc:
                raise fail(key, str(exc)) from None

    countries_in, countries_not_in = _parse_countries(entry.get("countries"), fail)

    success = entry.get("success")
    if success is not None and not isinstance(success, bool):
        raise fail("success", f"must be true or false, not {success!r}")

    threshold = _parse_threshold(entry.get("threshold"), fail)

    notify: list[str] = []
    for address in strings("notify"):
        try:
            notify.append(check_email_address(address))
        except ConfigError as exc:
            raise fail("notify", str(exc)) from None

    return Policy(
        name=name,
        severity=severity.strip().lower(),
        description=description.strip(),
        include_groups=include_groups,
        exclude_groups=exclude_groups,
        apps=apps,
        actions=actions,
        countries_in=countries_in,
        countries_not_in=countries_not_in,
        object_name=object_name,
        object_site=object_site,
        success=success,
        threshold=threshold,
        notify=tuple(notify),
        source=source,
    )


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


def _parse_countries(
    value: Any, fail: Fail
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("in", "not_in"):
        raise fail("countries", "must be {in: [codes]} or {not_in: [codes]}")
    ((mode, codes),) = value.items()
    if isinstance(codes, str):
        codes = [codes]
    if not isinstance(codes, list) or not codes:
        raise fail("countries", f"'{mode}' must be a non-empty list of two-letter country codes")
    normalized: list[str] = []
    for code in codes:
        if isinstance(code, bool):
            # YAML 1.1 reads NO (Norway), ON, YES... as booleans.
            raise fail(
                "countries",
                f"{code!r} is not a country code (YAML reads some two-letter codes such as "
                "NO as true/false: quote them, 'NO')",
            )
        if not isinstance(code, str) or not _COUNTRY.match(code.strip().upper()):
            raise fail(
                "countries", f"{code!r} is not a two-letter ISO 3166-1 code (e.g. US, GB, DE)"
            )
        normalized.append(code.strip().upper())
    codes_tuple = tuple(dict.fromkeys(normalized))
    return (codes_tuple, None) if mode == "in" else (None, codes_tuple)


def _parse_threshold(value: Any, fail: Fail) -> Threshold | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise fail("threshold", "must be {count: N, window: 1h}")
    for key in value:
        if key not in ("count", "window"):
            hint = _did_you_mean(key, ("count", "window")) or " (allowed: count, window)"
            raise fail("threshold", f"unknown key {key!r}{hint}")
    count = value.get("count")
    if count is None:
        raise fail("threshold", "'count' is missing")
    if isinstance(count, bool) or not isinstance(count, int):
        raise fail("threshold", f"'count' must be a whole number, not {count!r}")
    if count < 1:
        raise fail("threshold", f"'count' must be at least 1, not {count}")
    window_text = value.get("window")
    if window_text is None:
        raise fail("threshold", "'window' is missing (e.g. 15m, 1h, 1d)")
    match = _WINDOW.match(window_text) if isinstance(window_text, str) else None
    if match is None:
        raise fail(
            "threshold",
            f"'window' {window_text!r} is not a duration: a number and s, m, h or d "
            "(e.g. 15m, 1h, 1d)",
        )
    window = dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    if not dt.timedelta(0) < window <= MAX_WINDOW:
        raise fail("threshold", f"'window' must be more than 0 and at most {MAX_WINDOW.days}d")
    return Threshold(count=count, window=window)


def glob_to_regex(pattern: str) -> str:
    """A case-insensitive RE2 pattern matching the whole text against a glob.

    Every character outside ``* ? [...]`` becomes a ``\\x{..}`` escape, so ``%``, ``_``, ``.``,
    ``\\`` and the like are literal and nothing in the glob can change the regex's meaning.
    """

    def literal(char: str) -> str:
        return char if char.isalnum() and char.isascii() else f"\\x{{{ord(char):x}}}"

    out: list[str] = ["(?is)"]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            end = i + 1
            if end < len(pattern) and pattern[end] == "!":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                end += 1  # ']' first in a class is literal
            end = pattern.find("]", end)
            if end == -1:
                out.append(literal("["))  # no closing bracket: a literal '['
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith("!")
                if negate:
                    body = body[1:]
                out.append("[^" if negate else "[")
                j = 0
                while j < len(body):
                    if j + 2 < len(body) and body[j + 1] == "-":
                        low, high = body[j], body[j + 2]
                        if low > high:
                            raise ValueError(f"bad range '{low}-{high}' in glob {pattern!r}")
                        out.append(f"{literal(low)}-{literal(high)}")
                        j += 3
                    else:
                        out.append(literal(body[j]))
                        j += 1
                out.append("]")
                i = end
        else:
            out.append(literal(char))
        i += 1
    return "".join(out)


# -- evaluation -------------------------------------------------------------------------------

Status = Literal["evaluated", "started", "restarted", "waiting"]


@dataclass
class PolicyOutcome:
    """What one policy did in one run."""

    policy: str
    status: Status  # started: new policy; restarted: definition changed; waiting: nothing new
    evaluated_from: int  # activities with activity_id > this ...
    evaluated_through: int  # ... and <= this were considered
    activities_considered: int = 0
    matches: int = 0  # considered activities that matched the policy's conditions
    alerts_raised: int = 0


@dataclass
class PolicyRunResult:
    outcomes: list[PolicyOutcome]
    alerts: pd.DataFrame  # the new rows of ``alerts``
    warnings: list[str]

    @property
    def alerts_raised(self) -> int:
        return len(self.alerts)


def evaluate_policies(
    conn: duckdb.DuckDBPyConnection, policies: Sequence[Policy], now: dt.datetime
) -> PolicyRunResult:
    """Evaluate every policy on the activities it has not seen; insert alerts, advance state.

    Runs inside the caller's transaction (no BEGIN/COMMIT here), so alerts and state move
    together.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    names = [policy.name for policy in policies]
    if len(set(names)) != len(names):
        # The name keys _policy_state: two policies sharing one would overwrite each other.
        raise ValueError(f"policy names must be unique: {sorted(names)}")
    # Only tagged activities: evaluating an untagged one would miss its groups for good.
    head = tagged_through(conn)
    states = {
        row[0]: (int(row[1]), row[2])
        for row in conn.execute(
            "SELECT policy, evaluated_through, definition_hash FROM _policy_state"
        ).fetchall()
    }
    outcomes: list[PolicyOutcome] = []
    frames: list[pd.DataFrame] = []
    for policy in policies:
        digest = policy.definition_hash()
        state = states.get(policy.name)
        if state is None or state[1] != digest:
            # New or changed: start at the head, never alert on history.
            outcomes.append(
                PolicyOutcome(policy.name, "started" if state is None else "restarted", head, head)
            )
            _save_state(conn, policy.name, head, digest)
            continue
        low = state[0]
        if head <= low:
            outcomes.append(PolicyOutcome(policy.name, "waiting", low, low))
            continue
        outcome = PolicyOutcome(policy.name, "evaluated", low, head)
        conditions, params = _conditions(policy)
        params.update({"low": low, "high": head})
        considered, matches = conn.execute(
            f"SELECT count(*), count(*) FILTER (WHERE {conditions}) FROM activities AS a"
            " WHERE a.activity_id > $low AND a.activity_id <= $high",
            params,
        ).fetchall()[0]
        outcome.activities_considered, outcome.matches = int(considered), int(matches)
        if matches:
            new = _raise_alerts(conn, policy, conditions, params, now)
            outcome.alerts_raised = len(new)
            frames.append(new)
        _save_state(conn, policy.name, head, digest)
        outcomes.append(outcome)
    alerts = pd.concat(frames, ignore_index=True) if frames else _empty_alerts(conn)
    return PolicyRunResult(outcomes, alerts, unknown_group_warnings(conn, policies))


def _save_state(conn: duckdb.DuckDBPyConnection, name: str, through: int, digest: str) -> None:
    conn.execute("DELETE FROM _policy_state WHERE policy = ?", [name])
    conn.execute(
        "INSERT INTO _policy_state (policy, evaluated_through, definition_hash)"
        " VALUES ($policy, $through, $digest)",
        {"policy": name, "through": through, "digest": digest},
    )


def _empty_alerts(conn: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    return conn.execute("SELECT * FROM alerts LIMIT 0").df()


# A tag matches a group entry by group_id, or by name case-insensitively (names repeat across
# connections: all of them match). Tags are stored by group_key (see schema.sql).
_TAG_MATCH = "(list_contains(${p}_ids, g.group_id) OR list_contains(${p}_names, lower(g.name)))"


def _group_exists(prefix: str) -> str:
    return (
        "EXISTS (SELECT 1 FROM _activity_group_keys AS ag"
        " JOIN user_groups AS g ON g.group_key = ag.group_key"
        f" WHERE ag.activity_id = a.activity_id AND {_TAG_MATCH.format(p=prefix)})"
    )


def _conditions(policy: Policy) -> tuple[str, dict[str, object]]:
    """The policy as one SQL predicate on ``activities AS a``; every value is a parameter."""
    where: list[str] = []
    params: dict[str, object] = {}
    for prefix, entries in (("inc", policy.include_groups), ("exc", policy.exclude_groups)):
        if entries:
            params[f"{prefix}_ids"] = list(entries)
            params[f"{prefix}_names"] = [entry.lower() for entry in entries]
    if policy.include_groups:
        where.append(_group_exists("inc"))
    if policy.exclude_groups:
        where.append(f"NOT {_group_exists('exc')}")
    if policy.apps:
        where.append("list_contains($apps, lower(a.app))")
        params["apps"] = list(policy.apps)
    if policy.actions:
        where.append("list_contains($actions, a.action)")
        params["actions"] = list(policy.actions)
    # A NULL country matches neither form: upper(NULL) is NULL and the WHERE drops it.
    if policy.countries_in is not None:
        where.append("list_contains($countries, upper(a.country))")
        params["countries"] = list(policy.countries_in)
    if policy.countries_not_in is not None:
        where.append("NOT list_contains($countries, upper(a.country))")
        params["countries"] = list(policy.countries_not_in)
    for column, globs in (("object_name", policy.object_name), ("object_id", policy.object_site)):
        if globs:
            parts = []
            for number, pattern in enumerate(globs):
                key = f"{column}_glob_{number}"
                params[key] = glob_to_regex(pattern)
                parts.append(f"regexp_full_match(a.{column}, ${key})")
            where.append("coalesce(" + " OR ".join(parts) + ", false)")
    if policy.success is not None:
        where.append("a.success = $success")
        params["success"] = policy.success
    return (" AND ".join(f"({part})" for part in where) or "true"), params


_ACTOR_KEY = "coalesce(a.actor_account_id, 'email:' || lower(a.actor_email), '?')"

# Non-threshold: every matching activity of the run belongs to its actor's one alert.
_PLAIN_ROWS = f"""
alert_rows AS (
    SELECT a.activity_id, a.connection, a.occurred_at, a.actor_account_id, a.actor_email,
           a.object_name, {_ACTOR_KEY} AS actor_key, 0 AS burst
    FROM activities AS a
    WHERE a.activity_id > $low AND a.activity_id <= $high AND {{conditions}}
)"""

# Threshold: see the module docstring. Per actor with new matches, the history looked at reaches
# 2 windows before their first new match: trigger counts are exact from 1 window before it,
# which is as far back as a trigger can be that decides whether a new trigger starts a burst.
_THRESHOLD_ROWS = f"""
new_actors AS (
    SELECT a.connection, {_ACTOR_KEY} AS actor_key, min(a.occurred_at) AS first_new_at
    FROM activities AS a
    WHERE a.activity_id > $low AND a.activity_id <= $high AND {{conditions}}
    GROUP BY ALL
),
matched AS (
    SELECT a.activity_id, a.connection, a.occurred_at, a.actor_account_id, a.actor_email,
           a.object_name, n.actor_key, n.first_new_at
    FROM activities AS a
    JOIN new_actors AS n ON n.connection = a.connection AND n.actor_key = {_ACTOR_KEY}
    WHERE a.activity_id <= $high
      AND a.occurred_at >= n.first_new_at - 2 * $window::INTERVAL
      AND {{conditions}}
),
windowed AS (
    SELECT *,
           count(*) OVER w AS window_count,
           max(activity_id) OVER w AS window_max_id
    FROM matched
    WINDOW w AS (PARTITION BY connection, actor_key ORDER BY occurred_at
                 RANGE BETWEEN $window::INTERVAL PRECEDING AND CURRENT ROW)
),
triggers AS (
    SELECT *,
           window_max_id > $low AS fresh,  -- its window holds a new activity: new trigger
           lag(occurred_at) OVER (PARTITION BY connection, actor_key
                                  ORDER BY occurred_at, activity_id) AS previous_at
    FROM windowed
    WHERE window_count >= $count
      AND occurred_at >= first_new_at - $window::INTERVAL  -- only where the count is exact
),
numbered AS (
    SELECT *,
           sum(CASE WHEN previous_at IS NULL OR occurred_at - previous_at > $window::INTERVAL
                    THEN 1 ELSE 0 END)
               OVER (PARTITION BY connection, actor_key ORDER BY occurred_at, activity_id
                     ROWS UNBOUNDED PRECEDING) AS burst
    FROM triggers
),
bursts AS (
    SELECT connection, actor_key, burst,
           min(occurred_at) - $window::INTERVAL AS from_at,
           max(occurred_at) AS to_at
    FROM numbered
    GROUP BY ALL
    -- A first trigger that was a trigger before continues an already alerted burst.
    HAVING first(fresh ORDER BY occurred_at, activity_id)
),
alert_rows AS (
    SELECT m.activity_id, m.connection, m.occurred_at, m.actor_account_id, m.actor_email,
           m.object_name, m.actor_key, b.burst
    FROM matched AS m
    JOIN bursts AS b ON b.connection = m.connection AND b.actor_key = m.actor_key
     AND m.occurred_at BETWEEN b.from_at AND b.to_at
)"""

# The new alerts go to a temporary table first: DuckLake has no INSERT ... RETURNING.
_NEW_ALERTS = """
CREATE OR REPLACE TEMP TABLE new_alerts AS
WITH {rows},
alert_groups AS (
    -- The actor's tags that made it match (with no include_groups: all of its tags).
    SELECT r.connection, r.actor_key, r.burst,
           list(DISTINCT g.name ORDER BY g.name) AS groups
    FROM alert_rows AS r
    JOIN _activity_group_keys AS ag ON ag.activity_id = r.activity_id
    JOIN user_groups AS g ON g.group_key = ag.group_key
    WHERE {group_filter}
    GROUP BY ALL
),
candidates AS (
    SELECT sha256(concat_ws(chr(31), $policy, r.connection, r.actor_key,
                            min(r.activity_id)::VARCHAR)) AS alert_id,
           r.connection, r.actor_key, r.burst,
           max(r.actor_account_id) AS actor_account_id,
           max(r.actor_email) AS actor_email,
           list(r.activity_id ORDER BY r.activity_id)[1:{cap}] AS activity_ids,
           count(*) AS activity_count,
           min(r.occurred_at) AS first_at,
           max(r.occurred_at) AS last_at
    FROM alert_rows AS r
    GROUP BY r.connection, r.actor_key, r.burst
)
SELECT c.alert_id, $policy::VARCHAR AS policy, $severity::VARCHAR AS severity,
       $now::TIMESTAMPTZ AS raised_at, c.connection, c.actor_account_id, c.actor_email,
       coalesce(ag.groups, []::VARCHAR[]) AS groups, c.activity_ids, c.activity_count,
       c.first_at, c.last_at,
       format('{{}}: {{}} ({{}}) {{}} {{}} between {{}} and {{}} UTC{{}}', $policy,
              coalesce(c.actor_email, c.actor_account_id, 'unknown actor'), c.connection,
              c.activity_count,
              CASE WHEN c.activity_count = 1 THEN 'matching activity'
                   ELSE 'matching activities' END,
              strftime(c.first_at AT TIME ZONE 'UTC', '%Y-%m-%d %H:%M'),
              strftime(c.last_at AT TIME ZONE 'UTC', '%Y-%m-%d %H:%M'),
              $summary_suffix) AS summary,
       NULL::TIMESTAMPTZ AS notified_at
FROM candidates AS c
LEFT JOIN alert_groups AS ag
  ON ag.connection = c.connection AND ag.actor_key = c.actor_key AND ag.burst = c.burst
WHERE NOT EXISTS (SELECT 1 FROM alerts AS x WHERE x.alert_id = c.alert_id)
  {overlap_guard}
"""

# Threshold alerts: none when an alert of the policy for the actor already overlaps the burst.
_OVERLAP_GUARD = """
  AND NOT EXISTS (
      SELECT 1 FROM alerts AS x
      WHERE x.policy = $policy AND x.connection = c.connection
        AND coalesce(x.actor_account_id, 'email:' || lower(x.actor_email), '?') = c.actor_key
        AND x.first_at <= c.last_at AND x.last_at >= c.first_at)"""


def _raise_alerts(
    conn: duckdb.DuckDBPyConnection,
    policy: Policy,
    conditions: str,
    params: dict[str, object],
    now: dt.datetime,
) -> pd.DataFrame:
    params = {
        **params,
        "policy": policy.name,
        "severity": policy.severity,
        "now": now,
        "summary_suffix": "",
    }
    group_filter = _TAG_MATCH.format(p="inc") if policy.include_groups else "true"
    if policy.threshold is None:
        rows = _PLAIN_ROWS.format(conditions=conditions)
        guard = ""
    else:
        rows = _THRESHOLD_ROWS.format(conditions=conditions)
        guard = _OVERLAP_GUARD
        seconds = int(policy.threshold.window.total_seconds())
        params["window"] = f"{seconds} seconds"
        params["count"] = policy.threshold.count
        params["summary_suffix"] = (
            f" (threshold: {policy.threshold.count} within {policy.threshold.window_text})"
        )
    sql = _NEW_ALERTS.format(
        rows=rows, group_filter=group_filter, overlap_guard=guard, cap=MAX_ALERT_ACTIVITY_IDS
    )
    conn.execute(sql, params)
    conn.execute("INSERT INTO alerts BY NAME SELECT * FROM new_alerts")
    new = conn.execute("SELECT * FROM new_alerts").df()
    conn.execute("DROP TABLE new_alerts")
    return new


def unknown_group_warnings(
    conn: duckdb.DuckDBPyConnection, policies: Sequence[Policy]
) -> list[str]:
    """One warning per include/exclude entry that names no group in ``user_groups`` (yet)."""
    entries = sorted({e for p in policies for e in (*p.include_groups, *p.exclude_groups)})
    if not entries:
        return []
    known = {
        row[0]
        for row in conn.execute(
            "SELECT e FROM unnest($entries::VARCHAR[]) AS t(e)"
            " WHERE EXISTS (SELECT 1 FROM user_groups AS g"
            "               WHERE g.group_id = e OR lower(g.name) = lower(e))",
            {"entries": entries},
        ).fetchall()
    }
    warnings: list[str] = []
    for policy in policies:
        for key, values in (
            ("include_groups", policy.include_groups),
            ("exclude_groups", policy.exclude_groups),
        ):
            for value in values:
                if value not in known:
                    effect = (
                        "it matches no one until such a group is imported"
                        if key == "include_groups"
                        else "it excludes no one until such a group is imported"
                    )
                    warnings.append(
                        f"policy '{policy.name}': {key} entry '{value}' is not the name or id "
                        f"of any group in user_groups: {effect}"
                    )
    return warnings


__all__ = [
    "EXAMPLE_POLICIES",
    "POLICIES_ENV",
    "SEVERITIES",
    "Policy",
    "PolicyError",
    "PolicyOutcome",
    "PolicyRunResult",
    "Threshold",
    "evaluate_policies",
    "glob_to_regex",
    "load_policies",
    "parse_policies",
    "unknown_group_warnings",
]

"""Alert emails: one message per policy with ``notify``, listing its alerts not yet emailed.

``alerts.notified_at`` is the outbox: NULL means "not emailed yet". ``send_pending_alert_emails``
sends, for each policy with ``notify``, one email listing that policy's alerts with NULL
``notified_at`` and sets it on them once the SMTP server accepted the message. Called right
after ``evaluate_policies`` it emails the new alerts; a failed send leaves them NULL, so the next
call retries them together with whatever is new. Without SMTP settings nothing is sent and the
alerts stay pending (reported as skipped).

Run it in its own short write transaction after the evaluation committed: if the evaluation's
transaction rolled back after an email went out, the email would describe alerts that do not
exist. If this second transaction fails after sending, the next call sends the email again
(same Message-ID, so a mail client can drop the repeat).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Literal

import duckdb
import pandas as pd

from groupsync_pipeline.config import ConfigError, check_email_address
from groupsync_pipeline.notifications import EmailDeliveryError, SmtpSettings, send_message
from groupsync_pipeline.policies import Policy

LISTED_ALERTS = 50  # alerts described in one email; the rest are counted
OBJECT_NAMES_PER_ALERT = 5
DEFAULT_MAX_AGE = dt.timedelta(days=7)  # older pending alerts are not emailed any more
TEXT_LIMIT = 200

Status = Literal["sent", "failed", "skipped"]


@dataclass
class AlertEmailOutcome:
    policy: str
    status: Status
    alerts: int  # pending alerts the email covered (or would have)
    recipients: tuple[str, ...]
    reason: str | None = None  # why it failed or was skipped


@dataclass
class AlertEmailRound:
    outcomes: list[AlertEmailOutcome] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def sent(self) -> int:
        return self.count("sent")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def skipped(self) -> int:
        return self.count("skipped")


_PENDING_SQL = f"""
WITH pending AS (
    SELECT * FROM alerts
    WHERE policy = $policy AND notified_at IS NULL AND raised_at >= $since
),
objects AS (
    SELECT p.alert_id,
           list(DISTINCT a.object_name ORDER BY a.object_name)[1:{OBJECT_NAMES_PER_ALERT}]
               AS object_names
    FROM (SELECT alert_id, unnest(activity_ids) AS activity_id FROM pending) AS p
    JOIN activities AS a ON a.activity_id = p.activity_id
    WHERE a.object_name IS NOT NULL
    GROUP BY p.alert_id
)
SELECT p.*, coalesce(o.object_names, []::VARCHAR[]) AS object_names
FROM pending AS p
LEFT JOIN objects AS o ON o.alert_id = p.alert_id
ORDER BY p.first_at, p.alert_id
"""


def pending_alerts(
    conn: duckdb.DuckDBPyConnection, policy: str, since: dt.datetime
) -> pd.DataFrame:
    """The policy's alerts raised since ``since`` and not emailed, with a few object names."""
    return conn.execute(_PENDING_SQL, {"policy": policy, "since": since}).df()


def send_pending_alert_emails(
    conn: duckdb.DuckDBPyConnection,
    policies: Sequence[Policy],
    settings: SmtpSettings | None,
    now: dt.datetime,
    *,
    max_age: dt.timedelta = DEFAULT_MAX_AGE,
    deadline: float | None = None,
    environ: Mapping[str, str] = os.environ,
) -> AlertEmailRound:
    """Email each notifying policy's pending alerts; set ``notified_at`` on what was sent.

    An SMTP failure is reported in the round (status ``failed``), never raised: the alerts stay
    pending for the next call. Runs in the caller's transaction, which holds the lake: each
    delivery is bounded in total (``send_message``'s default), and ``deadline`` (a
    ``time.monotonic()`` value) bounds them all.
    """
    result = AlertEmailRound()
    since = now - max_age
    for policy in policies:
        if not policy.notify:
            continue
        alerts = pending_alerts(conn, policy.name, since)
        if alerts.empty:
            continue
        outcome = AlertEmailOutcome(policy.name, "sent", len(alerts), policy.notify)
        result.outcomes.append(outcome)
        if settings is None:
            outcome.status = "skipped"
            outcome.reason = "email is off: GROUPSYNC_SMTP_HOST is not set"
            continue
        try:
            message = alert_email_message(policy, alerts, settings.sender, now)
            send_message(settings, message, environ, deadline=deadline)
        except (EmailDeliveryError, ConfigError) as exc:
            outcome.status = "failed"
            outcome.reason = str(exc)
            continue
        conn.execute(
            "UPDATE alerts SET notified_at = $now WHERE list_contains($ids, alert_id)",
            {"now": now, "ids": alerts["alert_id"].tolist()},
        )
    return result


def alert_email_message(
    policy: Policy, alerts: pd.DataFrame, sender: str, now: dt.datetime
) -> EmailMessage:
    """One email to the policy's ``notify`` list describing ``alerts`` (rows of ``alerts``,
    plus an optional ``object_names`` column)."""
    from_address = check_email_address(sender)
    recipients = [check_email_address(address) for address in policy.notify]
    if not recipients:
        raise ConfigError(f"policy '{policy.name}' has no notify addresses")
    name = _one_line(policy.name, 80)
    count = len(alerts)
    noun = "alert" if count == 1 else "alerts"
    message = EmailMessage()
    message["From"] = from_address
    message["To"] = ", ".join(recipients)
    message["Subject"] = f"groupsync alert: {name} ({policy.severity}): {count} new {noun}"
    message["Date"] = format_datetime(_utc(now))
    # Same alerts, same id: a resend after a lost acknowledgement can be recognised.
    digest = hashlib.sha256("\n".join(sorted(alerts["alert_id"])).encode()).hexdigest()[:32]
    message["Message-ID"] = f"<groupsync-alerts-{digest}@{from_address.rsplit('@', 1)[1]}>"
    message.set_content(_body(policy, alerts))
    return message


def _body(policy: Policy, alerts: pd.DataFrame) -> str:
    count = len(alerts)
    lines = [
        f"Policy '{_one_line(policy.name, TEXT_LIMIT)}' (severity {policy.severity}) raised "
        f"{count} new {'alert' if count == 1 else 'alerts'}.",
    ]
    if policy.description:
        lines.append(_one_line(policy.description, 500))
    lines.append("")
    for number, row in enumerate(alerts.head(LISTED_ALERTS).itertuples(index=False), start=1):
        lines += _alert_lines(number, row)
    if count > LISTED_ALERTS:
        lines.append(f"... and {count - LISTED_ALERTS} more (see the alerts table).")
        lines.append("")
    lines.append(
        "Details: the alerts table (activity_ids) joined to activities_tagged in groupsync.duckdb."
    )
    return "\n".join(lines) + "\n"


def _alert_lines(number: int, row: Any) -> list[str]:
    actor = row.actor_email or row.actor_account_id or "unknown actor"
    groups = ", ".join(_one_line(g, 80) for g in _as_list(row.groups)) or "(none)"
    rows = [
        ("Actor", f"{_one_line(str(actor), TEXT_LIMIT)} ({_one_line(row.connection, 80)})"),
        ("Groups", groups),
        ("Activities", str(int(row.activity_count))),
        ("First", _when(row.first_at)),
        ("Last", _when(row.last_at)),
    ]
    objects = [_one_line(str(o), 120) for o in _as_list(getattr(row, "object_names", []))]
    if objects:
        rows.append(("Objects", "; ".join(objects)))
    rows.append(("Alert id", str(row.alert_id)))
    width = max(len(label) for label, _ in rows) + 1
    return [
        f"{number}. {_one_line(str(row.summary), 400)}",
        *(f"   {label + ':':<{width}} {value}" for label, value in rows),
        "",
    ]


def _as_list(value: Any) -> list[Any]:
    # DuckDB lists arrive in pandas as numpy arrays or lists; NULL as None.
    return [] if value is None else list(value)


def _when(value: Any) -> str:
    return _utc(pd.Timestamp(value).to_pydatetime()).strftime("%Y-%m-%d %H:%M:%S UTC")


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _one_line(text: str, limit: int) -> str:
    """Control characters and line breaks become spaces (no header or layout injection)."""
    cleaned = "".join(" " if unicodedata.category(c)[0] in "CZ" and c != " " else c for c in text)
    cleaned = re.sub(r"\s+", " ", cleaned).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1].rstrip() + "…"

"""Benchmark: the hourly delta sync against a full re-read of every imported group.

Imports --groups groups holding --members memberships in all from the sandbox tenant, starts
the delta chain (the first sync is a full read), applies --changes membership changes in the
tenant, then times and counts HTTP requests for: the delta sync, a sync with no changes, and a
full re-read done two ways (a forced full delta resync, and re-importing every group through
transitiveMembers as the imports do: the "full re-read" the goal is measured against).
Goal: at least 50x fewer requests than the full re-read; a no-change sync in at most 2 Graph
requests per connection. Exits 1 when a goal is missed; stops at once if the lake does
not match the tenant after the delta sync.

    python bench/hourly_sync.py [--groups 50] [--members 100000] [--changes 20] [--latency-ms 0]

The sandbox serves from its own process (so it does not compete for the GIL with the pipeline)
and takes commands over a pipe: apply changes, reset or report its request log, stop.
--latency-ms delays every top-level Graph request (not token requests, not the items inside a
$batch), like a remote service would.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as PipeEnd
from typing import Any

CONNECTION = "bench"
SECRET_ENV = "GROUPSYNC_BENCH_SECRET"
GROUP_PREFIX = "Bench sync"
# Top-level Graph requests this pipeline makes: groups (delta, lookups, members) and $batch.
# Inner $batch items are matched as /v1.0/users/... and so escape the delay, as intended.
LATENCY_PATH = r"^/v1\.0/(groups|\$batch)"


# -- the tenant (server process) ------------------------------------------------------------


def request_kind(path: str) -> str:
    """A short name for what a logged request was, to tell where requests go."""
    if not path.startswith("/v1.0/"):
        if path.endswith("openid-configuration"):
            return "id:discovery"
        return "id:token" if path.endswith("/token") else f"id:{path}"
    rest = path.removeprefix("/v1.0")
    if rest == "/groups/delta":
        return "delta"
    if rest == "/$batch":
        return "$batch"
    if rest.endswith("/$count"):
        return "$count"
    if rest.endswith("/transitiveMembers"):
        return "transitiveMembers"
    return "group" if rest.count("/") == 2 and rest.startswith("/groups/") else rest


def apply_changes(org: Any, group_ids: list[str], count: int, seed: str) -> tuple[int, int]:
    """``count`` effective joins/leaves over the imported groups; same seed, same changes."""
    rng = random.Random(seed)
    rand = rng.random  # int(rand() * n) like seed.py: stable output for a given seed
    user_ids = org.user_id_list()
    joined = left = 0
    while joined + left < count:
        gid = group_ids[int(rand() * len(group_ids))]
        members = org.groups[gid].members
        if rand() < 0.5:
            joined += org.add_member(gid, user_ids[int(rand() * len(user_ids))])
        elif members:
            left += org.remove_member(gid, members[int(rand() * len(members))])
    return joined, left


def memberships_digest(pairs: list[tuple[str, str]]) -> tuple[int, str]:
    """Count and hash of (group, user) pairs: compares two sides without shipping 100k rows."""
    text = "\n".join(f"{g} {u}" for g, u in sorted(pairs))
    return len(pairs), hashlib.sha256(text.encode()).hexdigest()


def serve(groups: int, members: int, users: int, latency_ms: float, pipe: PipeEnd) -> None:
    from groupsync_pipeline.sandbox.graph import GraphSandbox
    from groupsync_pipeline.sandbox.seed import build_organisation

    started = time.perf_counter()
    # Even split; extra groups hold users directly, so transitive size = direct size.
    sizes = {
        f"{GROUP_PREFIX} {i:03d}": members // groups + (i < members % groups) for i in range(groups)
    }
    org = build_organisation(seed=7, users=users, extra_groups=sizes)
    group_ids = [org.group_by_name(name).id for name in sizes]
    built = time.perf_counter() - started
    with GraphSandbox(org) as tenant:
        if latency_ms:
            tenant.faults.add("timeout", path=LATENCY_PATH, count=10**9, delay=latency_ms / 1000)
        pipe.send(
            {
                **tenant.connection_settings(),
                "group_ids": group_ids,
                "tenant_groups": len(org.groups),
                "users": len(org.users),
                "memberships": sum(len(org.transitive_user_ids(g)) for g in group_ids),
                "build_seconds": built,
            }
        )
        rounds = 0
        while True:
            command, *args = pipe.recv()
            if command == "stop":
                pipe.send(None)
                return
            if command == "reset":
                tenant.reset_log()
                pipe.send(None)
            elif command == "counts":
                log = list(tenant.requests)
                kinds = Counter(request_kind(r.path) for r in log)
                failed = sum(1 for r in log if not 200 <= r.status < 300)
                pipe.send({"kinds": dict(kinds), "failed": failed})
            elif command == "changes":
                rounds += 1
                pipe.send(apply_changes(org, group_ids, args[0], f"hourly-sync:{rounds}"))
            elif command == "expected":
                with org.lock:
                    pairs = [(g, u) for g in group_ids for u in org.transitive_user_ids(g)]
                pipe.send(memberships_digest(pairs))
            else:
                pipe.send(ValueError(f"unknown command {command!r}"))


class Tenant:
    """The pipeline's handle on the server process."""

    def __init__(self, pipe: PipeEnd) -> None:
        self.pipe = pipe

    def ask(self, *command: Any) -> Any:
        self.pipe.send(command)
        answer = self.pipe.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer


# -- the pipeline (this process) ------------------------------------------------------------


@dataclass
class Phase:
    label: str
    seconds: float
    kinds: dict[str, int]
    failed: int
    pages: int
    rss_mb: float
    note: str = ""
    graph: int = field(init=False)
    identity: int = field(init=False)

    def __post_init__(self) -> None:
        self.identity = sum(n for k, n in self.kinds.items() if k.startswith("id:"))
        self.graph = sum(self.kinds.values()) - self.identity

    @property
    def total(self) -> int:
        return self.graph + self.identity


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measured(tenant: Tenant, label: str, work: Callable[[], tuple[int, str]]) -> Phase:
    """Run one phase with a clean request log; ``work`` returns (pages, note)."""
    tenant.ask("reset")
    started = time.perf_counter()
    pages, note = work()
    seconds = time.perf_counter() - started
    counts = tenant.ask("counts")
    return Phase(label, seconds, counts["kinds"], counts["failed"], pages, peak_rss_mb(), note)


def stored_digest(lake: Any) -> tuple[int, str]:
    with lake.read() as conn:
        pairs = conn.execute(
            "SELECT g.remote_group_id, m.account_id FROM group_memberships AS m "
            "JOIN user_groups AS g USING (group_id) "
            "WHERE m.valid_to IS NULL AND m.connection = ?",
            [CONNECTION],
        ).fetchall()
    return memberships_digest([(g, u) for g, u in pairs])


def verify(tenant: Tenant, lake: Any, when: str) -> int:
    """Fail loudly unless the lake's open memberships are exactly the tenant's."""
    expected, stored = tenant.ask("expected"), stored_digest(lake)
    if stored != expected:
        raise SystemExit(
            f"FAIL {when}: lake has {stored[0]:,} open memberships, tenant {expected[0]:,}"
            + (" (same count, different members)" if stored[0] == expected[0] else "")
        )
    return expected[0]


def run(args: argparse.Namespace, settings: dict[str, Any], tenant: Tenant) -> list[Phase]:
    from groupsync_pipeline.config import Connection
    from groupsync_pipeline.imports import import_group_members
    from groupsync_pipeline.membership_sync import sync_connection
    from groupsync_pipeline.storage.control import ControlStore
    from groupsync_pipeline.storage.lake import Lake

    os.environ[SECRET_ENV] = settings["client_secret"]
    connection = Connection(
        name=CONNECTION,
        app="office365",
        tenant_id=settings["tenant_id"],
        client_id=settings["client_id"],
        client_secret_env=SECRET_ENV,
        authority_host=settings["authority_host"],
        graph_url=settings["graph_url"],
        ca_bundle=settings["ca_bundle"],
    )
    group_ids: list[str] = settings["group_ids"]
    data_dir = tempfile.TemporaryDirectory(prefix="bench-hourly-")
    lake, control = Lake(data_dir.name), ControlStore(data_dir.name)

    def import_all() -> tuple[int, str]:
        # One import per group, as a person (or the Dagster asset) would request them.
        outcomes = [import_group_members(connection, gid, lake) for gid in group_ids]
        return sum(
            o.pages for o in outcomes
        ), f"{sum(o.result.members for o in outcomes):,} members"

    outcomes: list[Any] = []  # the syncs' outcomes, to check the delta sync's figures

    def sync(force_full: bool = False) -> Callable[[], tuple[int, str]]:
        def work() -> tuple[int, str]:
            o = sync_connection(connection, lake, control, force_full=force_full)
            outcomes.append(o)
            return o.pages, f"{o.mode}, +{o.joined} / -{o.left}, {o.accounts_fetched} fetched"

        return work

    phases: list[Phase] = []
    try:
        phases.append(measured(tenant, f"(1) import {len(group_ids)} groups (setup)", import_all))
        verify(tenant, lake, "after the imports")
        phases.append(measured(tenant, "(2) first sync: full read, new chain", sync()))
        joined, left = tenant.ask("changes", args.changes)
        delta = measured(tenant, f"(3) delta sync, {args.changes} changes", sync())
        phases.append(delta)
        count = verify(tenant, lake, "after the delta sync")
        if (outcomes[-1].mode, outcomes[-1].joined, outcomes[-1].left) != ("delta", joined, left):
            raise SystemExit(f"FAIL: tenant made +{joined} / -{left}; the sync: {delta.note}")
        delta.note += f"; verified {count:,}"
        phases.append(measured(tenant, "(4) sync with no changes", sync()))
        phases.append(measured(tenant, "(5a) full re-read: forced full delta", sync(True)))
        phases.append(
            measured(tenant, f"(5b) full re-read: transitiveMembers x{len(group_ids)}", import_all)
        )
        verify(tenant, lake, "after the full re-reads")
    finally:
        data_dir.cleanup()
    return phases


def report(args: argparse.Namespace, settings: dict[str, Any], phases: list[Phase]) -> bool:
    print(
        f"\ntenant: {settings['users']:,} users, {settings['tenant_groups']} groups "
        f"(built in {settings['build_seconds']:.2f} s); imported {len(settings['group_ids'])} "
        f"groups, {settings['memberships']:,} memberships; {args.latency_ms:g} ms added per "
        "Graph request"
    )
    print(
        f"{'phase':<40} {'Graph':>6} {'ident':>6} {'pages':>6} {'wall s':>8} {'RSS MB':>7}  result"
    )
    for p in phases:
        print(
            f"{p.label:<40} {p.graph:>6} {p.identity:>6} {p.pages:>6} {p.seconds:>8.2f} "
            f"{p.rss_mb:>7.0f}  {p.note}"
        )
    print("requests by kind (ident = id:discovery + id:token; non-2xx answers counted apart):")
    for p in phases:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(p.kinds.items(), key=lambda kv: -kv[1]))
        failed = f"; {p.failed} non-2xx" if p.failed else ""
        print(f"  {p.label.split()[0]:<5} {kinds}{failed}")

    _, _, delta, quiet, full_delta, reimport = phases
    ok = True
    print()
    for name, full in (
        ("transitiveMembers re-import (the goal's)", reimport),
        ("forced full delta", full_delta),
    ):
        ratio_all = full.total / delta.total
        ratio_graph = full.graph / max(delta.graph, 1)
        verdict = ""
        if full is reimport:
            verdict = "  goal >= 50x: " + ("PASS" if ratio_all >= 50 else "FAIL")
            ok &= ratio_all >= 50
        print(
            f"full re-read [{name}] / delta sync: {full.total}/{delta.total} HTTP requests = "
            f"{ratio_all:.0f}x (Graph only {full.graph}/{delta.graph} = {ratio_graph:.0f}x), "
            f"wall {full.seconds / delta.seconds:.0f}x{verdict}"
        )
    quiet_ok = quiet.graph <= 2
    ok &= quiet_ok
    print(
        f"no-change sync: {quiet.graph} Graph request(s) for 1 connection (goal <= 2: "
        f"{'PASS' if quiet_ok else 'FAIL'}), plus {quiet.identity} identity requests "
        f"(openid discovery + token: every sync builds a new msal client, so no token is reused)"
    )
    print(f"peak RSS of the pipeline process: {max(p.rss_mb for p in phases):.0f} MB")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=50, help="imported groups")
    parser.add_argument("--members", type=int, default=100_000, help="memberships in all")
    parser.add_argument("--changes", type=int, default=20, help="changes before the delta sync")
    parser.add_argument(
        "--users", type=int, default=10_000, help="tenant users (each group samples from them)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="service time added to each Graph request"
    )
    args = parser.parse_args()
    if args.members // args.groups > args.users:
        parser.error("--users must be at least --members / --groups")

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    server = ctx.Process(
        target=serve,
        args=(args.groups, args.members, args.users, args.latency_ms, theirs),
        daemon=True,
    )
    server.start()
    settings = ours.recv()
    tenant = Tenant(ours)
    try:
        phases = run(args, settings, tenant)
    finally:
        tenant.ask("stop")
        server.join(timeout=10)
    sys.exit(0 if report(args, settings, phases) else 1)


if __name__ == "__main__":
    main()

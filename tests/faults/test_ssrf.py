"""No forbidden connection: SSRF vectors against real forbidden listeners get 0 connections.

The vectors (metadata and private addresses, ``0.0.0.0``, encoded IPv4 and IPv6 forms,
credentials and backslashes hiding a host, ``localhost`` spellings, redirects, ``..`` paths
raw and percent-encoded, host names resolving to loopback or metadata, DNS rebinding) run
through the real webhook delivery and health checks in :mod:`tests.faults.ssrf_probe`, a
subprocess. Where the machine allows it (root, ``unshare``, ``ip``), the probe runs in fresh
network and mount namespaces: ``lo`` there also carries 10.0.0.1 and 169.254.169.254, so those
listeners are real and no packet can leave the machine, and ``/etc/hosts`` is a bind mount of a
file this test owns (no system file is edited), so host names go through the real resolver.
Elsewhere the probe runs on the host with an audit hook that fails any connect off loopback,
and the name vectors are left out (printed as skipped).

Every vector is also sent through a naive client (urllib, no allowlist, its own lookups): those
controls must reach a forbidden listener, so each vector is known to be live here.

Figure: vectors run, connections the forbidden listeners accepted (0), connects attempted
outside the allowed servers (0), requests outside the allowed paths (0), controls that reached
a forbidden listener.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
NETNS_SETUP = ("ip link set lo up && ip addr add 10.0.0.1/32 dev lo"
               " && ip addr add 169.254.169.254/32 dev lo && mount --bind \"$0\" /etc/hosts"
               " && exec \"$@\"")


def _netns_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    proc = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True,
                          timeout=30, check=False)
    return proc.returncode == 0


def _run_probe(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    probe = [sys.executable, "-m", "tests.faults.ssrf_probe"]
    if _netns_available():
        mode = "netns"
        cmd = ["unshare", "--net", "--mount", "sh", "-c", NETNS_SETUP, str(hosts), *probe,
               mode, str(hosts)]
    else:
        mode = "plain"
        cmd = [*probe, mode, str(hosts)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
        str(REPO), os.environ.get("PYTHONPATH")))),
        "DJANGO_SETTINGS_MODULE": "tests.minimal_settings",
        "MINIMAL_DB": str(tmp_path / "unused.sqlite3"),
        # Never contacted: the probe uses no hms-tasks state.
        "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return mode, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_no_vector_reaches_a_forbidden_listener(tmp_path: Path) -> None:
    mode, rows = _run_probe(tmp_path)
    vectors = [r for r in rows if r["kind"] == "vector"]
    controls = [r for r in rows if r["kind"] == "control"]
    print(f"\nSSRF probe ({mode} mode):")
    for r in vectors:
        print(f"  {r['vector']:<42} {r['client']:<13} connections"
              f" {r['forbidden_connections']}, connects {r['forbidden_connects_attempted']},"
              f" stray paths {r['requests_outside_allowed_paths']}: {r['outcome'][:90]}")
    for r in controls:
        print(f"  control (no guard) {r['vector']:<42} connections {r['forbidden_connections']}")
    hits = sum(r["forbidden_connections"] for r in vectors)
    connects = sum(r["forbidden_connects_attempted"] for r in vectors)
    stray = sum(r["requests_outside_allowed_paths"] for r in vectors)
    live = sum(r["forbidden_connections"] > 0 for r in controls)
    print(f"FIGURE ssrf: {len(vectors)} vector runs ({mode}), {hits} connections to forbidden"
          f" listeners, {connects} forbidden connects attempted, {stray} requests outside the"
          f" allowed paths; controls without the guards reached a forbidden listener"
          f" {live}/{len(controls)}")
    if mode != "netns":
        print("  skipped: vectors needing network and mount namespaces (names resolving"
              " elsewhere, DNS rebinding, live private and metadata listeners)")
    assert len(vectors) >= (26 if mode == "netns" else 19)
    assert (hits, connects, stray) == (0, 0, 0), [r for r in vectors
                                                  if r["forbidden_connections"]
                                                  or r["forbidden_connects_attempted"]]
    # The controls prove each vector and each listener live: without the guards they connect.
    assert controls
    assert live == len(controls), [r for r in controls if not r["forbidden_connections"]]
    by_vector = {(r["vector"], r["client"]): r["outcome"] for r in vectors}
    # Refused before any request, or answered without following anything.
    assert by_vector[("redirect to the forbidden listener", "webhook")].startswith(
        "refused (WebhookRefused: the webhook answered with a redirect")
    assert by_vector[("redirect to the forbidden listener", "health")] == "down (redirect)"
    if mode == "netns":
        for client in ("health", "health tcp", "health redis"):
            assert by_vector[("name resolving to loopback", client)] == "down (refused_target)"
        # One lookup per request: the first request went to the address its lookup checked
        # (10.0.0.1, allowed), the second lookup (127.0.0.2) was refused before any connect.
        rebind = by_vector[("DNS rebinding (10.0.0.1, then 127.0.0.2)", "health")]
        assert rebind == "up; then down (refused_target); lookups 2", rebind
        rebind = by_vector[("DNS rebinding (10.0.0.1, then 127.0.0.2)", "webhook")]
        assert rebind.startswith("delivered 200; then refused"), rebind
        assert rebind.endswith("lookups 2"), rebind

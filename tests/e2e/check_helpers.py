"""Running `relaygate check` as a user would, and reading its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from .helpers import clean_env

CHECK_TIMEOUT = 90.0


def run_check(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relaygate", "check", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
        env=clean_env(),
        check=False,
    )


def statuses(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    document: dict[str, Any] = json.loads(result.stdout)
    return {c["id"]: c["status"] for c in document["checks"]}


def details(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    document: dict[str, Any] = json.loads(result.stdout)
    return {c["id"]: c["detail"] for c in document["checks"]}

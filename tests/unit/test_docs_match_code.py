"""The reference docs say what the code does.

- docs/logging.md lists exactly the events the code emits: every
  ``logs.event("NAME", ...)`` call in src/relaygate (found by walking the AST,
  so multi-line calls count) has a row, and every row is an event some code
  emits. A name the code computes at run time cannot be checked, so it fails too.
- docs/dependencies.md lists exactly the distributions pyproject installs
  ([project] dependencies and the ``test`` extra).
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "src" / "relaygate"
LOGGING_DOC = REPO / "docs" / "logging.md"
DEPENDENCIES_DOC = REPO / "docs" / "dependencies.md"


# ------------------------------------------------------------------ log events


def _is_event_call(node: ast.Call) -> bool:
    func = node.func
    if isinstance(func, ast.Attribute):  # logs.event(...)
        return func.attr == "event" and isinstance(func.value, ast.Name) and func.value.id == "logs"
    return False


def _literal_names(node: ast.expr) -> list[str] | None:
    """The names a first argument can take: a string literal, or a conditional
    expression whose branches are; None for anything computed."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        body, orelse = _literal_names(node.body), _literal_names(node.orelse)
        if body is not None and orelse is not None:
            return body + orelse
    return None


def emitted_events() -> tuple[dict[str, list[str]], list[str]]:
    """Event name -> where it is emitted; and the calls whose name is not literal."""
    found: dict[str, list[str]] = {}
    computed: list[str] = []
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _is_event_call(node)):
                continue
            names = _literal_names(node.args[0]) if node.args else None
            if names is None:
                computed.append(f"{where}:{node.lineno}")
                continue
            for name in names:
                found.setdefault(name, []).append(f"{where}:{node.lineno}")
    return found, computed


def documented_events() -> set[str]:
    """The names in the first column of docs/logging.md's event table
    (a cell may hold several: `shutdown.start` / `shutdown.done`)."""
    names: set[str] = set()
    in_table = False
    for line in LOGGING_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| event |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            first = line.split("|")[1]
            names.update(re.findall(r"`([^`]+)`", first))
    return names


def test_the_event_collector_finds_known_calls() -> None:
    """Guards the walk itself: one-line and multi-line calls are both seen."""
    found, _ = emitted_events()
    assert "start" in found  # logs.event("start", ...) on one line
    assert "auth.fail" in found  # a call spread over several lines
    assert {"webhook.delivered", "webhook.retry", "webhook.failed"} <= set(found)


def test_every_event_name_is_a_literal() -> None:
    _, computed = emitted_events()
    assert not computed, (
        "logs.event() with a name computed at run time (docs/logging.md cannot be checked"
        " against it; write the names out): " + ", ".join(computed)
    )


def test_every_emitted_event_is_documented() -> None:
    found, _ = emitted_events()
    missing = sorted(set(found) - documented_events())
    assert not missing, "events the code emits but docs/logging.md does not list: " + "; ".join(
        f"{name} ({', '.join(found[name])})" for name in missing
    )


def test_every_documented_event_is_emitted() -> None:
    found, _ = emitted_events()
    stale = sorted(documented_events() - set(found))
    assert not stale, "events docs/logging.md lists but no code emits: " + ", ".join(stale)


# ------------------------------------------------------------------ dependencies


def _distribution(requirement: str) -> str:
    """PEP 503 normalized name of a requirement string ("psycopg[binary]>=3.2")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {_distribution(r) for r in requirements}


def documented_distributions() -> set[str]:
    """Backticked names in the first column of the "Libraries we use" table,
    standard library rows left out."""
    names: set[str] = set()
    section = False
    for line in DEPENDENCIES_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line.strip() == "## Libraries we use"
            continue
        if not section or not line.startswith("| ") or line.startswith("| library |"):
            continue
        first = line.split("|")[1].strip()
        if first.startswith("standard library"):
            continue
        names.update(_distribution(name) for name in re.findall(r"`([^`]+)`", first))
    return names


def test_the_dependency_parsers_see_both_sides() -> None:
    declared, documented = declared_distributions(), documented_distributions()
    assert {"psycopg", "psycopg-pool", "pytest"} <= declared
    assert {"psycopg", "psycopg-pool", "uvloop"} <= documented
    assert "ssl" not in documented


def test_dependencies_doc_lists_what_pyproject_installs() -> None:
    declared, documented = declared_distributions(), documented_distributions()
    assert declared == documented, (
        f"installed but not in docs/dependencies.md: {sorted(declared - documented)}; "
        f"in docs/dependencies.md but not in pyproject.toml: {sorted(documented - declared)}"
    )

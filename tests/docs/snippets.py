"""The Python blocks of README.md and docs/*.md, each classified by how it is meant to be run.

A block is classified by an HTML comment on the line before its fence, or by its first line:

- ``# path/to/name.py`` first: a file a user would save under that name. A ``test_*.py`` file is
  run with pytest; any other is imported (a module of the service).
- ``<!-- snippet: continues path/to/name.py -->``: more lines for that file of the same document;
  the file with them appended is imported.
- ``<!-- snippet: run; worker M:A; declare M:A; expect "TEXT" -->``: a program, run as
  ``python name.py`` (clauses optional: beside ``brokerjobs worker M:A``, after ``brokerjobs
  topology declare M:A``, and TEXT must appear in its or the worker's output).
- ``<!-- snippet: signature dotted.Name -->``: a call signature, compared with the real one.
- ``<!-- snippet: skip: REASON -->``: not run, reported as skipped with the reason.

Anything else is an error: no block is silently left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
_FENCE = re.compile(r"^\s*```python\s*$")
_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")
_FILE_LINE = re.compile(r"^#\s*([\w/.-]+\.py)\b")
_APP_NAME = re.compile(r"""\bApp\(\s*"([\w.-]+)\"""")


@dataclass(frozen=True, slots=True)
class Snippet:
    document: Path
    line: int  # of the opening fence, 1-based
    code: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    @property
    def file_name(self) -> str | None:
        match = _FILE_LINE.match(self.code)
        return match[1] if match else None


@dataclass(frozen=True, slots=True)
class Plan:
    kind: str  # file, pytest, continues, run, signature, skip
    target: str = ""  # the file continued, the signature's object, the skip reason
    worker: str | None = None
    declare: str | None = None
    expect: list[str] = field(default_factory=list)


class Unclassified(ValueError):
    pass


def extract(document: Path) -> list[Snippet]:
    lines = document.read_text().splitlines()
    found: list[Snippet] = []
    index = 0
    while index < len(lines):
        if not _FENCE.match(lines[index]):
            index += 1
            continue
        start, index = index, index + 1
        body: list[str] = []
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        marker = _MARKER.match(lines[start - 1]) if start else None
        code = "\n".join(body) + "\n"
        found.append(Snippet(document, start + 1, code, marker[1] if marker else None))
        index += 1
    return found


def classify(snippet: Snippet) -> Plan:
    if snippet.marker is not None:
        return _from_marker(snippet)
    name = snippet.file_name
    if name is None:
        raise Unclassified(
            f"{snippet.where}: a python block with no '# name.py' first line and no "
            "<!-- snippet: ... --> marker before it: say how it runs (see tests/docs/snippets.py)"
        )
    return Plan("pytest" if Path(name).name.startswith("test_") else "file")


def _from_marker(snippet: Snippet) -> Plan:
    head, *clauses = [part.strip() for part in snippet.marker.split(";")] if snippet.marker else []
    kind, _, target = head.partition(" ")
    if kind == "skip:" or head.startswith("skip:"):
        reason = head.removeprefix("skip:").strip()
        if not reason:
            raise Unclassified(f"{snippet.where}: a skip needs a reason")
        return Plan("skip", reason)
    if kind in ("continues", "signature") and target and not clauses:
        return Plan(kind, target.strip())
    if kind == "run" and not target:
        return _run_plan(snippet, clauses)
    raise Unclassified(f"{snippet.where}: unknown snippet marker {snippet.marker!r}")


def _run_plan(snippet: Snippet, clauses: list[str]) -> Plan:
    plan = Plan("run")
    for clause in clauses:
        word, _, value = clause.partition(" ")
        if word == "worker" and value:
            plan = Plan("run", worker=value, declare=plan.declare, expect=plan.expect)
        elif word == "declare" and value:
            plan = Plan("run", worker=plan.worker, declare=value, expect=plan.expect)
        elif word == "expect" and re.fullmatch(r'"(.*)"', value):
            plan.expect.append(value[1:-1])
        else:
            raise Unclassified(f"{snippet.where}: unknown clause {clause!r} in a run marker")
    return plan


def app_names(snippets: list[Snippet]) -> list[str]:
    """The names given to ``App("...")`` in these snippets, to be replaced by unique ones."""
    return list(dict.fromkeys(n for s in snippets for n in _APP_NAME.findall(s.code)))


def renamed(code: str, names: dict[str, str]) -> str:
    """``code`` with each app name's string literals (``"shop"``, ``"shop.emails"``) renamed."""
    for old, new in names.items():
        code = re.sub(rf'"{re.escape(old)}(?=["."])', f'"{new}', code)
    return code

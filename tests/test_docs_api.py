"""The API the README and the method cards show must exist: every import in their ```python blocks runs.

Each import statement (``import x``, ``from x import a, b``, also one continued over several lines in
parentheses) is executed on its own in a fresh namespace; a failure names the file and the line.

The README's first python block is not run whole: it uses a ``model`` it does not define (it shows the calls
to add to an existing training script), so only its imports are checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^\s*```")
_IMPORT = re.compile(r"^(import\s+\S|from\s+\S+\s+import\s)")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every method card."""
    return [root / "README.md", *sorted((root / "docs" / "methods").glob("*.md"))]


def python_blocks(path: Path) -> list[list[tuple[int, str]]]:
    """The fenced ```python blocks of ``path``: for each, its (1-based line number, text) lines."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if current is None:
            if _FENCE.match(line) and line.strip()[3:].strip().lower() in ("python", "py", "python3"):
                current = []
        elif _FENCE.match(line):
            blocks.append(current)
            current = None
        else:
            current.append((lineno, line))
    if current is not None:
        raise AssertionError(f"{path}: unterminated ```python block")
    return blocks


def import_statements(path: Path) -> list[tuple[int, str]]:
    """Every import statement in the python blocks of ``path`` as (line number in ``path``, statement)."""
    out: list[tuple[int, str]] = []
    for block in python_blocks(path):
        i = 0
        while i < len(block):
            lineno, line = block[i]
            stmt = line.strip()
            i += 1
            if not _IMPORT.match(stmt):
                continue
            # a parenthesised or backslash-continued import runs over the next lines
            while (stmt.count("(") > stmt.count(")") or stmt.endswith("\\")) and i < len(block):
                stmt += "\n" + block[i][1].strip()
                i += 1
            out.append((lineno, stmt))
    return out


def _rel(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def check_import(path: Path, lineno: int, stmt: str) -> None:
    """Run ``stmt`` in a fresh namespace; fail naming ``path:lineno`` when it does not parse or import."""
    where = f"{_rel(path)}:{lineno}"
    try:
        code = compile(ast.parse(stmt), where, "exec")
    except SyntaxError as exc:
        pytest.fail(f"{where}: {stmt!r} is not valid Python: {exc}")
    try:
        exec(code, {})
    except Exception as exc:  # noqa: BLE001 -- any failure of a documented import is the finding
        pytest.fail(f"{where}: {stmt!r} failed: {type(exc).__name__}: {exc}")


def _cases() -> list:
    cases = []
    for path in doc_files():
        rel = _rel(path)
        for lineno, stmt in import_statements(path):
            cases.append(pytest.param(path, lineno, stmt, id=f"{rel}:{lineno}"))
    return cases


def test_docs_exist_and_show_imports():
    files = doc_files()
    assert len(files) >= 2, "no method cards under docs/methods"
    for path in files:
        assert path.is_file(), f"{path} is missing"
    with_imports = {_rel(p) for p in files if import_statements(p)}
    assert "README.md" in with_imports, "README.md shows no python import any more"


@pytest.mark.parametrize("path, lineno, stmt", _cases())
def test_documented_import_works(path: Path, lineno: int, stmt: str):
    check_import(path, lineno, stmt)


def test_checker_catches_a_bad_import(tmp_path: Path):
    doc = tmp_path / "docs" / "methods" / "card.md"
    doc.parent.mkdir(parents=True)
    doc.write_text("# card\n\n```python\nimport leanprop\nfrom leanprop import (\n    convert_,\n"
                   "    no_such_name,\n)\nx = 1\n```\n\n```bash\nimport nothing\n```\n", encoding="utf-8")
    stmts = import_statements(doc)
    assert [n for n, _ in stmts] == [4, 5]
    check_import(doc, *stmts[0])
    with pytest.raises(pytest.fail.Exception, match=r"card\.md:5: .*no_such_name"):
        check_import(doc, *stmts[1])

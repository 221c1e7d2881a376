"""Room sizes (issue 21): limits a newcomer can rely on, checked on the source with `ast`.

No module in `mffzoo/` over 600 lines, no function over 80, no `__init__` with more than 10
parameters, no dataclass with more than 20 fields (recipe and profile schemas included).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mffzoo"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_INIT_PARAMS = 10
MAX_DATACLASS_FIELDS = 20




def _is_dataclass(node: ast.ClassDef) -> bool:
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def violations(package: Path = PACKAGE) -> list[str]:
    """Every breach of the four limits under ``package``, one line each (``path:line what``)."""
    found: list[str] = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{rel}: {lines} lines > {MAX_MODULE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno} {node.name}() {length} lines > {MAX_FUNCTION_LINES}")
                if node.name == "__init__":
                    args = node.args
                    params = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) - 1
                    params += bool(args.vararg) + bool(args.kwarg)
                    if params > MAX_INIT_PARAMS:
                        found.append(f"{rel}:{node.lineno} __init__ {params} parameters > {MAX_INIT_PARAMS}")
            elif isinstance(node, ast.ClassDef) and _is_dataclass(node):
                fields = [
                    s for s in node.body
                    if isinstance(s, ast.AnnAssign)
                    and not (isinstance(s.annotation, ast.Subscript)
                             and getattr(s.annotation.value, "id", "") == "ClassVar")
                ]
                if len(fields) > MAX_DATACLASS_FIELDS:
                    found.append(f"{rel}:{node.lineno} dataclass {node.name} {len(fields)} fields "
                                 f"> {MAX_DATACLASS_FIELDS}")
    return found


def test_rooms_stay_small() -> None:
    found = violations()
    assert not found, "rooms over the limits (issue 21):\n" + "\n".join(found)


def test_checker_sees_each_breach(tmp_path: Path) -> None:
    """The checker itself can fail: a made-up package breaking each limit by one is reported four times."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # + the def line: one too many
    fields = "\n".join(f"    f{i}: int = {i}" for i in range(MAX_DATACLASS_FIELDS + 1))
    params = ", ".join(f"a{i}" for i in range(MAX_INIT_PARAMS + 1))
    (pkg / "wide.py").write_text(
        f"from dataclasses import dataclass\nfrom typing import ClassVar\n\n\ndef long():\n{body}\n\n\n"
        f"@dataclass(frozen=True)\nclass Wide:\n    k: ClassVar[int] = 0\n{fields}\n\n\n"
        f"class Many:\n    def __init__(self, {params}):\n        pass\n")
    (pkg / "big.py").write_text("x = 0\n" * (MAX_MODULE_LINES + 1))
    (pkg / "ok.py").write_text("x = 0\n" * MAX_MODULE_LINES)
    found = violations(pkg)
    assert len(found) == 4, found
    assert any("long()" in f for f in found) and any("Wide 21 fields" in f for f in found)
    assert any("__init__ 11 parameters" in f for f in found) and any("big.py: 601 lines" in f for f in found)

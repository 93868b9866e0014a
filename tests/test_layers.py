"""The package's floors import downward only (README, "Layout"): every egad module has a floor, and no import, at
module level or inside a function, reaches a module on a higher floor."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "egad"

# Floor -> module prefixes (a module takes the floor of its longest matching prefix; "egad" itself is the public API).
FLOORS: dict[int, list[str]] = {
    1: [
        "egad.errors",
        "egad.paths",
        "egad.config",
        "egad.models",
        "egad.data",
        "egad.plan",
        "egad.losses",
        "egad.eval",
        "egad.eval.rouge",
        "egad.eval.generate",
        "egad.eval.metrics",
        "egad.xtok",
    ],
    2: ["egad.teacher", "egad.xtok.source"],
    3: ["egad.objective", "egad.xtok.objective"],
    4: ["egad.train", "egad.xtok.run", "egad.eval.suite", "egad.eval.report", "egad.eval.runs", "egad.eval.answer"],
    5: ["egad.experiment"],
    6: ["egad.demo", "egad.study", "egad.cli", "egad.integrations"],
}
PUBLIC_API = "egad"  # egad/__init__.py re-exports from every floor
NAMES = {"maths and data", "teacher sources", "objective", "trainer", "experiment", "entry points"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor(module: str) -> int | None:
    if module == PUBLIC_API:
        return max(FLOORS)
    best, best_len = None, -1
    for level, prefixes in FLOORS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = level, len(prefix)
    return best


def egad_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an egad module in the file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "egad"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "egad":
            for alias in node.names:
                # `from egad.data import batches` imports the module egad.data.batches; `from egad.data.batches import
                # X` too.
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    PACKAGE.parent / Path(*sub.split("."))
                ).is_dir()
                out.append((node.lineno, sub if is_module else node.module))
    return out


def test_every_module_has_a_floor():
    missing = [module_name(p) for p in sorted(PACKAGE.rglob("*.py")) if floor(module_name(p)) is None]
    assert not missing, f"assign these modules a floor in tests/test_layers.py (and the README layout): {missing}"


def test_no_module_imports_from_a_higher_floor():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for line, target in egad_imports(path):
            if (floor(target) or 0) > (floor(here) or 0):
                upward.append(f"{path.relative_to(REPO)}:{line}: {here} (floor {floor(here)}) imports {target} "
                              f"(floor {floor(target)})")  # fmt: skip
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from egad.train.trainer import Trainer\n    from egad import experiment as X\n")
    found = [t for _, t in egad_imports(bad)]
    assert found == ["egad.train.trainer", "egad.experiment"]
    assert floor("egad.train.trainer") > floor("egad.data.batches") and floor("egad.teacher.cache.reader") == 2


def test_readme_states_the_floors():
    text = (REPO / "README.md").read_text().lower()
    assert all(name in text for name in NAMES), "the README's layout section names the floors"


def readme_tree() -> list[str]:
    """The paths the README's layout tree names, relative to the repository (folders end with '/')."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("```\negad/\n") + 4 :]
    block = block[: block.index("```")]
    paths, parents = [], {}
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent % 2 or indent > 4:  # blank, or a description's continuation
            continue
        name = line.split()[0]
        path = name if indent == 0 else parents[indent - 2] + name
        parents[indent] = path
        paths.append(path)
    return paths


def test_readme_tree_matches_the_package():
    listed = readme_tree()
    missing = [p for p in listed if not (REPO / p).exists()]
    assert not missing, f"the README's layout tree names paths that do not exist: {missing}"
    listed_dirs = [p for p in listed if p.endswith("/")]
    # A folder listed without children covers its files; a folder whose files are listed must list them all.
    leaf_dirs = [d for d in listed_dirs if not any(q != d and q.startswith(d) for q in listed)]
    unlisted = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if path.name == "__init__.py" and rel != "egad/__init__.py" or rel == "egad/__init__.py":
            continue
        if rel not in listed and not any(rel.startswith(d) for d in leaf_dirs):
            unlisted.append(rel)
    assert not unlisted, f"add these modules to the README's layout tree: {unlisted}"

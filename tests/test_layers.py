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
        "egad.model_files",
        "egad.heads",
        "egad.paths",
        "egad.rollout",
        "egad.lora",
        "egad.engines",
        "egad.config",
        "egad.coerce",
        "egad.presets",
        "egad.methods",
        "egad.run_config",
        "egad.entropy",
        "egad.entropy_stream",
        "egad.curriculum",
        "egad.temperature",
        "egad.routing",
        "egad.losses",
        "egad.data",
        "egad.records",
        "egad.tokenizer",
        "egad.models",
        "egad.checkpoint",
        "egad.run_log",
        "egad.eval",
        "egad.eval.rouge",
        "egad.eval.generate",
        "egad.eval.metrics",
        "egad.xtok",
    ],
    2: ["egad.teacher", "egad.xtok.source"],
    3: [
        "egad.token_plan",
        "egad.objective",
        "egad.chunked_logits",
        "egad.student",
        "egad.plan_runtime",
        "egad.xtok.objective",
    ],
    4: [
        "egad.trainer",
        "egad.run_parts",
        "egad.xtok.run",
        "egad.windows",
        "egad.optim",
        "egad.dev_eval",
        "egad.run_checkpoint",
        "egad.eval.suite",
        "egad.eval.report",
        "egad.eval.answer",
    ],
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
                # `from egad import data` imports the module egad.data; `from egad.data import X` the module egad.data.
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
    bad.write_text("def f():\n    from egad.trainer import Trainer\n    from egad import experiment as X\n")
    found = [t for _, t in egad_imports(bad)]
    assert found == ["egad.trainer", "egad.experiment"]
    assert floor("egad.trainer") > floor("egad.data") and floor("egad.teacher.cache.reader") == 2


def test_readme_states_the_floors():
    text = (REPO / "README.md").read_text().lower()
    assert all(name in text for name in NAMES), "the README's layout section names the floors"

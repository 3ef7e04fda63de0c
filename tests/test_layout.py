"""The package layout as a specification: imports go one way down the pipeline, no module imports
itself back through another, and no behaviour hides behind environment variables or methods
bound onto instances. Read from the source with ast, so lazy (function-level) imports count."""

from __future__ import annotations

import ast
from pathlib import Path

import minift

ROOT = Path(minift.__file__).parent

# Each stage and the stages it may import (errors and data sit below everything).
BASE = {"errors"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "data": set(),
    "io": BASE,
    "ops": BASE,
    "templates": BASE,
    "testing": BASE,
    "arch": BASE | {"io", "ops"},
    "quant": BASE | {"io", "ops"},
    "lora": BASE | {"io", "ops", "arch", "quant"},
    "export": BASE | {"io", "ops", "templates", "arch", "quant", "lora"},
    "infer": BASE | {"io", "ops", "templates", "arch"},
    "models": BASE | {"io", "ops", "templates", "arch", "quant", "lora", "export", "infer"},
    "train": BASE | {"io", "ops", "templates", "arch", "quant", "lora", "export", "infer", "data"},
}
TOP = {"__init__", "__main__", "demo", "cli"}  # the public surface (and `python -m minift`): may import any stage


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """minift modules this file imports, relative imports resolved; `from pkg import mod` is mod."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "minift"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "minift":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")}
            out |= subs or {target}
            if len(subs) < len(node.names):
                out.add(target)
    return out


def stage(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}


def test_every_module_belongs_to_a_known_stage():
    unknown = sorted({stage(m) for m in graph()} - set(ALLOWED) - TOP)
    assert not unknown, f"modules outside the layout's stages: {unknown}; add them to ALLOWED with their place"


def test_imports_only_go_down_the_pipeline():
    bad = []
    for mod, deps in graph().items():
        here = stage(mod)
        if here in TOP:
            continue
        for dep in deps:
            there = stage(dep)
            if there != here and there not in ALLOWED[here]:
                bad.append(f"{mod} imports {dep} ({here} may import {sorted(ALLOWED[here])})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exports its modules; a module importing its own package's
    # __init__ would close a loop through it, so the edges are taken as written
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def source_files() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_no_methods_bound_onto_instances():
    for p in source_files():
        text = p.read_text()
        assert "MethodType" not in text and "object.__setattr__" not in text, p


def test_no_environment_switches():
    """Options are arguments or config; the only environment variable read is Triton's own
    TRITON_INTERPRET (read once, in ops/_backend.py), plus what huggingface_hub reads itself."""
    readers = {}
    for p in source_files():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.setdefault(str(p.relative_to(ROOT)), 0)
                readers[str(p.relative_to(ROOT))] += 1
        assert "MINIFT_" not in p.read_text(), f"{p}: an environment switch; make it an argument or a config field"
    assert set(readers) <= {"ops/_backend.py"}, readers


def test_the_decoder_knows_nothing_of_lora():
    for p in (ROOT / "arch").glob("*.py"):
        text = p.read_text().lower()
        assert "lora" not in text and "adapter" not in text, p

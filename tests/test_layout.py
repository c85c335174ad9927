"""The import graph of src/nanotune: no circles, and no import from a lower part to a higher one.

Every import counts, also those inside functions (a lazy import is still a dependency). The rule
table is the one in docs/design.md ("Layers").
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "nanotune"

# What each part may import from nanotune, besides itself. Entries are parts ("models") or single
# modules ("files.atomic"). Everything above `jobs` (the entry points) may import anything below.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "version": set(),
    "lazy": set(),  # lazy_exports, for the package __init__s
    "hardware": set(),  # what the CPU/GPU can do (native bf16), for the trainer and the bench
    "files": {"errors", "version"},  # checked reads and atomic writes, for every part
    "models": {"errors"},
    "tokenizer": {"errors", "files"},
    "methods": {"errors", "models"},
    # version: a GGUF file records the nanotune that wrote it (what --overwrite may replace)
    "weights": {"errors", "files", "version", "models", "tokenizer", "methods"},
    "data": {"errors", "files", "version"},  # version: the data cache keys on it
    # The loop knows nothing of families or formats.
    "training": {"errors", "files", "hardware", "decoding"},  # decoding: GRPO's generation
    "generate": {"errors", "models"},
    # The continuous-batching engine, below serve/ (HTTP over it) and training/ (GRPO generates
    # with it): models and generate for the decode, tokenizer and weights for adapter folders.
    "decoding": {"errors", "models", "generate", "tokenizer", "weights"},
    "classify": {"errors", "data", "methods"},
    "eval": {"errors", "files", "data", "generate"},
    "config": {"errors", "files", "data", "eval", "methods", "models", "training"},
    "recipes": {"errors", "config"},
}
for part in ALLOWED:
    if part not in ("errors", "version", "lazy", "hardware"):
        ALLOWED[part].add("lazy")
BELOW_JOBS = set(ALLOWED)
ALLOWED["jobs"] = BELOW_JOBS
ALLOWED["bench"] = BELOW_JOBS  # decodes in `--dtype` as `generate` does (models.decoding)
ALLOWED["serve"] = BELOW_JOBS | {"jobs"}  # an entry point, on jobs/artifacts like the CLI
ALLOWED["cli"] = BELOW_JOBS | {"jobs", "bench", "serve", "nanotune", "version"}
ALLOWED["__main__"] = {"cli"}
ALLOWED["nanotune"] = {"errors", "version", "jobs"}  # the root package: nanotune.train()


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the nanotune modules it imports (a package's __init__ only when named itself)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "nanotune"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_every_part_is_in_the_rule_table():
    assert {_part(m) for m in import_graph()} <= set(ALLOWED)


def test_no_import_runs_back_up():
    wrong = []
    for module, targets in sorted(import_graph().items()):
        part = _part(module)
        for target in sorted(targets):
            other = _part(target)
            short = target.removeprefix("nanotune.")
            if other != part and other not in ALLOWED[part] and short not in ALLOWED[part]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_checker_sees_circles_and_wrong_directions():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "nanotune.files.atomic" in graph["nanotune.training.checkpoint"]
    assert "nanotune.models.transformer" in graph["nanotune.weights.hf"]


def test_one_writer():
    """Temp-then-rename lives in files/atomic.py alone; every other writer goes through it."""
    import re

    pattern = re.compile(
        r"os\.replace\(|os\.rename\(|\.rename\(|\.replace\(\w*path|mkstemp|mkdtemp"
    )
    found = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "files" / "atomic.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []

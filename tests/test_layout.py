"""The house rules of docs/ARCHITECTURE.md: imports run one way, files and functions stay short."""

import ast
import re

import pytest
from conftest import ROOT

# docs/ARCHITECTURE.md order, bottom layer first: a module may import only modules before it.
LAYERS = ("errors settings config cli tables text preprocess noise create_dataset document_pairs retrieval_data "
          "metrics plots provision embedding_cache model_builder openvino_module encoding hard_negatives round_trip "
          "objectives "
          "query_side plan "
          "checkpoints callbacks selection run_lock run_folder run_summary export evaluation compare trainer").split()
SRC = ROOT / "src"
# A layer is a module (src/NAME.py) or a package (src/NAME/, its files one layer; they import each other freely).


def layer_files(layer: str) -> list:
    return [SRC / f"{layer}.py"] if (SRC / f"{layer}.py").exists() else sorted((SRC / layer).glob("*.py"))


def imported(path) -> set[str]:
    """src modules `path` imports anywhere, inside functions too: a deferred import is still a dependency."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("src.")}
    return names


def test_every_module_has_a_place_in_the_architecture_order():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert modules | packages == set(LAYERS)
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert [m for m in LAYERS if f"`{m}.py`" not in architecture and f"`{m}/`" not in architecture] == []


@pytest.mark.parametrize("module", LAYERS)
def test_imports_run_one_way(module):
    for path in layer_files(module):
        later = [m for m in imported(path) - {module} if LAYERS.index(m) >= LAYERS.index(module)]
        assert not later, f"{path.relative_to(ROOT)} imports {later}, which come after it"


def test_files_and_functions_stay_short():
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 400, f"{path.name}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 40, f"{path.name}: {node.name} is {length} lines"


def test_measured_numbers_live_in_the_results_only():
    """Help texts and docstrings go stale when they quote measurements (GB, x-times speed-ups, percentages)."""
    pattern = re.compile(r"\d+(\.\d+)? ?(GB|GiB|MB)\b|\b\d+(\.\d+)?x (faster|slower|less|more)\b")
    for path in SRC.rglob("*.py"):
        hits = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
        assert not hits, f"{path.name}: {hits[0]}"


def test_scripts_are_short_modules_of_their_own():
    """scripts/ keeps src's size rules (files up to 400 lines, functions up to 40) and runs as modules from the
    repository root (`python -m scripts.<name>`): no sys.path edits, nothing imported from tests/."""
    for path in (ROOT / "scripts").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 400, f"scripts/{path.name}: {len(text.splitlines())} lines"
        assert "sys.path" not in text, f"scripts/{path.name} edits sys.path"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 40, f"scripts/{path.name}: {node.name} is {length} lines"
            modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                       else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            wrong = [m for m in modules if m.split(".")[0] in {"tests", "conftest"}]
            assert not wrong, f"scripts/{path.name} imports {wrong[0]} from tests/"


def test_settings_are_never_rewritten_after_parsing():
    """What a run makes of its settings is src/plan.py's RunPlan: no code assigns to `cfg.<group>.<field>`."""
    from src.config import GROUPS

    for path in [*SRC.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                group = target.value if isinstance(target, ast.Attribute) else None
                rewrites = (isinstance(group, ast.Attribute) and group.attr in GROUPS
                            and isinstance(group.value, ast.Name) and group.value.id == "cfg")
                assert not rewrites, f"{path.name}:{node.lineno} rewrites cfg.{group.attr}.{target.attr}"


def script_imports(path) -> set[str]:
    """scripts modules `path` imports anywhere, inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                   else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        names |= {m.split(".")[1] for m in modules if m.startswith("scripts.")}
    return names


def test_scripts_import_without_a_circle():
    """scripts/ may share code (scripts.peer, scripts.scoring), but no script imports one that imports it back."""
    graph = {p.stem: script_imports(p) for p in (ROOT / "scripts").glob("*.py")}

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    circles = [name for name in graph if reaches(name, name, {name})]
    assert not circles, f"scripts in an import circle: {circles}"

"""The package's shape: which of its modules import which."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("", "conversion", "training", "serving", "experiments", "evaluation")


def package_modules() -> dict[str, Path]:
    """`pvc.x.y` -> file, for the package's own modules (the repository root is the package `pvc`)."""
    modules = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name == "setup.py":
                continue
            parts = ["pvc", *([folder] if folder else []), *([] if path.stem == "__init__" else [path.stem])]
            modules[".".join(parts)] = path
    return modules


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports, anywhere in the file (inside functions too)."""
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in candidates if name in known and name != module}
    return found


def test_no_two_modules_import_each_other():
    modules = package_modules()
    graph = {name: imported(name, path, set(modules)) for name, path in modules.items()}
    graph = {name: targets - {"pvc"} for name, targets in graph.items()}  # the package's lazy front door
    mutual = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    assert not mutual, f"modules that import each other: {mutual}"


def test_each_remote_code_entry_imports_all_it_needs_itself():
    """transformers 5.0 copies a local checkpoint's remote-code file (an `auto_map` target) with only the files it
    imports relatively itself, not those they import in turn: each target must import its whole closure."""
    from pvc.configuration_pvc import AUTO_MAP
    from pvc.conversion.options import CODE_FILES

    def direct(name: str) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                found.add(f"{node.module}.py")
        return found

    assert {needed for name in CODE_FILES for needed in direct(name)} <= set(CODE_FILES)  # all carried
    entries = {value.split(".")[0] + ".py" for value in AUTO_MAP.values()} | {
        "image_processing_pvc.py",
        "processing_pvc.py",
    }
    for entry in sorted(entries):
        closure, todo = set(), list(direct(entry))
        while todo:
            name = todo.pop()
            if name not in closure:
                closure.add(name)
                todo += direct(name)
        assert closure == direct(entry), f"{entry} must import {sorted(closure - direct(entry))} itself"

"""Every module a source file imports, read with `ast` (imports inside functions count): the layering
test's and the import-circle test's reader."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"pipeline": "logitcache.pipeline", "stages": "logitcache.stages", "storage": "logitcache.storage"}


def imported_modules(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """Every module a source file imports, as (line, absolute dotted name).

    Args:
        source: the file's text.
        module: its own dotted name (for relative imports).
        is_package: True for an `__init__.py` (its relative imports resolve against itself).

    Returns:
        Top-level and nested `import` / `from ... import` statements, `from a import b` counted as
        both `a` and `a.b` (b may be a submodule), and `importlib.import_module` / `__import__` calls
        with a literal (or f-string) name, the f-string cut at its first placeholder.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
                elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                    found.append((node.lineno, str(arg.values[0].value).rstrip(".")))
    return found


def source_files():
    """(path, dotted module name, is_package) of every source file under FOLDERS."""
    for folder, prefix in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            is_package = rel[-1] == "__init__"
            module = ".".join([prefix, *(rel[:-1] if is_package else rel)])
            yield path, module, is_package

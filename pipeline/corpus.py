"""The demo corpus: prompt → response pairs from the Python standard library that ships with this machine.

Two tasks over the same functions, both real code with no download:
- "call" (the demo's): the prompt is a function's signature, the response the call that passes each
  parameter by its own name (``def f(self, a, *xs, b=1, **kw):`` → ``self.f(a, *xs, b=b, **kw)``).
  Every response token is fixed by the prompt, so a small model learns to be confident, as a
  fine-tuned LLM is on its task: its top-32 holds most of the probability (see the demo report).
- "docstring": the signature and the first paragraph of the docstring; open-ended English, on which
  a small model stays unsure (a median top-32 mass of 0.37 for the demo's old teacher).
Train and held-out are split **by file** (a stable hash of the path), so no function's module is in both.

    python -m logitcache.pipeline.corpus --out corpus/ --max-train 2000 --task call
"""

import argparse
import ast
import json
import sysconfig
import zlib
from pathlib import Path

__all__ = ["TASKS", "build_corpus", "call_pairs", "function_pairs"]


def _first_paragraph(doc: str, limit: int) -> str:
    para = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines()).strip()
    return text[:limit].rsplit(" ", 1)[0] if len(text) > limit else text


def _functions(source: str):
    """(signature prompt, node) for every function in one module's source; nothing for a file that does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            yield f"{prefix} {node.name}({ast.unparse(node.args)}):\n", node


def function_pairs(source: str, *, max_response_chars: int = 240) -> list[dict]:
    """All (signature, docstring paragraph) pairs of the functions in one module's source."""
    pairs = []
    for prompt, node in _functions(source):
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20:
            continue
        response = _first_paragraph(doc, max_response_chars)
        if len(response) >= 20:
            pairs.append({"prompt": prompt, "response": response})
    return pairs


def call_expression(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The call that passes each of the function's parameters by its own name.

    Positional parameters go by position, keyword-only ones as ``name=name``; a first parameter
    ``self`` or ``cls`` becomes the receiver (``self.f(...)``).
    """
    a = node.args
    positional = [p.arg for p in (*a.posonlyargs, *a.args)]
    receiver = ""
    if positional and positional[0] in ("self", "cls"):
        receiver = positional.pop(0) + "."
    parts = positional + ([f"*{a.vararg.arg}"] if a.vararg else [])
    parts += [f"{p.arg}={p.arg}" for p in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
    return f"{receiver}{node.name}({', '.join(parts)})"


def call_pairs(source: str) -> list[dict]:
    """All (signature, call) pairs of the functions in one module's source with at least one parameter."""
    calls = ((prompt, call_expression(node)) for prompt, node in _functions(source))
    return [{"prompt": prompt, "response": call} for prompt, call in calls if not call.endswith("()")]


TASKS = {"call": call_pairs, "docstring": function_pairs}


def build_corpus(out_dir: str | Path, *, max_train: int, max_heldout: int, heldout_every: int = 10,
                 task: str = "call") -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` under `out_dir`; returns their row counts.

    Args:
        task: "call" or "docstring" (module docstring).

    Reuses existing files when they were built with the same settings (a rerun is free).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"max_train": max_train, "max_heldout": max_heldout, "heldout_every": heldout_every, "task": task}
    stamp = out / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("settings") == settings:
        return json.loads(stamp.read_text())["counts"]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"test", "tests", "site-packages", "idle_test"} & set(p.relative_to(root).parts))
    splits = {"train": [], "heldout": []}
    for path in files:
        rel = str(path.relative_to(root))
        split = "heldout" if zlib.crc32(rel.encode()) % heldout_every == 0 else "train"
        limit = max_heldout if split == "heldout" else max_train
        if len(splits[split]) >= limit:
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for pair in TASKS[task](source):
            if len(splits[split]) < limit:
                splits[split].append({**pair, "source": rel})
        if all(len(splits[s]) >= (max_heldout if s == "heldout" else max_train) for s in splits):
            break
    counts = {}
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts[split] = len(rows)
    stamp.write_text(json.dumps({"settings": settings, "counts": counts, "stdlib": str(root)}, indent=1))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the demo's prompt/response corpus from the standard library.")
    ap.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    ap.add_argument("--max-train", type=int, default=6000)
    ap.add_argument("--max-heldout", type=int, default=600)
    ap.add_argument("--task", choices=tuple(TASKS), default="call", help="call (default) or docstring; see the module docstring")
    args = ap.parse_args()
    print(build_corpus(args.out, max_train=args.max_train, max_heldout=args.max_heldout, task=args.task))


if __name__ == "__main__":
    main()

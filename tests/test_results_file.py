"""The docs' figures come from benchmarks/results.json: README.md's performance table and RESULTS.md's
current figures agree with it, a figure edited by hand in a doc is caught, and `record()` writes what a
benchmark measured.

    .venv/bin/python -m pytest tests/test_results_file.py -q      # ~1 s
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import render_results  # noqa: E402
import results  # noqa: E402

FIGURES = json.loads((ROOT / "benchmarks" / "results.json").read_text())["figures"]


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the two docs and the results file, laid out as in the checkout."""
    (tmp_path / "benchmarks").mkdir()
    for name in ("README.md", "benchmarks/RESULTS.md", "benchmarks/results.json"):
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_docs_agree_with_the_results_file(capsys):
    assert render_results.main(["--check"]) == 0, capsys.readouterr().err


# A README figure with plain values: its measured cell is in both docs' tables.
SHOWN = next(f for f in FIGURES if f["readme"] and f["values"] and not render_results.is_table(f["values"]))


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/RESULTS.md"])
def test_a_figure_edited_by_hand_in_a_doc_is_caught(checkout, doc, capsys):
    import re

    path = checkout / doc
    text, cell = path.read_text(), render_results.measured(SHOWN)
    assert cell in text
    edited = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), cell, count=1)  # one digit changed
    path.write_text(text.replace(cell, edited, 1))
    assert render_results.main(["--check", "--root", str(checkout)]) == 1
    assert doc in capsys.readouterr().err


def test_a_changed_figure_reaches_both_docs_when_rendered(checkout):
    path = checkout / "benchmarks" / "results.json"
    doc = json.loads(path.read_text())
    figure = next(f for f in doc["figures"] if f["id"] == SHOWN["id"])
    old = render_results.measured(figure)
    figure["values"] = {name: 0.123 for name in figure["values"]}
    new = render_results.measured(figure)
    path.write_text(json.dumps(doc))
    assert render_results.main(["--check", "--root", str(checkout)]) == 1
    assert render_results.main(["--root", str(checkout)]) == 0
    assert render_results.main(["--check", "--root", str(checkout)]) == 0
    for name in ("README.md", "benchmarks/RESULTS.md"):
        text = (checkout / name).read_text()
        assert new in text and old not in text, name


def test_a_doc_without_its_blocks_is_refused(checkout):
    readme = checkout / "README.md"
    readme.write_text(readme.read_text().replace("<!-- results:", "<!-- gone:"))
    with pytest.raises(SystemExit, match="README.md has no"):
        render_results.main(["--check", "--root", str(checkout)])


def test_every_figure_says_how_to_rerun_it_or_why_it_cannot():
    for f in FIGURES:
        assert f["what"] and f["area"] and f["met"] in (True, False, None), f["id"]
        assert f["command"] or f["notes"], f"{f['id']}: no command and no note saying why"
        if f["values"] is None:
            assert f["met"] is None, f"{f['id']}: not measured, so neither met nor missed"
        if f["met"] is False:
            assert f["notes"], f"{f['id']}: a missed goal needs a note on why"


def test_the_benchmarks_record_figures_the_file_describes():
    """Every literal id a benchmark passes to record() has an entry (so its what, goal and notes exist)."""
    recorded = set()
    for script in (ROOT / "benchmarks").glob("bench_*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "record" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                recorded.add(node.args[0].value)
    assert {"storage.read_k32", "precompute.own_work", "train.step.cached", "train.s3_read.steady"} <= recorded
    assert recorded <= {f["id"] for f in FIGURES}


def test_record_updates_an_entry_and_keeps_its_description(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    shutil.copy2(ROOT / "benchmarks" / "results.json", path)
    monkeypatch.setattr(results, "PATH", path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "bench_train.py"), "--fused"])
    before = next(f for f in results.load(path) if f["id"] == "train.fused.time")
    results.record("train.fused.time", values={"kl + CE fused": 0.9, "bild + CE fused": 0.95}, met=True)
    after = next(f for f in results.load(path) if f["id"] == "train.fused.time")
    assert after["values"] == {"kl + CE fused": 0.9, "bild + CE fused": 0.95}
    assert after["command"] == ".venv/bin/python benchmarks/bench_train.py --fused"
    assert after["what"] == before["what"] and after["goal"] == before["goal"] and after["notes"] == before["notes"]
    assert len(results.load(path)) == len(FIGURES)
    with pytest.raises(TypeError, match="new figure"):
        results.record("train.something_new", values={"x": 1.0})
    results.record("train.something_new", values={"x": 1.0}, what="a new figure", area="stage two")
    assert [f["id"] for f in results.load(path)][-1] == "train.something_new"


def _anchors(markdown: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (code blocks skipped)."""
    import re

    anchors, fenced = set(), False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_links_into_the_docs_anchors_resolve():
    """A link `FILE.md#anchor` (or `#anchor`) in the README, docs/ or RESULTS.md names a heading of that file."""
    import re

    sources = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for source in sources:
        for target, anchor in re.findall(r"\]\(((?!https?:)[^)#\s]*)#([^)\s]+)\)", source.read_text()):
            path = (source.parent / target).resolve() if target else source
            assert anchor in _anchors(path), f"{source.relative_to(ROOT)}: no heading for {target}#{anchor}"
            checked += 1
    assert checked >= 4

"""Durable, and honest about identity:

- shard files and the index are flushed to the disk (fsync, the real call, observed) before the rename
  that publishes them, and the folder after it;
- a rank's data position in a checkpoint is written atomically, and a torn one ends a resume in a
  one-line error naming the file, not a traceback;
- the teacher's identity includes a digest of its weights: the same command over changed weights under
  the same path is refused instead of resuming into the cache of the old ones;
- `--trust-remote-code` (for the student) runs no code from a tokenizer folder that a cache names.

    .venv/bin/python -m pytest tests/pipeline/test_durability.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_errors import assert_contract
from precompute_util import reference_flags, run_here, text_rows, write_jsonl
from synthetic import TEXT_FIELDS, VOCAB, make_sequence, metadata

from logitcache.storage import CacheWriter, ShardData, layout


def test_shards_and_index_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    for backend in ("zarr", "arrow"):
        root = tmp_path / backend
        events.clear()
        w = CacheWriter(str(root), backend=backend, encoding="compact", vocab_size=VOCAB, fingerprint="d",
                        text_fields=TEXT_FIELDS)
        rng = np.random.default_rng(0)
        w.write_shard(0, ShardData.from_sequences([make_sequence(rng, 0, 12, 4)], text_fields=TEXT_FIELDS))
        w.finalize(metadata(4))
        for final in [p for p in root.rglob("*") if p.is_file()]:
            top = final.relative_to(root).parts[0]
            # the rename that published it (its own, or its shard folder's)
            at = next(i for i, e in enumerate(events) if e[0] == "rename" and
                      (e[2] == str(final) or e[2] == str(root / top)))
            src = Path(events[at][1]) / final.relative_to(root / top) if events[at][2] == str(root / top) \
                else Path(events[at][1])
            assert ("fsync", str(src)) in events[:at], f"{final} published before its bytes were flushed"
            # the folder the rename happened in (the shard folder's own entries were flushed before it)
            assert ("fsync", str(Path(events[at][2]).parent)) in events[at:], f"{final}'s rename not flushed"


def test_a_torn_data_position_ends_a_resume_in_one_line(tmp_path, capsys):
    from trainkit import world

    w = world()
    out = tmp_path / "student"
    argv = ["train", "--student", str(w.student), "--cache", str(w.cache), "--loss", "kl", "--out", str(out),
            "--max-steps", "2", "--batch-size", "2", "--save-steps", "1", "--num-workers", "0"]
    assert run_here(argv) == 0
    position = out / "checkpoint-1" / "logitcache_data_rank0.json"
    assert json.loads(position.read_text())  # written whole
    assert not list((out / "checkpoint-1").glob("*.tmp-*"))
    position.write_text(position.read_text()[:7])  # what a crash mid-write used to leave
    capsys.readouterr()
    shutil.rmtree(out / "checkpoint-2")
    rc = run_here([*argv, "--resume"])
    assert_contract(rc, capsys.readouterr().err, "train", (str(position), "unreadable data position"))


def test_changed_weights_under_the_same_path_do_not_resume_into_the_cache(tiny_teacher, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher[0], teacher)
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(4))
    flags = [*reference_flags(teacher, data, tmp_path / "cache"), "--rows-per-shard", "4"]
    assert run_here(flags) == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index["teacher"]["weights_digest"]) == 64
    # Fine-tuned in place: every tensor moves a little; names, shapes, dtypes and file size stay.
    weights = load_file(str(teacher / "model.safetensors"))
    save_file({k: v + torch.full_like(v, 1e-2) for k, v in weights.items()}, str(teacher / "model.safetensors"),
              metadata={"format": "pt"})
    capsys.readouterr()
    rc = run_here(flags)
    assert_contract(rc, capsys.readouterr().err, "precompute", ("started with other settings", "weights_digest"))


def test_trust_remote_code_does_not_reach_a_tokenizer_folder_the_cache_names(tiny_teacher, tmp_path):
    from logitcache.stages.train.sources import _local_tokenizer

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher[0], folder)
    marker = tmp_path / "ran"
    (folder / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # The student's --trust-remote-code reaches training's settings, never this folder's loader.
    _local_tokenizer({"teacher": {"name_or_path": str(folder)}}, SimpleNamespace(trust_remote_code=True))
    assert not marker.exists(), "code from the cache's tokenizer folder ran"


del layout, pytest

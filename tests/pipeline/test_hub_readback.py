"""Reading a shared cache back as `hf://datasets/OWNER/NAME[@REV]`: `logitcache train` runs through the real
`huggingface_hub.HfFileSystem` against a loopback server that answers the Hub's read API
(`tests/support/fake_hub.py`), since the Hub itself cannot be reached here. What is checked: the path and
revision it asks for, that `--storage-option token=/endpoint=` reach it (in DataLoader workers too),
and the one-line errors of offline mode and of an unknown revision.

    .venv/bin/pytest tests/pipeline/test_hub_readback.py
"""

import json

import pytest
from fake_hub import fake_hub
from trainkit import build_cache, text_rows, world

from logitcache.pipeline.cli import main


@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1 (conftest); the loopback hub needs huggingface_hub online."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def train_args(cache: str, out, *options: str) -> list[str]:
    w = world()
    opts = [x for o in options for x in ("--storage-option", o)]
    return ["train", "--student", str(w.student), "--cache", cache, *opts, "--loss", "kl", "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--num-workers", "1", "--save-steps", "1000"]


def test_train_reads_a_cache_from_a_hub_dataset_repo_at_a_revision(online, tmp_path, capsys):
    w = world()
    with fake_hub({"team/qwen-top8": str(w.cache)}, revisions={"v1"}) as hub:
        rc = main(train_args("hf://datasets/team/qwen-top8@v1", tmp_path / "out", f"endpoint={hub.endpoint}",
                             "token=hf_test_token"))
        assert rc == 0, capsys.readouterr().err
        requests = list(hub.requests)
    result = json.loads((tmp_path / "out" / "logitcache_train.json").read_text())
    assert result["cache"]["url"] == "hf://datasets/team/qwen-top8@v1" and result["global_step"] == 2
    paths = [p for _, p, _ in requests]
    assert "/api/datasets/team/qwen-top8/revision/v1" in paths
    assert "/datasets/team/qwen-top8/resolve/v1/index.json" in paths
    assert any(p.startswith("/datasets/team/qwen-top8/resolve/v1/shard-") for p in paths)
    assert {auth for _, _, auth in requests} == {"Bearer hf_test_token"}  # every request, workers' included


def test_train_mixes_a_hub_cache_with_a_local_one(online, tmp_path, capsys):
    w = world()
    local = build_cache(w.root / "hub_mix_b", w.teacher, w.tokenizer, text_rows(12, seed=31), per_shard=4)
    with fake_hub({"team/a": str(w.cache)}) as hub:
        args = train_args("hf://datasets/team/a", tmp_path / "out", f"endpoint={hub.endpoint}")
        args.insert(args.index("--cache") + 2, str(local))
        assert main(args) == 0, capsys.readouterr().err
    counts = json.loads((tmp_path / "out" / "logitcache_train.json").read_text())["cache"]["sequences_per_cache"]
    assert set(counts) == {"hf://datasets/team/a", str(local)} and sum(counts.values()) == 8


def test_unknown_revision_and_offline_mode_are_one_line_errors(online, tmp_path, capsys, monkeypatch):
    w = world()
    with fake_hub({"team/a": str(w.cache)}) as hub:
        assert main(train_args("hf://datasets/team/a@nope", tmp_path / "o1", f"endpoint={hub.endpoint}")) == 2
        err = capsys.readouterr().err
        assert "logitcache train: error:" in err and "Traceback" not in err and "team/a@nope" in err
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        assert main(train_args("hf://datasets/team/a", tmp_path / "o2", f"endpoint={hub.endpoint}")) == 2
        err = capsys.readouterr().err
        assert "cannot read the index" in err and "offline mode is enabled" in err


def test_precompute_streams_a_slice_of_a_hub_dataset_repo(online, tmp_path):
    """`load_rows("hf://datasets/...@REV", streaming=True)`: the files through HfFileSystem, only as far as
    the slice reaches; the fingerprint follows the files' blob ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from logitcache.stages.precompute.data import load_rows

    for f in range(6):
        pq.write_table(pa.table({"text": [f"file {f} row {i}" for i in range(10)]}),
                       tmp_path / f"train-{f:02d}.parquet", row_group_size=5)
    with fake_hub({"team/corpus": str(tmp_path)}, revisions={"v1"}) as hub:
        options = {"endpoint": hub.endpoint}
        rows, info = load_rows("hf://datasets/team/corpus@v1", streaming=True, max_rows=15, storage_options=options)
        assert rows[0:15]["text"] == [f"file {i // 10} row {i % 10}" for i in range(15)]
        assert info["files_read"] == 2 and info["files"] == 6
        downloaded = {p for _, p, _ in hub.requests if "/resolve/" in p}
        assert downloaded == {f"/datasets/team/corpus/resolve/v1/train-{f:02d}.parquet" for f in range(2)}
        # Another file content at the same size and path: another fingerprint (the blob id changed).
        size = (tmp_path / "train-00.parquet").stat().st_size
        table = pq.read_table(tmp_path / "train-00.parquet").to_pydict()
        table["text"][0] = "file 0 row X"
        pq.write_table(pa.table(table), tmp_path / "train-00.parquet", row_group_size=5)
        assert (tmp_path / "train-00.parquet").stat().st_size == size
        again = load_rows("hf://datasets/team/corpus@v1", streaming=True, max_rows=15,
                          storage_options={**options, "skip_instance_cache": True})[1]
    assert again["fingerprint"] != info["fingerprint"]


def test_train_and_eval_stream_rows_of_a_hub_dataset_repo(online, tmp_path, capsys):
    """`train --data` / `eval --data hf://datasets/...@REV --streaming --max-rows N` with field flags, as
    `precompute --data` takes them: only the files the slice reaches are downloaded, in DataLoader workers too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    w = world()
    rows = text_rows(30, seed=41)
    for f in range(3):
        part = rows[10 * f:10 * f + 10]
        pq.write_table(pa.table({"q": [r["prompt"] for r in part], "a": [r["response"] for r in part]}),
                       tmp_path / f"train-{f:02d}.parquet", row_group_size=5)
    flags = ["--data", "hf://datasets/team/qa@v1", "--streaming", "--max-rows", "12", "--prompt-field", "q",
             "--response-field", "a"]
    with fake_hub({"team/qa": str(tmp_path)}, revisions={"v1"}) as hub:
        rc = main(["eval", "--model", str(w.student), *flags, "--storage-option", f"endpoint={hub.endpoint}",
                   "--device", "cpu", "--json"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        data = json.loads(captured.out)["data"]
        expected = sum(len(w.tokenizer(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in rows[:12])
        assert data["sequences"] == 12 and data["positions"] == expected
        rc = main(["train", "--student", str(w.student), *flags, "--storage-option", f"endpoint={hub.endpoint}",
                   "--loss", "sft", "--out", str(tmp_path / "sft"), "--epochs", "1", "--batch-size", "4",
                   "--num-workers", "1", "--save-steps", "1000"])
        assert rc == 0, capsys.readouterr().err
        downloaded = {p for _, p, _ in hub.requests if "/resolve/" in p}
    assert downloaded == {f"/datasets/team/qa/resolve/v1/train-{f:02d}.parquet" for f in range(2)}
    assert json.loads((tmp_path / "sft" / "logitcache_train.json").read_text())["global_step"] == 3

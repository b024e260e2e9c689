"""`--print-config` on every command, and every command line the project ships checked with it.

`--print-config` checks every option and every rule between options (exactly one of --max-steps and
--epochs, the loss's options, the targets, the jobs) without loading a model or reading data, and
prints the resolved settings as YAML that `--config` reads back. Every `logitcache` command line in
docker/ (the compose services, the Kubernetes job), in docs/ and in the README must pass it.

    .venv/bin/pytest tests/pipeline/test_print_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from doc_commands import PLACEHOLDER, commands_in, fenced_blocks

from logitcache.pipeline.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def docker_command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) of the compose services' commands and the Kubernetes job's container args."""
    found = []
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        found.append((f"docker/compose.yaml:{name}", list(service["command"])))
    job = yaml.safe_load((ROOT / "docker" / "precompute-job.yaml").read_text())
    for container in job["spec"]["template"]["spec"]["containers"]:
        # Kubernetes expands $(JOB_COMPLETION_INDEX) to the pod's index: 0 stands for any.
        found.append((f"docker/precompute-job.yaml:{container['name']}",
                      [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in container["args"]]))
    return found


def doc_command_lines() -> list[tuple[str, list[str]]]:
    return [(str(Path(c.where).relative_to(ROOT)), _index_zero(c.argv)) for doc in DOCS for c in commands_in(doc)
            if c.argv and c.argv[0] in COMMANDS and not {"--help", "-h"} & set(c.argv)]


def _index_zero(argv: list[str]) -> list[str]:
    """A shell variable as --job-index (`$SLURM_ARRAY_TASK_ID`) stands for any index: 0, valid for any --num-jobs."""
    return ["0" if a == PLACEHOLDER and i and argv[i - 1] == "--job-index" else a
            for i, a in enumerate(argv)]


def _with_doc_configs(argv: list[str], where: str, tmp_path: Path) -> list[str]:
    """`--config NAME.yaml` pointed at the doc's own yaml block that starts with `# NAME.yaml`."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config") + 1
    doc = ROOT / where.rsplit(":", 1)[0]
    blocks = [text for _, _, text in fenced_blocks(doc, ("yaml",)) if text.startswith(f"# {argv[i]}")]
    assert len(blocks) == 1, f"{where}: --config {argv[i]} has no yaml block of that name in its doc"
    path = tmp_path / argv[i]
    path.write_text(blocks[0])
    return [*argv[:i], str(path), *argv[i + 1:]]


SHIPPED = docker_command_lines() + doc_command_lines()


def test_the_shipped_lines_are_found():
    wheres = {where.split(":")[0] for where, _ in SHIPPED}
    assert {"docker/compose.yaml", "docker/precompute-job.yaml", "README.md", "docs/SCALING.md"} <= wheres
    assert {"precompute", "train", "merge", "validate", "convert", "push", "eval", "inspect"} <= \
        {argv[0] for _, argv in SHIPPED}


@pytest.mark.parametrize("where,argv", SHIPPED, ids=[f"{w}-{a[0]}" for w, a in SHIPPED])
def test_every_shipped_command_line_passes_print_config(where, argv, tmp_path, capsys):
    rc = main([*_with_doc_configs(argv, where, tmp_path), "--print-config"])
    assert rc == 0, f"{where}: logitcache {' '.join(argv)}\n{capsys.readouterr().err}"


def test_rules_between_options_are_caught_at_parse_time(capsys):
    base = ["train", "--student", "Qwen/Qwen2.5-0.5B", "--cache", "/caches/c", "--out", "/tmp/never"]
    assert main([*base, "--print-config"]) == 2
    assert "exactly one of --max-steps and --epochs" in capsys.readouterr().err
    assert main([*base, "--max-steps", "5", "--loss", "bild", "--loss-option", "nope=1", "--print-config"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["precompute", "--teacher", "Qwen/Qwen2.5-7B-Instruct", "--data", "d.jsonl", "--out", "c",
                 "--num-jobs", "4", "--job-index", "4", "--print-config"]) == 2
    assert "--job-index 4" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--student", "Qwen/Qwen2.5-0.5B", "--cache", "/caches/a", "/caches/b", "--cache-weights", "3", "1",
     "--loss", "bild", "--out", "/tmp/s", "--max-steps", "100", "--hf-arg", "logging_first_step=true",
     "--lora-r", "16", "--pack"],
    ["precompute", "--teacher", "Qwen/Qwen2.5-7B-Instruct", "--data", "chats.jsonl", "--messages-field", "messages",
     "--out", "s3://bucket/cache", "--mode", "sample", "--samples", "32", "--temperature", "2",
     "--engine-arg", "gpu_memory_utilization=0.8"],
], ids=["train", "precompute"])
def test_printed_config_reads_back_the_same(argv, tmp_path, capsys):
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    config = tmp_path / "settings.yaml"
    config.write_text(printed)
    assert main([argv[0], "--config", str(config), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_print_config_redacts_credentials(capsys):
    assert main(["validate", "s3://bucket/cache", "--print-config"]) == 0
    assert main(["train", "--student", "Qwen/Qwen2.5-0.5B", "--cache", "s3://b/c", "--out", "/tmp/s", "--max-steps",
                 "1", "--storage-option", "key=AKIAPRINTCONFIG1", "--storage-option", "endpoint_url=http://minio:9000",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("cache: s3://bucket/cache\n", 1)[1])
    assert printed["storage_options"] == {"key": "<redacted>", "client_kwargs": {"endpoint_url": "http://minio:9000"}}


@pytest.mark.parametrize("argv", [["merge", "s3://b/c"], ["validate", "s3://b/c"], ["inspect", "s3://b/c", "--json"],
                                  ["convert", "s3://b/c", "s3://b/d", "--backend", "zarr"]], ids=lambda a: a[0])
def test_cache_commands_print_their_storage_options_redacted(argv, capsys):
    flags = ["--storage-option", "key=AKIAPRINTCONFIG2", "--storage-option", "secret=printConfigSecret2",
             "--storage-option", "endpoint_url=http://minio:9000"]
    assert main([*argv, *flags, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "AKIAPRINTCONFIG2" not in printed and "printConfigSecret2" not in printed
    assert yaml.safe_load(printed)["storage_options"] == {
        "key": "<redacted>", "secret": "<redacted>", "client_kwargs": {"endpoint_url": "http://minio:9000"}}


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_examples_cover_the_main_runs():
    text = "\n".join(p.read_text() for p in EXAMPLES)
    assert {"precompute", "train"} == {p.name.split("-")[0] for p in EXAMPLES}
    assert "loss: bild" in text and "lora_r:" in text and "pack: true" in text and "cache_weights:" in text
    assert "loss: uld" in text


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_passes_print_config(path, capsys):
    command = path.name.split("-")[0]
    assert f"logitcache {command} --config examples/{path.name}" in path.read_text()  # its own run line
    assert main([command, "--config", str(path), "--print-config"]) == 0, capsys.readouterr().err


def help_examples() -> list[tuple[str, list[str]]]:
    """(command, argv) of every `logitcache ...` example in each command's --help epilog, continuations joined
    and shell variables as 0."""
    import re
    import shlex

    from logitcache.pipeline.cli import build_parser

    found = []
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        text = re.sub(r"\\\n\s*", " ", parser.epilog or "")
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("logitcache "):
                words = shlex.split(re.sub(r"\$[A-Za-z_]+", "0", line.split(" #")[0]))
                found.append((name, words[1:]))
    return found


HELP_EXAMPLES = help_examples()


def test_every_command_shows_examples():
    assert {"precompute", "train", "merge", "validate"} <= {name for name, _ in HELP_EXAMPLES}


@pytest.mark.parametrize("name,argv", HELP_EXAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(HELP_EXAMPLES)])
def test_every_help_example_passes_print_config(name, argv, tmp_path, monkeypatch, capsys):
    if "--config" in argv:  # the example's own YAML: any valid one stands for it
        monkeypatch.chdir(tmp_path)
        i = argv.index("--config") + 1
        (tmp_path / argv[i]).write_text(CONFIGS[argv[0]])
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err


CONFIGS = {"precompute": "teacher: Qwen/Qwen2.5-0.5B\ndata: d.jsonl\ntext_field: text\nout: ./c\n",
           "train": "student: Qwen/Qwen2.5-0.5B\ncache: ./c\nout: ./s\nmax_steps: 10\n"}


def test_a_no_key_in_a_config_means_what_its_flag_means(tmp_path, capsys):
    """`no_progress: true` is `--no-progress` (it once turned the bar on: the key was read as `progress`)."""
    config = tmp_path / "c.yaml"
    for key, value, dest, want in (("no_progress", "true", "progress", False), ("no-progress", "false", "progress", True),
                                   ("progress", "false", "progress", False)):
        config.write_text(CONFIGS["precompute"] + f"{key}: {value}\n")
        assert main(["precompute", "--config", str(config), "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)[dest] is want, key
    config.write_text(CONFIGS["train"] + "no_fused_head: true\n")
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["fused_head"] is False

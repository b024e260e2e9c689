"""docs/SCALING.md cannot drift from the tools it quotes: every `logitcache` command parses with the
real CLI parser, every `torchrun` / `accelerate launch` line with theirs, the YAML files load the way
their tools load them. (The card `push` writes is tested in tests/pipeline/test_push.py.)

    .venv/bin/pytest tests/pipeline/test_docs_commands.py     # ~10 s
"""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_commands import commands_in, fenced_blocks, parse_logitcache, parse_with, shell_commands

ROOT = Path(__file__).resolve().parents[2]
SCALING = ROOT / "docs" / "SCALING.md"
COMMANDS = commands_in(SCALING)


def named_block(language: str, name: str) -> str:
    """The doc's `language` block whose first line is the comment `# NAME...`."""
    found = [text for _, _, text in fenced_blocks(SCALING, (language,)) if text.startswith(f"# {name}")]
    assert len(found) == 1, f"{SCALING}: expected one {language} block starting with '# {name}'"
    return found[0]


def test_scaling_doc_covers_both_stages_and_every_launcher():
    assert {"precompute", "merge", "train", "convert", "validate", "push"} <= {c.argv[0] for c in COMMANDS}
    launched = {c.words[0] for c in COMMANDS}
    assert {"logitcache", "srun", "torchrun", "accelerate", "ray"} <= launched, launched
    assert any("--ray-address" in c.argv for c in COMMANDS)
    assert any("--num-jobs" in c.argv and "--job-index" in c.argv for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where.rsplit(':', 1)[1]}-{c.argv[0]}")
def test_logitcache_command_parses(command):
    assert parse_logitcache(command.argv, command.where) is not None, f"{command}: only --help"


def test_commands_with_the_documented_config_file_parse_with_it(tmp_path):
    """`--config precompute.yaml` read for real: keys are option names, required options present."""
    from logitcache.pipeline.cli import _apply_config, build_parser

    config = tmp_path / "precompute.yaml"
    config.write_text(named_block("yaml", "precompute.yaml"))
    uses = [c for c in COMMANDS if "precompute.yaml" in c.argv]
    assert len(uses) >= 3  # the Slurm task, the Ray driver, the Ray job
    for command in uses:
        argv = [str(config) if a == "precompute.yaml" else a for a in command.argv]
        args = _apply_config(build_parser(), argv)
        assert args.teacher and args.data and args.out.startswith("s3://"), command


def test_launcher_flags_parse():
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    torchruns = accelerates = 0
    for where, words in shell_commands(SCALING):
        names = [Path(w).name for w in words]
        if "torchrun" in names:
            args = parse_with(get_args_parser(), words[names.index("torchrun") + 1:], where)
            assert (args.module and args.training_script == "logitcache.pipeline.cli") or \
                (args.no_python and args.training_script == "logitcache"), where
            torchruns += 1
        if "accelerate" in names and words[names.index("accelerate") + 1] == "launch":
            args = parse_with(launch_command_parser(), words[names.index("accelerate") + 2:], where)
            assert args.module and args.training_script == "logitcache.pipeline.cli", where
            accelerates += 1
    assert torchruns >= 3 and accelerates >= 1


def test_accelerate_config_loads(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    path = tmp_path / "multinode.yaml"
    path.write_text(named_block("yaml", "multinode.yaml"))
    config = ClusterConfig.from_yaml_file(str(path))  # refuses unknown keys
    assert config.num_machines == 2 and config.num_processes == 16 and config.distributed_type == "MULTI_GPU"


def test_python_snippets_compile():
    blocks = fenced_blocks(SCALING, ("python",))
    assert blocks
    for line, _, text in blocks:
        compile(text, f"{SCALING}:{line}", "exec")

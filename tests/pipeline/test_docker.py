"""The Docker images and job manifests: what they copy exists, and every command they run parses.

No Docker engine runs here, so this checks what can be checked without one.

    pytest tests/pipeline/test_docker.py
"""

import json
import shlex
from pathlib import Path

import pytest
import yaml

from logitcache.pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    lines, out = path.read_text().splitlines(), []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _parses(argv: list[str]) -> None:
    parser = build_parser()
    if argv[-1] == "--help":
        assert argv[0] in parser._subparsers._group_actions[0].choices, f"unknown command {argv[0]}"
        return
    parser.parse_args(argv)


def test_two_images_exist():
    assert {p.name for p in DOCKERFILES} == {"precompute.Dockerfile", "train.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_entrypoint_parses(dockerfile):
    ins = _instructions(dockerfile)
    assert ins[0][0] == "FROM"
    for op, rest in ins:
        if op == "COPY":
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, which is not in the repo"
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["logitcache"]
    _parses(json.loads(dict(ins)["CMD"]))
    base = dict(ins)["FROM"]
    assert ("vllm/vllm-openai" in base) == (dockerfile.name == "precompute.Dockerfile")


def test_compose_commands_parse():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).exists()
        _parses(service["command"])


def test_kubernetes_job_parses():
    job = yaml.safe_load((ROOT / "docker" / "precompute-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = [a.replace("$(JOB_COMPLETION_INDEX)", "3") for a in container["args"]]
    _parses(args)
    assert args[args.index("--num-jobs") + 1] == str(job["spec"]["completions"])


def test_image_tag_and_version_floors_match_the_code():
    """The precompute image's vLLM release is the pyproject floor, the floor is what the engine was tested
    with, and installing logitcache there cannot replace vLLM's transformers."""
    import importlib.metadata
    import re

    import tomllib
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = {re.split(r"[<>=!\[ ]", d)[0]: d for d in [*project["dependencies"], *project["optional-dependencies"]["vllm"]]}
    vllm_floor = Version(floor["vllm"].split(">=")[1])
    ins = _instructions(ROOT / "docker" / "precompute.Dockerfile")
    tag = dict(ins)["FROM"].split(":v")[1]
    assert Version(tag) == vllm_floor, (tag, floor["vllm"])
    text = (ROOT / "docker" / "precompute.Dockerfile").read_text()
    assert "-c /tmp/image-pins.txt" in text and "'^(torch|transformers|vllm" in text
    engines = ROOT / "stages" / "precompute" / "engines"
    assert "tok_pooling_type" in (engines / "vllm_pooling.py").read_text()  # the APIs the floor is for
    assert "flat_logprobs" in (engines / "vllm_logprobs.py").read_text()
    transformers_floor = Version(floor["transformers"].split(">=")[1])
    assert transformers_floor >= Version("4.56")  # from_pretrained(dtype=...), which stage two calls
    for name, low in (("vllm", vllm_floor), ("transformers", transformers_floor)):
        try:
            assert Version(importlib.metadata.version(name)) >= low, name  # this machine runs what it declares
        except importlib.metadata.PackageNotFoundError:
            pass


def test_train_image_has_what_train_flags_need():
    """--lora-r needs peft, --report-to tensorboard/wandb and --deepspeed their packages: the image installs them."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = (ROOT / "docker" / "train.Dockerfile").read_text()
    installed = text.split('pip install --no-cache-dir ".[', 1)[1].split("]", 1)[0].split(",")
    packages = {dep.split(">")[0].split("=")[0] for name in installed for dep in extras[name]}
    assert {"peft", "tensorboard", "wandb", "deepspeed", "s3fs"} <= packages


"""No credential is ever written or printed (docs/ERRORS.md, "Credentials").

Distinctive fake credentials go in through every documented route: `--storage-option key=/secret=`
flags (of precompute, eval, merge, validate, inspect and convert), a `--config` YAML's
`storage_options:`, `user:password@` in a URL (an HTTP server on loopback that demands them), a URL
with credentials that fails, and for `push` HF_TOKEN, `--token-file` and the refused `--token`. The
runs are real (the hf engine, a moto S3 server, `train` with a checkpoint); then every byte they wrote
(the caches on disk and in the bucket, the student folders with their checkpoints, the pushed repo)
and everything they printed is searched for the credentials.

    .venv/bin/pytest tests/pipeline/test_secrets.py -m slow
"""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from fake_hub import fake_hub
from precompute_util import text_rows, write_jsonl
from s3server import make_bucket, s3_options

from logitcache.pipeline.cli import main
from logitcache.storage.redact import REDACTED, is_credential_key, redact_options, redact_text, redact_url

BUCKET = "lc-secrets"
# One distinctive value per route, so a leak says which route leaked.
SECRETS = {
    "flag key": "AKIAFLAGKEY7Q2ZX", "flag secret": "flagSecret-9f3c1e7d",
    "yaml key": "AKIAYAMLKEY4W8PV", "yaml secret": "yamlSecret-2b6a0c4e",
    "url password": "urlPassw0rd-77e1", "failing url secret": "failUrlSecret-5d9b",
    "token file": "hf_tokenFILE3c8e2a1b", "token flag": "hf_tokenFLAG6f0d4b9c", "hf env token": "hf_envTOKEN1a2b3c",
}
URL_USER = "lcuser"


@pytest.fixture(scope="module")
def http_data(tmp_path_factory):
    """(URL with user:password, requests seen with the right password): a JSONL file behind Basic auth."""
    folder = tmp_path_factory.mktemp("http-data")
    body = write_jsonl(folder / "rows.jsonl", text_rows(8)).read_bytes()
    good = "Basic " + base64.b64encode(f"{URL_USER}:{SECRETS['url password']}".encode()).decode()
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, with_body: bool):
            if self.headers.get("Authorization") != good:
                self.send_response(401)
                self.end_headers()
                return
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self):
            self._answer(True)

        def do_HEAD(self):
            self._answer(False)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://{URL_USER}:{SECRETS['url password']}@127.0.0.1:{server.server_port}/rows.jsonl"
    yield url, seen
    server.shutdown()


def _everything_written(paths: list[Path], bucket_fs) -> dict[str, bytes]:
    """{name: bytes} of every file under `paths` and every object in the bucket."""
    found = {}
    for root in paths:
        for d, _, files in os.walk(root):
            for f in files:
                found[os.path.join(d, f)] = Path(d, f).read_bytes()
    for key in bucket_fs.find(BUCKET):
        found[f"s3://{key}"] = bucket_fs.cat_file(key)
    return found


@pytest.mark.slow
def test_no_credential_is_written_or_printed(tiny_teacher, s3, http_data, tmp_path, monkeypatch, capfd):
    import s3fs
    import huggingface_hub

    from logitcache.pipeline.scratch import make_tiny_llama

    teacher = str(tiny_teacher[0])
    student = make_tiny_llama(tmp_path / "student0", tiny_teacher[1], hidden_size=64, num_layers=1, num_heads=1, seed=1)
    endpoint, _ = s3
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)  # the routes under test alone carry the credentials
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_bucket(endpoint, BUCKET)
    bucket = s3fs.S3FileSystem(**s3_options(endpoint))
    bucket.put(str(write_jsonl(tmp_path / "rows.jsonl", text_rows(8))), f"{BUCKET}/data/rows.jsonl")
    url_data, seen = http_data
    stage_one = ["--teacher", teacher, "--engine", "hf", "--text-field", "text", "--top-k", "8",
                 "--rows-per-shard", "4", "--no-progress"]
    flags = ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", f"key={SECRETS['flag key']}",
             "--storage-option", f"secret={SECRETS['flag secret']}"]

    # Stage one: --data behind user:password@, and a cache in the bucket with --storage-option flags.
    local_cache = tmp_path / "cache"
    assert main(["precompute", "--data", url_data, "--out", str(local_cache), "--backend", "parquet", *stage_one]) == 0
    assert seen, "the HTTP data was never read with the URL's credentials"
    assert main(["precompute", "--data", f"s3://{BUCKET}/data/rows.jsonl", "--out", f"s3://{BUCKET}/cache",
                 *stage_one, *flags]) == 0

    # Stage two: a --config YAML's storage_options and a checkpoint; held-out data behind user:password@.
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"storage_options": {"endpoint_url": endpoint, "key": SECRETS["yaml key"],
                                                          "secret": SECRETS["yaml secret"]}}))
    student_dir = tmp_path / "student"
    assert main(["train", "--config", str(config), "--student", str(student), "--cache", f"s3://{BUCKET}/cache",
                 "--loss", "kl", "--out", str(student_dir), "--max-steps", "2", "--save-steps", "1",
                 "--batch-size", "4", "--num-workers", "0"]) == 0
    url_student = tmp_path / "student_url"
    assert main(["train", "--student", str(student), "--cache", str(local_cache), "--loss", "kl", "--out",
                 str(url_student), "--max-steps", "1", "--batch-size", "4", "--num-workers", "0",
                 "--eval-data", url_data]) == 0
    assert main(["eval", "--model", str(student_dir), "--cache", f"s3://{BUCKET}/cache", *flags,
                 "--device", "cpu", "--json"]) == 0
    # The commands that only open caches take the same flags (convert's reach both ends: its copy is in the bucket).
    for argv in (["merge"], ["validate"], ["inspect", "--json"],
                 ["convert", f"s3://{BUCKET}/cache-zarr", "--backend", "zarr", "--no-progress"]):
        assert main([argv[0], f"s3://{BUCKET}/cache", *argv[1:], *flags]) == 0, argv
    # A URL with credentials that fails: the error line names the URL, without them.
    bad = f"s3://AKIAFAILURLKEY:{SECRETS['failing url secret']}@{BUCKET}/nowhere"
    assert main(["train", "--student", str(student), "--cache", bad, "--storage-option", f"endpoint_url={endpoint}",
                 "--out", str(tmp_path / "bad"), "--max-steps", "1"]) == 2

    # push: the token from --token-file reaches the Hub (a loopback one, the real client); --token on the
    # command line is refused.
    tokens, real_api = [], huggingface_hub.HfApi
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRETS["hf env token"])
    token_file = tmp_path / "token"  # outside every folder searched below: it is the user's own file
    token_file.write_text(SECRETS["token file"] + "\n")
    with fake_hub({}, new_repos_root=str(tmp_path / "hub")) as fake:
        def hub(token=None, **_):
            tokens.append(token)
            return real_api(endpoint=fake.endpoint, token=token)

        monkeypatch.setattr(huggingface_hub, "HfApi", hub)
        assert main(["push", str(local_cache), "me/logits", "--token-file", str(token_file), "--mass-shards", "0"]) == 0
        assert main(["push", str(local_cache), "me/logits", "--token", SECRETS["token flag"]]) == 2
    repo = Path(fake.repos["me/logits"])
    assert tokens == [SECRETS["token file"]] and (repo / "index.json").exists()
    assert {auth for _, _, auth in fake.requests} == {f"Bearer {SECRETS['token file']}"}
    printed = capfd.readouterr()
    assert "--token is not taken on the command line" in printed.err

    # Nothing written or printed holds any of them.
    written = _everything_written([local_cache, student_dir, url_student, repo], bucket)
    assert any("checkpoint-" in name for name in written) and f"s3://{BUCKET}/cache/index.json" in written
    assert f"s3://{BUCKET}/cache-zarr/index.json" in written
    for what, secret in SECRETS.items():
        for name, data in written.items():
            assert secret.encode() not in data, f"the {what} is written in {name}"
        assert secret not in printed.out + printed.err, f"the {what} is printed"
    # ... while what is harmless is still recorded, and the failing URL is still named.
    settings = json.loads((student_dir / "logitcache_train.json").read_text())["settings"]
    assert settings["storage_options"] == {"key": REDACTED, "secret": REDACTED,
                                           "client_kwargs": {"endpoint_url": endpoint}}
    url_settings = json.loads((url_student / "logitcache_train.json").read_text())["settings"]
    assert url_settings["eval_data"] == redact_url(url_data) and REDACTED in url_settings["eval_data"]
    index = json.loads((local_cache / "index.json").read_text())
    assert index["dataset"]["source"] == url_data.replace(f"{URL_USER}:{SECRETS['url password']}", REDACTED)
    failed = next(line for line in printed.err.splitlines() if line.startswith("logitcache train: error:"))
    assert f"s3://{REDACTED}@{BUCKET}/nowhere" in failed and "cannot read the index" in failed


def test_redaction_rules():
    """Storage options by allow-list (a key nobody foresaw is hidden), URLs' user info and query values,
    credential-named engine options."""
    options = {"key": "k", "secret": "s", "token": "t", "sse_customer_key": "x", "anon": False,
               "client_kwargs": {"endpoint_url": "http://u:p@minio:9000", "region_name": "eu", "aws_session_token": "t"},
               "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2}}}
    assert redact_options(options) == {
        "key": REDACTED, "secret": REDACTED, "token": REDACTED, "sse_customer_key": REDACTED, "anon": False,
        "client_kwargs": {"endpoint_url": f"http://{REDACTED}@minio:9000", "region_name": "eu",
                          "aws_session_token": REDACTED},
        "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2}}}
    assert redact_options(None) is None
    assert redact_url("/data/train.jsonl") == "/data/train.jsonl"
    assert redact_url("s3://bucket/cache") == "s3://bucket/cache"
    assert redact_url("https://me:pw@host/a.jsonl") == f"https://{REDACTED}@host/a.jsonl"
    assert redact_url("https://host/a?X-Amz-Signature=abc&download=true") == \
        f"https://host/a?X-Amz-Signature={REDACTED}&download=true"
    assert redact_text("cannot open s3://k:s@b/x (timed out)") == f"cannot open s3://{REDACTED}@b/x (timed out)"
    assert [k for k in ("hf_token", "hub_token", "api_key", "aws_secret_access_key", "password", "max_num_batched_tokens",
                        "tensor_parallel_size", "quantization", "tokenizer_mode") if is_credential_key(k)] == \
        ["hf_token", "hub_token", "api_key", "aws_secret_access_key", "password"]


def test_engine_and_trainer_credentials_stay_out_of_records():
    """vLLM's `hf_token` engine option never reaches the index (nor the fingerprint); `--hf-arg hub_token` is
    refused, since HF Trainer pickles its arguments into every checkpoint."""
    from logitcache.stages.precompute.settings import EngineSpec
    from logitcache.stages.train.run import check_hf_args
    from logitcache.storage.errors import ConfigError

    with_token = EngineSpec("hf", options={"hf_token": "hf_x", "max_num_batched_tokens": 4096})
    assert with_token.describe()["options"] == {"max_num_batched_tokens": 4096}
    assert check_hf_args({"logging_first_step": True}, {}) == {"logging_first_step": True}
    with pytest.raises(ConfigError, match="hub_token=...: a credential is not taken here") as e:
        check_hf_args({"hub_token": "hf_secretvalue"}, {})
    assert "hf_secretvalue" not in str(e.value)

"""The engine registry: `--engine NAME` -> the engine's class (or a function that starts one) and one line
for `--help`.

`build_engine`, the CLI's `--engine` choices and its help read it, so a new engine is its module in
`engines/` and one line here. `vllm` is a function that starts one of its two path engines
(`--engine-arg vllm_path=...`). Classes are named as "module:Class" and load on demand (importing vLLM is
slow), and this module imports nothing, so `logitcache --help` stays fast.
"""

__all__ = ["ENGINES", "ENGINE_NAMES"]

ENGINES = {
    "vllm": ("logitcache.stages.precompute.engines.vllm_engine:start_vllm", "vLLM (GPU, or its CPU build)"),
    "hf": ("logitcache.stages.precompute.engines.hf:HFEngine", "transformers (CPU or CUDA)"),
}
ENGINE_NAMES = tuple(ENGINES)

"""The demo's report: one markdown table and two PNG plots from the finished steps' own outputs."""

import json
from pathlib import Path

__all__ = ["write_report"]


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def write_report(out: Path, models: dict[str, str], preset) -> str:
    """Write report.md, report.json, loss_curves.png and topk_mass.png under `out`; return the table."""
    timings = _load(out / "timings.json")
    rows, curves = [], {}
    for label, folder in models.items():
        ev = _load(out / folder / "eval.json")
        data, cache = ev.get("data", {}), ev.get("cache", {})
        train = _load(out / folder / "logitcache_train.json")
        history = train.get("log_history", [])
        curves[label] = {"objective": [(h["step"], h["loss"]) for h in history if "loss" in h],
                         "ce": [(h["step"], h["ce"]) for h in history if "ce" in h]}
        params = _param_count(out / folder)
        n, acc = data.get("positions") or 0, data.get("accuracy")
        rows.append({"model": label, "params": params, "perplexity": data.get("perplexity"), "positions": n,
                     "accuracy": acc, "accuracy_se": (acc * (1 - acc) / n) ** 0.5 if n and acc is not None else None, "agreement": cache.get("teacher_agreement"),
                     "ece": data.get("ece"), "train_s": timings.get("teacher (sft)" if label == "teacher" else label)})
    lines = ["| model | params | held-out ppl | next-token acc (± s.e.) | top-1 agreement w/ teacher | ECE | train wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {_fmt(r['perplexity'], '.2f')} | {_fmt(r['accuracy'])} ± {_fmt(r['accuracy_se'])} | "
                     f"{_fmt(r['agreement'])} | {_fmt(r['ece'])} | {_fmt(r['train_s'], '.0f')} |")
    table = "\n".join(lines)
    caches = []
    for name in ("cache_topk", "cache_sample", "cache_heldout"):
        index = _load(out / name / "index.json")
        if index:
            nbytes = sum(e["bytes"] for e in index["shards"])
            sp = index["sparsification"]
            caches.append(f"| {name} | {index['engine'].get('name')} | {sp['mode']} K/N={sp.get('k')} | "
                          f"{index['counts']['positions']} | {nbytes:,} | {nbytes / max(index['counts']['positions'], 1):.1f} | "
                          f"{_fmt(timings.get({'cache_topk': 'cache top-K (vllm)', 'cache_sample': 'cache sample (vllm)', 'cache_heldout': 'cache held-out (hf)'}[name]), '.0f')} |")
    cache_table = "\n".join(["| cache | engine | mode | positions | bytes | bytes/position | wall s |",
                             "|---|---|---|---|---|---|---|", *caches])
    _plot_curves(curves, out / "loss_curves.png")
    _plot_mass(out / "cache_topk", out / "topk_mass.png")
    note = ("Perplexity and accuracy are per token of each model's own tokenizer over the held-out responses; "
            "the uld student tokenizes differently, so its numbers compare with the others only loosely, and "
            "top-1 agreement needs the teacher's tokenizer (–). Every other student starts from the same weights "
            "and sees the same batches; only the loss differs. s.e. is the binomial standard error over the held-out "
            "positions, so differences smaller than about twice it are noise.")
    md = (f"# logitcache demo report ({'quick' if preset.max_train < 5000 else 'full'})\n\n"
          f"Corpus: Python standard library, function signature -> docstring, split by file.\n\n"
          f"## Models (held-out)\n\n{table}\n\n{note}\n\n## Caches\n\n{cache_table}\n\n"
          f"![loss curves](loss_curves.png)\n\n![top-K mass](topk_mass.png)\n\n"
          f"## Step wall times (s)\n\n" + "\n".join(f"- {k}: {v:.1f}" for k, v in timings.items()) + "\n")
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps({"models": rows, "timings": timings}, indent=1))
    return table + "\n\n" + cache_table


def _param_count(folder: Path) -> int:
    cfg = _load(folder / "config.json")
    if not cfg:
        return 0
    h, v, n, i = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return v * h * (1 if cfg.get("tie_word_embeddings") else 2) + n * per_layer + h


def _plot_curves(curves: dict, path: Path) -> None:
    """Left: each run's own objective (scales differ by loss). Right: cross entropy on the labels, comparable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for key, ax, title in (("objective", axes[0], "training objective (each loss's own scale)"),
                           ("ce", axes[1], "cross entropy on the labels (nats/token)")):
        for label, parts in curves.items():
            if parts[key]:
                ax.plot(*zip(*parts[key]), label=label)
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=10)
    axes[1].legend(fontsize=8)
    axes[1].annotate("uld's student has its own tokenizer", xy=(0.02, 0.02), xycoords="axes fraction", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_mass(cache_dir: Path, path: Path) -> None:
    from logitcache.pipeline.commands.inspect import plot_mass, summarize
    from logitcache.storage import open_cache

    if (cache_dir / "index.json").exists():
        cache = open_cache(str(cache_dir))
        _, mass = summarize(cache)
        plot_mass(mass, cache.k, str(path))

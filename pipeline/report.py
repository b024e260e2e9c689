"""The demo's report: markdown tables and a PNG plot of the training curves from the finished steps' own
outputs (the top-K mass histogram is `logitcache inspect --plot`'s, the mass figures its `--json`).

Paired differences: the same-tokenizer models are evaluated on the same held-out positions in the same
order (`logitcache eval --positions`), so the difference of two models is the mean of per-position
differences d_i, with standard error std(d_i) / sqrt(n). Most of each model's own binomial s.e.
is the positions' difficulty, which both share, so the paired s.e. is much smaller.
"""

import json
from pathlib import Path

import numpy as np

__all__ = ["write_report", "paired_difference", "PAIRS"]

# (model, baseline) rows of the paired table: cached against online BiLD first, then each KD student against SFT.
PAIRS = (("student bild", "student bild online"), ("student kl", "student sft"), ("student bild", "student sft"),
         ("student bild online", "student sft"), ("student rskd", "student sft"),
         ("student sft + lora bild", "student sft"))
# Each cache folder the demo may write, and the name of the step that wrote it (its wall time).
CACHES = {"cache_topk": "cache top-K (vllm)", "cache_sample": "cache sample (vllm)",
          "cache_heldout": "cache held-out (hf)", "cache_topk_parquet": "convert top-K to parquet"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of a - b over the same positions; (n,) arrays of one length."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired difference needs two arrays of one length >= 2, got {len(a)} and {len(b)}")
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def _paired_table(out: Path, models: dict[str, str]) -> tuple[str, list[dict]]:
    """Paired differences (model - baseline) in accuracy, nll and top-1 agreement on the same positions."""
    loaded = {}
    for label, folder in models.items():
        path = out / folder / "positions.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                loaded[label] = dict(z)
    rows, lines = [], ["| model − baseline | Δ accuracy ± s.e. | Δ nll ± s.e. (nats) | Δ agreement w/ teacher ± s.e. | positions |",
                       "|---|---|---|---|---|"]
    for a, b in PAIRS:
        if a not in loaded or b not in loaded or len(loaded[a]["data_correct"]) != len(loaded[b]["data_correct"]):
            continue
        row = {"model": a, "baseline": b, "positions": int(len(loaded[a]["data_correct"]))}
        for key, name in (("data_correct", "accuracy"), ("data_nll", "nll"), ("cache_agree", "agreement")):
            if key in loaded[a] and key in loaded[b]:
                row[name], row[name + "_se"] = paired_difference(loaded[a][key], loaded[b][key])
        rows.append(row)
        cells = [f"{row[n]:+.4f} ± {row[n + '_se']:.4f}" if n in row else "–" for n in ("accuracy", "nll", "agreement")]
        lines.append(f"| {a} − {b} | {' | '.join(cells)} | {row['positions']} |")
    return "\n".join(lines), rows


def _mass(out: Path, cache: str) -> dict | None:
    """The teacher's top-K mass per position in a cache: quantiles and mean, from its `inspect --json`."""
    summary = _load(out / f"inspect_{cache}.json")
    return {"k": summary["top_k"], **summary["topk_mass"]} if summary else None


def write_report(out: Path, models: dict[str, str], preset) -> str:
    """Write report.md, report.json and loss_curves.png under `out`; return the tables."""
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
    paired, paired_rows = _paired_table(out, models)
    masses = {name: _mass(out, name) for name in ("cache_topk", "cache_heldout")}
    held = masses["cache_heldout"] or masses["cache_topk"]
    mass_line = (f"Teacher's top-{held['k']} mass per held-out position: median {held['p50']:.3f}, 10th percentile "
                 f"{held['p10']:.3f}, mean {held['mean']:.3f}." if held else "")
    caches = []
    for name, step in CACHES.items():
        index = _load(out / name / "index.json")
        if index:
            nbytes = sum(e["bytes"] for e in index["shards"])
            sp = index["sparsification"]
            mass = masses.get(name)
            mass_cell = f"{mass['p50']:.3f} ({mass['p10']:.3f})" if mass and sp["mode"] == "topk" else "–"
            caches.append(f"| {name} | {index['engine'].get('name')} | {sp['mode']} K/N={sp.get('k')} | {mass_cell} | "
                          f"{index['counts']['positions']} | {nbytes:,} | {nbytes / max(index['counts']['positions'], 1):.1f} | "
                          f"{_fmt(timings.get(step), '.0f')} |")
    cache_table = "\n".join(["| cache | engine | mode | top-K mass median (p10) | positions | bytes | bytes/position | wall s |",
                             "|---|---|---|---|---|---|---|---|", *caches])
    validated = (out / "validate_topk.txt").read_text().strip() if (out / "validate_topk.txt").exists() else "–"
    cache_note = (f"`logitcache validate cache_topk`: {validated}. cache_topk_parquet is `logitcache convert "
                  f"cache_topk ... --backend parquet` (lossless: the same targets in the other backend); the "
                  f"LoRA student trains from it. The histogram is `logitcache inspect cache_topk --plot`'s.")
    _plot_curves(curves, out / "loss_curves.png")
    note = ("Perplexity and accuracy are per token of each model's own tokenizer over the held-out responses; "
            "the uld student tokenizes differently, so its numbers compare with the others only loosely, and "
            "top-1 agreement needs the teacher's tokenizer (–). Every other student starts from the same weights "
            "and sees the same batches; only the loss differs (student bild online: the same loss and batches as "
            "student bild, on the teacher's full logits computed in the loop instead of the top-K cache; student "
            "sft + lora bild: the sft student tuned further with bild through rank-8 LoRA adapters on packed rows, "
            "so it has trained twice as many steps). s.e. is "
            "the binomial standard error over the held-out positions; the paired table below compares two models "
            "position by position, which removes the positions' shared difficulty from the error.")
    paired_note = ("Differences over the same held-out positions (mean of per-position differences ± its standard "
                   "error); a difference within about twice its s.e. is noise. Accuracy and agreement are per "
                   "position 0/1; nll is lower-is-better.")
    md = (f"# logitcache demo report ({out.name})\n\n"
          f"Corpus: Python standard library, function signature -> {preset.task}, split by file.\n\n"
          f"{mass_line}\n\n"
          f"## Models (held-out)\n\n{table}\n\n{note}\n\n## Paired differences\n\n{paired}\n\n{paired_note}\n\n"
          f"## Caches\n\n{cache_table}\n\n{cache_note}\n\n"
          f"![loss curves](loss_curves.png)\n\n![top-K mass](topk_mass.png)\n\n"
          f"## Step wall times (s)\n\n" + "\n".join(f"- {k}: {v:.1f}" for k, v in timings.items()) + "\n")
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps({"models": rows, "paired": paired_rows, "topk_mass": masses,
                                                 "timings": timings}, indent=1))
    return "\n\n".join((mass_line, table, paired, cache_table))


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
    colors = dict(zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))  # one color per run, both panels
    for key, ax, title in (("objective", axes[0], "training objective (each loss's own scale)"),
                           ("ce", axes[1], "cross entropy on the labels (nats/token)")):
        for label, parts in curves.items():
            if parts[key]:
                ax.plot(*zip(*parts[key]), label=label, color=colors[label])
        ax.set_xscale("log")  # the teacher trains several times longer: linear steps squeeze every student left
        ax.set_xlabel("optimizer step (log scale)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[1].annotate("uld's student has its own tokenizer", xy=(0.02, 0.02), xycoords="axes fraction", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

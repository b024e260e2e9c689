"""Tokenizer identity: stage one records it in the index, stage two compares a student's tokenizer with it.

Compatibility means the same ids mean the same tokens (`compare_tokenizers`): every id the cache can
hold maps to the same token string for the student. A different chat template, special-tokens map
or added tokens beyond the cached ids are differences to report, not refusals (a Qwen2.5 base
student reads a Qwen2.5-Instruct cache correctly). The fingerprint stays as provenance.
"""

import hashlib
import json

__all__ = ["tokenizer_fingerprint", "tokenizer_identity", "compare_tokenizers", "VOCAB_BLOCK", "weights_digest"]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides token ids: vocab, merges, normalization and special tokens, chat template.

    Works with any Hugging Face tokenizer; a fast tokenizer's full `tokenizer.json` covers vocab,
    merges, pre-tokenizer and added tokens in one string.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime settings, not identity
        spec.pop("padding", None)
        core = json.dumps(spec, sort_keys=True)
    else:
        core = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256((core + json.dumps(extra, sort_keys=True)).encode()).hexdigest()


# --- what "the same ids mean the same tokens" is checked against ------------------------------------

VOCAB_BLOCK = 1024  # ids per block hash: 149 hashes (2.4 kB of index) for a 151,936-id vocabulary
_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _id_to_token(tokenizer) -> dict[int, str]:
    return {i: t for t, i in tokenizer.get_vocab().items()}


def _block_hashes(id_to_token: dict[int, str], n: int) -> list[str]:
    out = []
    for lo in range(0, n, VOCAB_BLOCK):
        h = hashlib.sha256()
        for i in range(lo, min(lo + VOCAB_BLOCK, n)):
            h.update(f"{i}\t{id_to_token.get(i, '')}\n".encode())
        out.append(h.hexdigest()[:16])
    return out


def tokenizer_identity(tokenizer) -> dict:
    """The index's `tokenizer` section (without `logits_width`): what a student's tokenizer is compared with.

    Returns:
        fingerprint: `tokenizer_fingerprint` (provenance: any difference, template included, changes it).
        vocab_size: ids the tokenizer produces (`len(tokenizer)`).
        vocab_blocks: sha256[:16] of "id<TAB>token" lines per block of `VOCAB_BLOCK` ids, so that a reader
            without the teacher's tokenizer finds which ids mean other tokens.
        added_tokens: {id: token} of the added tokens (special and not), e.g. Qwen's <|im_end|>.
        special_tokens: {"eos_token": [id, token], ...} for bos/eos/pad/unk (None when unset).
        chat_template_sha256: sha256 of the chat template, or None.
        bos_token_id, eos_token_id: as before, for readers of the older fields.
    """
    n = len(tokenizer)
    added = {str(i): str(t) for i, t in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())}
    return {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": n,
            "vocab_blocks": _block_hashes(_id_to_token(tokenizer), n), "added_tokens": added,
            "special_tokens": _special_tokens(tokenizer), "chat_template_sha256": _template_sha256(tokenizer),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def _special_tokens(tokenizer) -> dict:
    out = {}
    for name in _SPECIALS:
        token = getattr(tokenizer, name, None)
        out[name] = None if token is None else [tokenizer.convert_tokens_to_ids(str(token)), str(token)]
    return out


def _template_sha256(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def compare_tokenizers(cached: dict, tokenizer, *, teacher_tokenizer=None) -> tuple[list[str], list[str]]:
    """Does `tokenizer` read the cached ids as the same tokens? Returns (conflicts, differences).

    Args:
        cached: the cache's `tokenizer` section (`tokenizer_identity` of the teacher's tokenizer).
        tokenizer: the student's tokenizer.
        teacher_tokenizer: the teacher's tokenizer when it can be loaded; then conflicts name exact ids.

    Returns:
        conflicts: why cached ids would mean other tokens to the student (empty: compatible), each
            naming the first differing ids. differences: harmless differences to warn about (chat
            template, special-tokens map, added tokens beyond the cached ids).
    """
    conflicts, differences = [], []
    n = int(cached["vocab_size"])
    mine = _id_to_token(tokenizer)
    if len(tokenizer) < n:
        conflicts.append(f"the student's tokenizer has {len(tokenizer)} ids, the cache's {n}: ids "
                         f"{len(tokenizer)}..{n - 1} (e.g. {cached.get('added_tokens', {}).get(str(len(tokenizer)))!r}) "
                         f"have no student token")
    if teacher_tokenizer is not None:
        theirs = _id_to_token(teacher_tokenizer)
        wrong = [i for i in range(min(n, len(tokenizer))) if mine.get(i) != theirs.get(i)]
        if wrong:
            shown = ", ".join(f"id {i}: cache {theirs.get(i)!r} vs student {mine.get(i)!r}" for i in wrong[:3])
            conflicts.append(f"{len(wrong)} cached ids mean other tokens to the student ({shown}"
                             f"{', ...' if len(wrong) > 3 else ''})")
    elif "vocab_blocks" in cached:
        for b, (want, got) in enumerate(zip(cached["vocab_blocks"], _block_hashes(mine, n))):
            if want != got:
                lo, hi = b * VOCAB_BLOCK, min((b + 1) * VOCAB_BLOCK, n) - 1
                conflicts.append(f"cached ids {lo}..{hi} do not all mean the same tokens to the student (first "
                                 f"differing block of {VOCAB_BLOCK} ids; the student has e.g. id {lo} = {mine.get(lo)!r})")
                break
        for i, token in cached.get("added_tokens", {}).items():
            if int(i) < len(tokenizer) and mine.get(int(i)) != token:
                conflicts.append(f"cached id {i} is {token!r} in the cache and {mine.get(int(i))!r} for the student")
                break
    else:  # an index written before the vocabulary was recorded: only the fingerprint can say
        if cached.get("fingerprint") != tokenizer_fingerprint(tokenizer):
            conflicts.append("the cache records only a tokenizer fingerprint, and the student's differs")
        return conflicts, differences
    extra = {i: t for i, t in mine.items() if i >= n}
    if extra:
        shown = ", ".join(repr(extra[i]) for i in sorted(extra)[:4])
        differences.append(f"the student has {len(extra)} token(s) beyond the cache's {n} ids ({shown}"
                           f"{', ...' if len(extra) > 4 else ''}); the teacher never predicts them")
    if _template_sha256(tokenizer) != cached.get("chat_template_sha256"):
        differences.append("the chat template differs from the teacher's (e.g. a base student and an instruct "
                           "teacher); ids are the same, so distillation reads the cache as written")
    theirs_sp, mine_sp = cached.get("special_tokens") or {}, _special_tokens(tokenizer)
    for name in _SPECIALS:
        if name in theirs_sp and theirs_sp.get(name) != mine_sp.get(name):
            differences.append(f"{name}: cache {theirs_sp.get(name)} vs student {mine_sp.get(name)}")
    return conflicts, differences


# Weight files whose digest joins the teacher's identity, and how much of each is read.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_BLOCKS, _BLOCK = 64, 4096


def weights_digest(folder: str) -> str | None:
    """A cheap, stable digest of the weight files in a model folder (None: there are none).

    Per file, in name order: its name and size, a safetensors file's header (names, dtypes, shapes,
    offsets), and `_BLOCKS` blocks of `_BLOCK` bytes at evenly spaced offsets (at most 256 KiB read a
    file). Changed weights under the same path change it unless every difference falls between the
    sampled blocks with the sizes and header unchanged; a fine-tuned or re-quantized model changes
    nearly every block.
    """
    import os

    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(WEIGHT_SUFFIXES))
    except OSError:
        return None
    if not names:
        return None
    h = hashlib.sha256()
    for name in names:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        h.update(f"{name}\0{size}\n".encode())
        with open(path, "rb") as f:
            if name.endswith(".safetensors") and size >= 8:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 << 20)))
            for i in range(_BLOCKS):
                f.seek(size * i // _BLOCKS)
                h.update(f.read(_BLOCK))
    return h.hexdigest()

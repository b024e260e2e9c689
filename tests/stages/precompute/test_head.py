"""The standalone LM head against each model's own forward logits.

    .venv/bin/pytest tests/stages/precompute/test_head.py        # ~10 s

Families whose logits are scaled or capped (Gemma 2 softcapping, Cohere `logit_scale`, Granite
`logits_scaling`, MiniCPM3's hidden-side scaling) are built tiny from their transformers
configs, with the head's weights enlarged so the transform changes the logits a lot: a head
that ignored it would fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from logitcache.pipeline.scratch import make_tiny_llama, toy_corpus, train_tokenizer
from logitcache.storage.head import (
    LMHead,
    head_from_checkpoint,
    head_from_model,
    logit_transform,
    verify_head,
)
from logitcache.storage.errors import ConfigError

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, head_dim=32)


def _family(name: str):
    import transformers as tf

    if name == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**SMALL, final_logit_softcapping=3.0))
    if name == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(**SMALL, logit_scale=0.125))
    if name == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**SMALL, logits_scaling=8.0))
    if name == "minicpm3":
        cfg = tf.MiniCPM3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16,
                                qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, dim_model_base=16)
        return tf.MiniCPM3ForCausalLM(cfg)
    raise ValueError(name)


def _logits_and_hidden(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float(), model.base_model(input_ids=ids).last_hidden_state[0]


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "minicpm3"])
def test_head_reproduces_scaled_and_capped_logits(family):
    torch.manual_seed(0)
    model = _family(family).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50.0)  # logits of tens: the transform matters
    ids = torch.randint(0, 300, (1, 12))
    own, hidden = _logits_and_hidden(model, ids)
    head = head_from_model(model)
    torch.testing.assert_close(head(hidden).float(), own, rtol=1e-5, atol=1e-4)
    plain = LMHead(weight=head.weight, bias=head.bias)
    assert (plain(hidden).float() - own).abs().max() > 1.0, "the transform should matter in this test"
    verify_head(model, head, ids)
    with pytest.raises(ConfigError, match="differs from the model's own logits"):
        verify_head(model, plain, ids)


def test_logit_transform_fields():
    from transformers import Gemma2Config, GraniteConfig, LlamaConfig

    assert logit_transform(LlamaConfig()) == {"hidden_scale": 1.0, "logit_scale": 1.0, "softcap": None}
    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0))["softcap"] == 30.0
    assert logit_transform(GraniteConfig(logits_scaling=4.0))["logit_scale"] == 0.25


def test_ambiguous_logits_scaling_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.logits_scaling = 2.0  # a family head.py does not know: multiply or divide?
    with pytest.raises(ConfigError, match="logits_scaling"):
        logit_transform(config)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(toy_corpus(100), 400, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("tied", [False, True])
def test_llama_head_tied_untied_padded(tmp_path, tokenizer, tied):
    from transformers import AutoModelForCausalLM

    make_tiny_llama(tmp_path, tokenizer, hidden_size=128, num_heads=2, tie_word_embeddings=tied, pad_vocab_to=512)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings == tied and len(tokenizer) < 512
    ids = torch.tensor([tokenizer.encode(toy_corpus(1, seed=5)[0])])
    own, hidden = _logits_and_hidden(model, ids)
    head = head_from_model(model)
    assert head.width == 512  # the padded width, not the tokenizer's
    torch.testing.assert_close(head(hidden), own, rtol=1e-5, atol=1e-5)

    # What the vLLM pooling path loads: the head's tensor alone, found under its tied name.
    loaded = head_from_checkpoint(str(tmp_path), dtype=torch.float32)
    assert torch.equal(loaded.weight, head.weight)
    assert dataclasses.replace(loaded, weight=head.weight) == dataclasses.replace(head, weight=head.weight)


def test_checkpoint_without_safetensors_is_a_config_error(tmp_path, tokenizer):
    make_tiny_llama(tmp_path, tokenizer, hidden_size=128, num_heads=2)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="safetensors"):
        head_from_checkpoint(str(tmp_path))

"""The decoder alone against transformers: chunked prefill over a paged cache, every family
switch, including a sliding window that actually binds."""

from __future__ import annotations

import pytest
import torch

from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.torch_ref import REFERENCE
from livelm.daemon.model.config import ModelConfig
from livelm.daemon.model.decoder import LlamaDecoder

SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             num_hidden_layers=2, vocab_size=300, max_position_embeddings=512, head_dim=16)
BLOCK, BLOCKS = 8, 12


def _hf(family: str):
    import transformers

    extra = {
        "llama": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
        "mistral": {"sliding_window": 20},
        "qwen2": {"tie_word_embeddings": True},
        "qwen3": {},
    }[family]
    config = transformers.AutoConfig.for_model(family, **SHAPE, **extra, initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_chunked_paged_prefill_matches_transformers(family: str) -> None:
    hf = _hf(family)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    decoder = LlamaDecoder(config, REFERENCE, torch.float32, torch.device("cpu"))
    decoder.load_weights(hf.state_dict().items())
    ids = torch.randint(0, SHAPE["vocab_size"], (70,))
    # blocks handed out in a scrambled order, as a real pool would
    table = torch.randperm(BLOCKS).to(torch.int32)
    cache = [(torch.zeros(BLOCKS, BLOCK, 2, 16), torch.zeros(BLOCKS, BLOCK, 2, 16)) for _ in range(2)]
    logits = []
    with torch.inference_mode():
        for lo, hi in ((0, 29), (29, 30), (30, 70)):
            pos = torch.arange(lo, hi)
            slots = table[pos // BLOCK].long() * BLOCK + pos % BLOCK
            meta = AttentionMeta(slots, torch.tensor([0, hi - lo]), torch.tensor([hi]), table[None],
                                 [0, hi - lo], [hi], hi - lo == 1)
            logits.append(decoder.logits(decoder(ids[lo:hi], pos, meta, cache)))
        ref = hf(ids[None]).logits[0]
    ours = torch.cat(logits)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))

"""The start-up warm-up: which step shapes it runs, and that it touches only the scratch block."""

from __future__ import annotations

import torch

from livelm.daemon.engine.block_pool import SCRATCH_BLOCK
from livelm.daemon.engine.kv_cache import KVCache
from livelm.daemon.engine.warmup import SHORT_CHUNKS, warm_up, warm_up_plan
from livelm.daemon.kernels.torch_ref import REFERENCE
from livelm.daemon.model.config import ModelConfig
from livelm.daemon.model.decoder import LlamaDecoder
from tests.tiny_models import TINY_LAYERS

HF_SHAPE = {**TINY_LAYERS, "vocab_size": 300, "max_position_embeddings": 1024}


def test_plan_stays_inside_the_limits_and_covers_every_class() -> None:
    plan = warm_up_plan(max_batch_tokens=512, max_context=5000)
    assert all(length <= 512 and ctx + length <= 5000 for _, length, ctx in plan)
    contexts = {ctx for _, _, ctx in plan}
    assert {0, 256, 512, 1024, 2048, 4096} <= contexts  # every doubling below the limit
    assert 5000 - max(SHORT_CHUNKS) in contexts  # short chunks over the longest context
    assert {(1, n, 0) for n in SHORT_CHUNKS} <= set(plan)
    assert (1, 512, 0) in plan and (1, 512, 5000 - 512) in plan
    assert any(seqs > 1 and length == 1 for seqs, length, _ in plan)  # a decode batch


def test_plan_for_a_small_context_drops_what_cannot_fit() -> None:
    plan = warm_up_plan(max_batch_tokens=4096, max_context=40)
    assert plan and all(ctx + length <= 40 for _, length, ctx in plan)
    assert all(length in SHORT_CHUNKS for _, length, _ in plan)


def test_warm_up_writes_only_the_scratch_block() -> None:
    import transformers

    hf_config = transformers.LlamaConfig(**HF_SHAPE)
    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    torch.manual_seed(0)
    decoder = LlamaDecoder(config, REFERENCE, torch.float32, torch.device("cpu"))
    model = transformers.LlamaForCausalLM(hf_config)
    decoder.load_weights(model.state_dict().items())
    cache = KVCache(config, num_blocks=8, block_size=16, dtype=torch.float32, device=torch.device("cpu"))
    cache.storage.normal_()
    before = cache.storage.clone()

    steps = warm_up(decoder, cache, max_batch_tokens=64, max_context=100, progress=False)

    assert steps == len(warm_up_plan(64, 100))
    others = [b for b in range(cache.num_blocks) if b != SCRATCH_BLOCK]
    assert torch.equal(cache.storage[:, :, others], before[:, :, others])
    assert not torch.equal(cache.storage[:, :, SCRATCH_BLOCK], before[:, :, SCRATCH_BLOCK])

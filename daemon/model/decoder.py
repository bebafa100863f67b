"""One decoder for the Llama family (Llama 2/3.x, Mistral, Qwen2, Qwen3), switched by config.

It runs a flattened batch of tokens from many sequences, reading and writing a paged KV
cache, and calls every hot operation through the kernels bound at startup.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.ops import Kernels
from livelm.daemon.model.config import ModelConfig
from livelm.daemon.model.rope import cos_sin_table
from livelm.protocol.errors import ModelLoadError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [blocks, block_size, Hk, D] x2


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.qkv_weight = _param((c.q_size + 2 * c.kv_size, c.hidden_size), dtype, device)
        self.qkv_bias = (
            _param((c.q_size + 2 * c.kv_size,), dtype, device) if c.attention_bias else None
        )
        self.o_weight = _param((c.hidden_size, c.q_size), dtype, device)
        self.q_norm = _param((c.head_dim,), dtype, device) if c.qk_norm else None
        self.k_norm = _param((c.head_dim,), dtype, device) if c.qk_norm else None
        self.gate_up_weight = _param((2 * c.intermediate_size, c.hidden_size), dtype, device)
        self.down_weight = _param((c.hidden_size, c.intermediate_size), dtype, device)
        self.input_norm = _param((c.hidden_size,), dtype, device)
        self.post_norm = _param((c.hidden_size,), dtype, device)


# HF tensor name suffix -> (our parameter, row slice index within a fused weight or None)
_LAYER_NAMES = {
    "self_attn.q_proj.weight": ("qkv_weight", 0),
    "self_attn.k_proj.weight": ("qkv_weight", 1),
    "self_attn.v_proj.weight": ("qkv_weight", 2),
    "self_attn.q_proj.bias": ("qkv_bias", 0),
    "self_attn.k_proj.bias": ("qkv_bias", 1),
    "self_attn.v_proj.bias": ("qkv_bias", 2),
    "self_attn.o_proj.weight": ("o_weight", None),
    "self_attn.q_norm.weight": ("q_norm", None),
    "self_attn.k_norm.weight": ("k_norm", None),
    "mlp.gate_proj.weight": ("gate_up_weight", 0),
    "mlp.up_proj.weight": ("gate_up_weight", 1),
    "mlp.down_proj.weight": ("down_weight", None),
    "input_layernorm.weight": ("input_norm", None),
    "post_attention_layernorm.weight": ("post_norm", None),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class LlamaDecoder(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        kernels: Kernels,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int | None = None,
    ) -> None:
        super().__init__()
        c = config
        self.config = c
        self.kernels = kernels
        self.dtype = dtype
        self.device = device
        self.embed = _param((c.vocab_size, c.hidden_size), dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(c, dtype, device) for _ in range(c.num_layers))
        self.norm = _param((c.hidden_size,), dtype, device)
        self.lm_head = (
            None if c.tie_word_embeddings else _param((c.vocab_size, c.hidden_size), dtype, device)
        )
        self.max_positions = max_positions or c.max_position_embeddings
        self.cos_sin = cos_sin_table(c, self.max_positions, device)
        self.scale = c.head_dim**-0.5
        self._split = (c.q_size, c.kv_size, c.kv_size)

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in; every parameter must be covered exactly once."""
        expected = self._expected_names()
        seen: set[str] = set()
        with torch.no_grad():
            for name, tensor in weights:
                if _IGNORED.search(name) or (name == "lm_head.weight" and self.lm_head is None):
                    continue
                if name not in expected:
                    raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint")
                if name in seen:
                    raise ModelLoadError(f"tensor {name!r} appears twice in checkpoint")
                self._target(name).copy_(self._checked(name, tensor))
                seen.add(name)
        missing = sorted(expected - seen)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors: {shown}")

    def init_random(self, seed: int, std: float = 0.02) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1 and "bias" not in name:
                    p.fill_(1.0)  # norm weights
                else:
                    p.normal_(0.0, std, generator=gen)

    def _expected_names(self) -> set[str]:
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if self.lm_head is not None:
            names.add("lm_head.weight")
        for i, layer in enumerate(self.layers):
            for suffix, (attr, _) in _LAYER_NAMES.items():
                if getattr(layer, attr) is not None:
                    names.add(f"model.layers.{i}.{suffix}")
        return names

    def _target(self, name: str) -> torch.Tensor:
        if name == "model.embed_tokens.weight":
            return self.embed
        if name == "model.norm.weight":
            return self.norm
        if name == "lm_head.weight":
            return self.lm_head
        match = _LAYER_RE.match(name)
        attr, part = _LAYER_NAMES[match.group(2)]
        param = getattr(self.layers[int(match.group(1))], attr)
        if part is None:
            return param
        sizes = self._split if attr.startswith("qkv") else (self.config.intermediate_size,) * 2
        return param.split(sizes, dim=0)[part]

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        target = self._target(name)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        return tensor.to(device=target.device, dtype=target.dtype)

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMeta,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """Runs the flattened batch; returns final-normed hidden states [N, hidden]."""
        k, c = self.kernels, self.config
        h = F.embedding(input_ids, self.embed)
        residual = h
        x = k.rms_norm(h, self.layers[0].input_norm, c.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            if i > 0:
                x, residual = k.add_rms_norm(h, residual, layer.input_norm, c.rms_norm_eps)
            h = self._attention(layer, x, positions, meta, kv_cache[i])
            x, residual = k.add_rms_norm(h, residual, layer.post_norm, c.rms_norm_eps)
            h = k.swiglu_linear(k.linear(x, layer.gate_up_weight), layer.down_weight)
        out, _ = k.add_rms_norm(h, residual, self.norm, c.rms_norm_eps)
        return out

    def _attention(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMeta,
        cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        c, k = self.config, self.kernels
        n = x.shape[0]
        q, key, value = k.linear(x, layer.qkv_weight, layer.qkv_bias).split(self._split, dim=-1)
        q = q.view(n, c.num_heads, c.head_dim)
        key = key.view(n, c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None:
            q = k.rms_norm(q, layer.q_norm, c.rms_norm_eps)
            key = k.rms_norm(key, layer.k_norm, c.rms_norm_eps)
        k_cache, v_cache = cache
        value = value.view(n, c.num_kv_heads, c.head_dim)
        q = k.rope_store_kv(
            q, key, value, positions, self.cos_sin, k_cache, v_cache, meta.slot_mapping
        )
        attend = k.decode_attention if meta.decode_only else k.prefill_attention
        out = attend(q, k_cache, v_cache, meta, self.scale, c.sliding_window)
        return k.linear(out.reshape(n, c.q_size), layer.o_weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed if self.lm_head is None else self.lm_head
        return F.linear(hidden, head)

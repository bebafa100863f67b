"""The kernel dispatcher on the CPU: candidates, the numerical check, the policy, tuning's cache.

Nothing of ours is mocked: the real backends are gathered and the real check runs. Wrong kernels
are test-local candidates passed in through ``ResolveOptions.extra_candidates``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from livelm.daemon.cli import main as cli_main
from livelm.daemon.engine.engine import _check_capturable
from livelm.daemon.kernels import torch_backend, torch_ref
from livelm.daemon.kernels.attention_meta import AttentionMeta
from livelm.daemon.kernels.candidates import Candidate, Target
from livelm.daemon.kernels.dispatcher import (
    BACKEND_SOURCES,
    Binding,
    KernelResolutionError,
    LockedKernelRefused,
    NoKernelAvailable,
    ResolveOptions,
    resolve_kernels,
    target_for,
)
from livelm.daemon.kernels.ops import OPERATIONS
from livelm.daemon.kernels.policy import Policy, load_policy, parse_policy
from livelm.daemon.kernels.tuning import cache_key, cache_path
from livelm.daemon.model.presets import preset_config
from livelm.protocol.errors import ConfigError

CPU = torch.device("cpu")
TORCH_ONLY = BACKEND_SOURCES[:1]  # the quick sources, for tests about the policy and choice


def tiny(dtype: torch.dtype = torch.float32, **changes: object) -> Target:
    return dataclasses.replace(target_for(preset_config("random:tiny"), CPU, dtype, 16), **changes)


def resolve(policy: Policy | None = None, target: Target | None = None, **options: object) -> Binding:
    options.setdefault("sources", TORCH_ONLY)
    return resolve_kernels(target or tiny(), policy, ResolveOptions(**options))


def rows(binding: Binding | KernelResolutionError, op: str) -> dict[str, object]:
    return {d.candidate: d for d in binding.table if d.operation == op}


def any_target(_: Target) -> str | None:
    return None


def attention(name: str, fn: Callable, op: str = "prefill_attention") -> Candidate:
    return Candidate(op, "test", name, fn, any_target, False)


# --- kernels that are wrong in the ways real ones are -------------------------------------------


def garbage_attention(q: torch.Tensor, *_: object) -> torch.Tensor:
    return torch.randn_like(q)


def top_left_causal(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
    scale: float, sliding_window: int | None,
) -> torch.Tensor:  # fmt: skip
    """Aligns the causal mask to the first key, not the last: wrong for chunks over a context."""
    out = torch.empty_like(q)
    starts = meta.query_starts_list
    for b, ctx in enumerate(meta.context_lens_list):
        k = torch_backend.gather(k_cache, meta.block_tables[b], ctx).transpose(0, 1)[None]
        v = torch_backend.gather(v_cache, meta.block_tables[b], ctx).transpose(0, 1)[None]
        qb = q[starts[b] : starts[b + 1]].transpose(0, 1)[None]
        res = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
        out[starts[b] : starts[b + 1]] = res[0].transpose(0, 1)
    return out


def reads_whole_blocks(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
    scale: float, sliding_window: int | None,
) -> torch.Tensor:  # fmt: skip
    """Right answer, but it multiplies by every slot of the blocks it touches (0 * NaN = NaN)."""
    out = torch_ref.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    touched = k_cache[meta.block_tables[0].long()]
    return out + 0.0 * touched.sum()


def ignores_window(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
    scale: float, sliding_window: int | None,
) -> torch.Tensor:  # fmt: skip
    return torch_ref.paged_attention(q, k_cache, v_cache, meta, scale, None)


def in_place_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x.copy_(torch_ref.rms_norm(x, weight, eps))
    return x


def float32_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch_ref.rms_norm(x.float(), weight.float(), eps)


def always_greedy(logits: torch.Tensor, params: object) -> torch.Tensor:
    return logits.argmax(dim=-1)


def same_as_reference(*args: object) -> torch.Tensor:
    """A correct kernel that is a different function object from the reference's."""
    return torch_ref.paged_attention(*args)


# --- the table and the binding ---------------------------------------------------------------


@pytest.fixture(scope="module")
def full() -> Binding:
    """Every real backend gathered, on the tiny model's shapes."""
    return resolve_kernels(tiny(), None, ResolveOptions(seed=None))


def test_every_operation_has_exactly_one_chosen_candidate(full: Binding) -> None:
    for op in OPERATIONS:
        chosen = [d for d in full.table if d.operation == op and d.chosen]
        assert len(chosen) == 1, (op, chosen)
    assert all(d.reason and d.status in ("chosen", "passed", "refused", "unavailable") for d in full.table)
    assert set(full.chosen()) == set(OPERATIONS)


def test_cpu_binds_the_reference_and_refuses_triton_with_a_reason(full: Binding) -> None:
    assert all(name.startswith("torch_ref.") for name in full.chosen().values()), full.chosen()
    triton = [d for d in full.table if d.backend == "triton"]
    assert triton, "triton appears in the table, as candidates or as an unavailable backend"
    if not os.environ.get("TRITON_INTERPRET"):
        assert all(d.status in ("refused", "unavailable") and d.reason for d in triton)


def test_bound_functions_are_the_candidate_functions_themselves(full: Binding) -> None:
    k = full.kernels
    assert k.rms_norm is torch_ref.rms_norm
    assert k.add_rms_norm is torch_ref.add_rms_norm
    assert k.rope is torch_ref.rope
    assert k.swiglu is torch_ref.swiglu
    assert k.swiglu_linear is torch_ref.swiglu_linear
    assert k.prefill_attention is torch_ref.paged_attention
    assert k.decode_attention is torch_ref.paged_attention
    assert k.sample is torch_ref.sample


def test_bound_function_of_another_candidate_is_that_function() -> None:
    sdpa = next(c for c in torch_backend.candidates() if c.name == "torch_sdpa.paged")
    binding = resolve(Policy(lock={"decode_attention": "torch_sdpa.paged"}))
    assert binding.kernels.decode_attention is sdpa.fn


@pytest.mark.parametrize(
    "label, module", [("flash_attn", "flash_attn"), ("xformers", "xformers"), ("flashinfer", "flashinfer")]
)
def test_missing_optional_backends_are_listed_with_their_reason(full: Binding, label: str, module: str) -> None:
    reasons = full.unavailable()
    if importlib.util.find_spec(module) is not None:
        # installed: it either offers candidates, or says why its compiled parts don't load
        offered = any(d.backend == label and d.operation != "*" for d in full.table)
        assert offered or reasons[label]
        return
    assert module in reasons[label]
    row = next(d for d in full.table if d.candidate == label)
    assert row.operation == "*" and row.status == "unavailable" and not row.chosen


def test_sdpa_and_flex_pass_the_check_with_a_sliding_window() -> None:
    target = tiny(sliding_window=8)
    sources = (BACKEND_SOURCES[0], BACKEND_SOURCES[2])  # torch and flex
    binding = resolve_kernels(target, None, ResolveOptions(sources=sources))
    for op in ("prefill_attention", "decode_attention"):
        for name in ("torch_sdpa.paged", "flex.paged"):
            row = rows(binding, op).get(name)
            if row is None:
                assert "flex" in binding.unavailable()
                continue
            assert row.status == "passed", row.reason


# --- the check -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "candidate, target, expect",
    [
        (attention("test.garbage", garbage_attention), tiny(), "relative error"),
        (attention("test.top_left", top_left_causal), tiny(), "relative error"),
        (attention("test.whole_blocks", reads_whole_blocks), tiny(), "NaN"),
        (attention("test.no_window", ignores_window), tiny(sliding_window=8), "relative error"),
        (attention("test.dec_garbage", garbage_attention, "decode_attention"), tiny(), "relative error"),
        (Candidate("rms_norm", "test", "test.in_place", in_place_rms_norm, any_target), tiny(), "modified its input"),
        (Candidate("rms_norm", "test", "test.fp32", float32_rms_norm, any_target), tiny(torch.bfloat16), "dtype torch.float32"),
        (Candidate("sample", "test", "test.greedy", always_greedy, any_target), tiny(), "always"),
    ],
    ids=["garbage", "top-left-causal", "reads-past-context", "ignores-window", "decode-garbage",
         "in-place", "wrong-dtype", "never-samples"],
)  # fmt: skip
def test_wrong_candidates_are_refused_by_the_check(candidate: Candidate, target: Target, expect: str) -> None:
    # preferred, so only the check can keep it out
    policy = Policy(prefer={candidate.operation: [candidate.name]})
    binding = resolve(policy, target, extra_candidates=(candidate,))
    row = rows(binding, candidate.operation)[candidate.name]
    assert row.status == "refused" and not row.chosen
    assert row.reason.startswith("check failed") and expect in row.reason, row.reason
    assert binding.chosen()[candidate.operation].startswith("torch_ref.")


def test_a_correct_extra_candidate_passes_and_can_be_preferred() -> None:
    good = attention("test.same", same_as_reference)
    binding = resolve(Policy(prefer={"prefill_attention": ["test.*"]}), extra_candidates=(good,))
    assert binding.kernels.prefill_attention is same_as_reference
    assert "prefer list" in rows(binding, "prefill_attention")["test.same"].reason


def test_an_opt_in_candidate_is_bound_only_where_the_policy_names_it() -> None:
    good = dataclasses.replace(attention("test.opt_in", same_as_reference), opt_in=True)
    for policy in (None, Policy(prefer={"prefill_attention": ["test.*"]})):
        row = rows(resolve(policy, extra_candidates=(good,)), "prefill_attention")["test.opt_in"]
        assert row.status == "refused" and "opt-in" in row.reason, row.reason
    for policy in (Policy(prefer={"prefill_attention": ["test.opt_in"]}),
                   Policy(lock={"prefill_attention": "test.opt_in"})):
        binding = resolve(policy, extra_candidates=(good,))
        assert binding.kernels.prefill_attention is same_as_reference


def test_the_binding_names_the_forward_kernels_a_graph_cannot_capture() -> None:
    assert resolve().kernels.graph_unsafe == {"prefill_attention", "decode_attention"}
    capturable = dataclasses.replace(attention("test.capturable", same_as_reference),
                                     graph_safe=True)
    binding = resolve(Policy(prefer={"prefill_attention": ["test.*"]}),
                      extra_candidates=(capturable,))
    assert binding.kernels.graph_unsafe == {"decode_attention"}
    # sampling runs outside the graphs: a host-syncing sampler does not count
    assert binding.chosen()["sample"].startswith("torch_ref.")


def test_cuda_graphs_refuse_a_binding_they_cannot_capture() -> None:
    with pytest.raises(ConfigError, match="decode_attention, prefill_attention.*cuda_graphs"):
        _check_capturable(torch_ref.REFERENCE)
    _check_capturable(dataclasses.replace(torch_ref.REFERENCE, graph_unsafe=frozenset()))


def test_a_locked_wrong_candidate_fails_startup_with_a_typed_error() -> None:
    bad = attention("test.garbage", garbage_attention)
    with pytest.raises(LockedKernelRefused) as caught:
        resolve(Policy(lock={"prefill_attention": "test.garbage"}), extra_candidates=(bad,))
    err = caught.value
    assert isinstance(err, ConfigError)  # the daemon maps it to its configuration exit code
    assert err.operation == "prefill_attention" and err.candidate == "test.garbage"
    assert "test.garbage" in str(err) and "check failed" in str(err)
    assert rows(err, "prefill_attention")["test.garbage"].status == "refused"


def test_a_locked_kernel_nobody_offers_fails_startup() -> None:
    with pytest.raises(LockedKernelRefused, match="no available backend offers it"):
        resolve(Policy(lock={"rms_norm": "nobody.rms_norm"}))


def test_a_locked_unsupported_kernel_fails_startup_with_the_support_reason() -> None:
    unsupported = Candidate("swiglu", "test", "test.gpu_only", torch_ref.swiglu, lambda t: "needs a GPU")
    with pytest.raises(LockedKernelRefused, match="unsupported: needs a GPU"):
        resolve(Policy(lock={"swiglu": "test.gpu_only"}), extra_candidates=(unsupported,))


# --- the policy ------------------------------------------------------------------------------


def test_lock_binds_the_locked_kernel_and_refuses_the_rest() -> None:
    binding = resolve(Policy(lock={"prefill_attention": "torch_sdpa.paged"}))
    table = rows(binding, "prefill_attention")
    assert binding.chosen()["prefill_attention"] == "torch_sdpa.paged"
    assert "is locked by" in table["torch_sdpa.paged"].reason
    assert table["torch_ref.paged_attention"].reason == "policy: prefill_attention is locked to torch_sdpa.paged"


def test_deny_refuses_matching_candidates() -> None:
    binding = resolve(Policy(deny_all=("torch_sdpa",), deny={"rope": ("torch_ref.*",)}), extra_candidates=(
        Candidate("rope", "test", "test.rope", lambda q, k, p, cs: torch_ref.rope(q, k, p, cs), any_target),
    ))  # fmt: skip
    assert rows(binding, "decode_attention")["torch_sdpa.paged"].reason == "policy: denied by 'torch_sdpa'"
    assert rows(binding, "rope")["torch_ref.rope"].reason == "policy: denied by 'torch_ref.*'"
    assert binding.chosen()["rope"] == "test.rope"


def test_allow_keeps_only_the_listed_candidates() -> None:
    binding = resolve(Policy(allow={"decode_attention": ("torch_sdpa*",)}))
    assert binding.chosen()["decode_attention"] == "torch_sdpa.paged"
    reason = rows(binding, "decode_attention")["torch_ref.paged_attention"].reason
    assert reason.startswith("policy: not in the allow list")


def test_prefer_orders_the_choice_and_default_order_follows() -> None:
    binding = resolve(Policy(prefer={"prefill_attention": ["torch_sdpa.paged", "torch_ref"]}))
    assert binding.chosen()["prefill_attention"] == "torch_sdpa.paged"
    assert binding.chosen()["decode_attention"] == "torch_ref.paged_attention"


def test_denying_every_candidate_of_an_operation_fails_startup() -> None:
    with pytest.raises(NoKernelAvailable, match="no kernel for sample"):
        resolve(Policy(deny={"sample": ("*",)}))


def test_policy_file_round_trip(tmp_path: Path) -> None:
    file = tmp_path / "policy.yaml"
    file.write_text(
        "lock: {decode_attention: torch_sdpa.paged}\n"
        "allow: {prefill_attention: [torch_ref, torch_sdpa]}\n"
        "deny: [flex]\n"
        "prefer: {prefill_attention: [torch_sdpa.paged]}\n"
    )
    policy = load_policy(file)
    assert policy.lock == {"decode_attention": "torch_sdpa.paged"}
    assert policy.deny_all == ("flex",)
    binding = resolve(policy)
    assert binding.chosen()["prefill_attention"] == "torch_sdpa.paged"
    assert binding.chosen()["decode_attention"] == "torch_sdpa.paged"
    assert parse_policy(None) == Policy(source="kernel policy")


@pytest.mark.parametrize(
    "data, message",
    [
        (["lock"], "must be a mapping"),
        ({"lokc": {}}, "unknown section 'lokc'; did you mean 'lock'?"),
        ({"lock": {"rmsnorm": "torch_ref.rms_norm"}}, "unknown operation 'rmsnorm'; did you mean 'rms_norm'?"),
        ({"lock": {"rms_norm": 3}}, "lock.rms_norm must be one candidate name"),
        ({"lock": {"rms_norm": "triton.*"}}, "must name one candidate exactly"),
        ({"lock": ["rms_norm"]}, "lock must be a mapping of operation"),
        ({"allow": {"rope": "triton"}}, "allow.rope must be a list"),
        ({"allow": {"rope": []}}, "would refuse every kernel"),
        ({"deny": "triton"}, "deny must be a mapping"),
        ({"deny": [1]}, "deny must be a list"),
        ({"prefer": {"sample": [None]}}, "prefer.sample must be a list"),
        ({"lock": {"rope": "triton.rope"}, "deny": ["triton"]}, "also denied by 'triton'"),
        ({"lock": {"rope": "triton.rope"}, "allow": {"rope": ["torch_ref"]}}, "is not in allow.rope"),
    ],
)
def test_policy_errors_are_clear(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(data, "policy.yaml")
    assert message in str(caught.value) and str(caught.value).startswith("policy.yaml: ")


def test_policy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lock: {rope: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_policy(bad)


# --- tuning and its cache --------------------------------------------------------------------


class FakeTimer:
    """Stands in for CUDA-event timing: fixed milliseconds per candidate, calls recorded."""

    def __init__(self, times: dict[str, float], fail: tuple[str, ...] = ()) -> None:
        self.times, self.fail, self.calls = times, fail, []

    def __call__(self, candidate: Candidate) -> float:
        self.calls.append(candidate.name)
        if candidate.name in self.fail:
            raise RuntimeError("launch failed on the real shapes")
        return self.times.get(candidate.name, 5.0)


def test_tuning_picks_the_fastest_and_the_cache_round_trips(tmp_path: Path) -> None:
    fast = attention("test.fast", same_as_reference, "decode_attention")
    bad = attention("test.garbage", garbage_attention, "decode_attention")
    options = {"tune": True, "cache_dir": tmp_path, "extra_candidates": (fast, bad)}
    first = FakeTimer({"test.fast": 1.0, "torch_sdpa.paged": 2.0})
    binding = resolve(timer=first, **options)
    assert binding.kernels.decode_attention is same_as_reference
    assert "is fastest on the real shapes (1.0000 ms)" in rows(binding, "decode_attention")["test.fast"].reason
    assert "test.garbage" not in first.calls  # refused by the check, never timed
    assert rows(binding, "rms_norm")["torch_ref.rms_norm"].time_ms == 5.0

    file = cache_path(tmp_path, cache_key(tiny(), None))
    saved = json.loads(file.read_text())
    assert saved["key"]["device"] == "cpu" and saved["key"]["torch"] == torch.__version__
    assert saved["timings_ms"]["decode_attention"] == {
        "test.fast": 1.0, "torch_ref.paged_attention": 5.0, "torch_sdpa.paged": 2.0,
    }  # fmt: skip

    second = FakeTimer({})
    again = resolve(timer=second, **options)
    assert second.calls == []  # everything came from the cache
    assert again.chosen() == binding.chosen()
    assert rows(again, "decode_attention")["test.fast"].time_ms == 1.0
    assert "time from the cache" in rows(again, "decode_attention")["test.fast"].reason

    other_shape = FakeTimer({})
    resolve(target=tiny(block_size=32), timer=other_shape, **options)
    assert other_shape.calls  # another key: timed afresh


def test_a_lock_beats_timing_and_a_kernel_failing_its_timing_is_refused(tmp_path: Path) -> None:
    timer = FakeTimer({"torch_sdpa.paged": 0.1}, fail=("torch_ref.swiglu",))
    extra = Candidate("swiglu", "test", "test.swiglu", lambda gu: torch_ref.swiglu(gu), any_target)
    binding = resolve(
        Policy(lock={"prefill_attention": "torch_ref.paged_attention"}),
        tune=True, cache_dir=tmp_path, timer=timer, extra_candidates=(extra,),
    )  # fmt: skip
    assert binding.chosen()["prefill_attention"] == "torch_ref.paged_attention"
    assert binding.chosen()["decode_attention"] == "torch_sdpa.paged"
    row = rows(binding, "swiglu")["torch_ref.swiglu"]
    assert row.status == "refused" and "failed while timed" in row.reason
    assert binding.chosen()["swiglu"] == "test.swiglu"


def test_an_unreadable_cache_is_ignored(tmp_path: Path) -> None:
    file = cache_path(tmp_path, cache_key(tiny(), None))
    file.parent.mkdir(parents=True)
    file.write_text("{not json")
    timer = FakeTimer({})
    resolve(tune=True, cache_dir=tmp_path, timer=timer)
    assert timer.calls and json.loads(file.read_text())["timings_ms"]


def test_tuning_without_cuda_or_a_timer_is_skipped() -> None:
    binding = resolve(tune=True)
    assert all(d.time_ms is None for d in binding.table)


# --- livelm kernels --------------------------------------------------------------------------


def test_kernels_command_prints_the_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = cli_main(["kernels", "--model", "random:tiny", "--device", "cpu", "--dtype", "float32",
                     "--cache-dir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "operation" in out and "candidate" in out and "status" in out and "reason" in out
    for op in OPERATIONS:
        assert op in out
    assert "torch_ref.paged_attention" in out and "unavailable" in out


def test_kernels_command_exits_2_when_a_locked_kernel_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("lock: {rms_norm: nobody.rms_norm}\n")
    code = cli_main(["kernels", "--model", "random:tiny", "--device", "cpu", "--policy", str(policy),
                     "--cache-dir", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "locks rms_norm to 'nobody.rms_norm'" in capsys.readouterr().err


def test_kernels_command_reports_a_bad_policy_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("prefer: {rms_norm: triton}\n")
    code = cli_main(["kernels", "--model", "random:tiny", "--device", "cpu", "--policy", str(policy)])
    assert code == 2 and "prefer.rms_norm must be a list" in capsys.readouterr().err

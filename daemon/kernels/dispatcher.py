"""Resolves one kernel per operation at startup and binds them into a ``Kernels`` record.

Steps: gather the candidates of every backend (recording the backends that do not load, with
why), drop those that do not support the target, apply the policy (lock, allow, deny), check
each survivor numerically against the reference (``checking``), optionally time the survivors on
the model's real shapes (``tuning``, CUDA only, cached on disk), and choose per operation:
the policy's lock, else the fastest when tuned, else the policy's prefer order, else the default
priority. The chosen functions are bound as they are: the hot path calls them directly.

Every candidate and every unavailable backend ends up in the table with its status and reason.
A locked kernel that cannot be bound, or an operation left with no kernel, fails startup with a
``KernelResolutionError`` (a ``ConfigError``), never silently at runtime.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from livelm.daemon.kernels import torch_backend
from livelm.daemon.kernels.candidates import BackendUnavailable, Candidate, Target
from livelm.daemon.kernels.checking import Case, build_cases, check, run_case
from livelm.daemon.kernels.ops import FORWARD_OPERATIONS, OPERATIONS, Kernels
from livelm.daemon.kernels.policy import Policy
from livelm.daemon.kernels.tuning import (
    Timer,
    cache_key,
    cache_path,
    cuda_timer,
    load_timings,
    save_timings,
)
from livelm.daemon.logs import get_logger
from livelm.daemon.model.config import ModelConfig
from livelm.protocol.errors import ConfigError

log = get_logger(__name__)

# (backend label shown when it is unavailable, module, function returning its candidates)
BACKEND_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("torch", "livelm.daemon.kernels.torch_backend", "candidates"),
    ("triton", "livelm.daemon.kernels.triton_backend", "candidates"),
    ("flex", "livelm.daemon.kernels.flex_backend", "candidates"),
    ("flash_attn", "livelm.daemon.kernels.optional_backends", "flash_attn_candidates"),
    ("xformers", "livelm.daemon.kernels.optional_backends", "xformers_candidates"),
    ("flashinfer", "livelm.daemon.kernels.optional_backends", "flashinfer_candidates"),
)

CUDA_PRIORITY = (
    "triton", "flash_attn", "flashinfer", "xformers", "flex", "torch_sdpa", "torch_batched",
    "torch_ref",
)
CPU_PRIORITY = ("torch_ref", *CUDA_PRIORITY[:-1])
# an operation whose default order differs from the device's (none at present: the skinny
# GEMM beat cuBLAS inside the daemon on the H200, perf/results/*-step-skinny-*.json)
OPERATION_PRIORITY: dict[str, tuple[str, ...]] = {}

CHOSEN, PASSED, REFUSED, UNAVAILABLE = "chosen", "passed", "refused", "unavailable"
ALL_OPERATIONS = "*"  # the operation column of an unavailable backend's row


@dataclass(frozen=True)
class Decision:
    operation: str  # ALL_OPERATIONS for a backend that is unavailable
    candidate: str  # the backend's label for an unavailable backend
    chosen: bool
    reason: str
    backend: str = ""
    status: str = ""  # chosen | passed | refused | unavailable
    time_ms: float | None = None  # median on the real shapes, when tuned


@dataclass(frozen=True)
class Binding:
    kernels: Kernels
    table: tuple[Decision, ...]
    target: Target | None = None

    def chosen(self) -> dict[str, str]:
        return {d.operation: d.candidate for d in self.table if d.chosen}

    def unavailable(self) -> dict[str, str]:
        return {d.candidate: d.reason for d in self.table if d.status == UNAVAILABLE}


class KernelResolutionError(ConfigError):
    """No kernel can be bound as the policy asks; ``table`` holds the decisions made so far."""

    def __init__(self, message: str, table: Sequence[Decision] = ()) -> None:
        super().__init__(message)
        self.table = tuple(table)


class LockedKernelRefused(KernelResolutionError):
    def __init__(self, operation: str, candidate: str, why: str, table: Sequence[Decision]) -> None:
        super().__init__(
            f"the kernel policy locks {operation} to {candidate!r}, but it cannot be bound: {why}",
            table,
        )
        self.operation, self.candidate = operation, candidate


class NoKernelAvailable(KernelResolutionError):
    pass


@dataclass(frozen=True)
class ResolveOptions:
    tune: bool = False  # time the survivors on the real shapes (CUDA, or with ``timer``)
    cache_dir: Path | None = None  # timings are cached under <cache_dir>/kernels/
    ffn_size: int | None = None  # the model's intermediate size, for swiglu's timing shape
    extra_candidates: tuple[Candidate, ...] = ()  # offered besides the backends' (tests, trials)
    sources: tuple[tuple[str, str, str], ...] = BACKEND_SOURCES
    timer: Timer | None = None  # replaces CUDA-event timing (lets tests drive the cache on CPU)
    seed: int | None = None  # of the check's random inputs; None = fresh each start


def target_for(config: ModelConfig, device: torch.device, dtype: torch.dtype, block_size: int) -> Target:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return Target(
        device=device,
        capability=capability,
        dtype=dtype,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_size=config.hidden_size,
        block_size=block_size,
        sliding_window=config.sliding_window,
        vocab_size=config.vocab_size,
        intermediate_size=config.intermediate_size,
    )


@dataclass
class _Row:
    candidate: Candidate
    status: str = PASSED
    reason: str = ""
    time_ms: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.candidate.operation, self.candidate.name


def resolve_kernels(
    target: Target, policy: Policy | None = None, options: ResolveOptions | None = None
) -> Binding:
    """Choose, check and bind one kernel per operation for ``target``."""
    if not isinstance(target, Target):
        raise TypeError(
            "resolve_kernels takes a Target (see target_for(model_config, device, dtype, "
            f"block_size)), a Policy and ResolveOptions; got {type(target).__name__}"
        )
    policy = policy or Policy()
    options = options or ResolveOptions()
    offered, unavailable = gather_candidates(options.sources, options.extra_candidates)
    rows = [_Row(c) for c in offered]
    _filter(rows, target, policy)
    _enforce_locks(rows, policy, unavailable)
    _check_all(rows, target, options.seed)
    _enforce_locks(rows, policy, unavailable)
    if options.tune:
        _tune(rows, target, options)
        _enforce_locks(rows, policy, unavailable)
    chosen = {op: _choose(op, rows, target, policy, unavailable) for op in OPERATIONS}
    unsafe = frozenset(op for op, row in chosen.items()
                       if op in FORWARD_OPERATIONS and not row.candidate.graph_safe)
    kernels = Kernels(**{op: row.candidate.fn for op, row in chosen.items()}, graph_unsafe=unsafe)
    binding = Binding(kernels, _table(rows, unavailable), target)
    log_binding(binding)
    return binding


def gather_candidates(
    sources: Sequence[tuple[str, str, str]], extra: Sequence[Candidate] = ()
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Every backend's candidates, and (label, reason) for each backend that is unavailable."""
    offered: list[Candidate] = []
    unavailable: list[tuple[str, str]] = []
    for label, module, function in sources:
        try:
            offered += getattr(importlib.import_module(module), function)()
        except BackendUnavailable as exc:
            unavailable.append((label, str(exc)))
        except ImportError as exc:
            unavailable.append((label, f"does not import: {exc}"))
    offered += extra
    _check_names(offered)
    return offered, unavailable


def _check_names(offered: list[Candidate]) -> None:
    seen: set[tuple[str, str]] = set()
    for c in offered:
        if c.operation not in OPERATIONS:
            raise ValueError(f"candidate {c.name!r} is for an unknown operation {c.operation!r}")
        if (c.operation, c.name) in seen:
            raise ValueError(f"two candidates for {c.operation} are named {c.name!r}")
        seen.add((c.operation, c.name))


# --- stages ----------------------------------------------------------------------------------


def _filter(rows: list[_Row], target: Target, policy: Policy) -> None:
    for row in rows:
        c = row.candidate
        try:
            unsupported = c.supports(target)
        except Exception as exc:  # a backend's own bug: refuse the candidate, say why
            unsupported = f"supports() raised {type(exc).__name__}: {exc}"
        if unsupported is not None:
            row.status, row.reason = REFUSED, f"unsupported: {unsupported}"
            continue
        refusal = policy.refusal(c.operation, c.name, c.backend)
        if refusal is None and c.opt_in and not policy.names(c.operation, c.name):
            refusal = "opt-in: checked and bound only where the policy names it"
        if refusal is not None:
            row.status, row.reason = REFUSED, refusal


def _enforce_locks(rows: list[_Row], policy: Policy, unavailable: list[tuple[str, str]]) -> None:
    for op, name in policy.lock.items():
        row = next((r for r in rows if r.key == (op, name)), None)
        if row is None:
            why = "no available backend offers it"
            if unavailable:
                why += " (unavailable: " + "; ".join(f"{b}: {r}" for b, r in unavailable) + ")"
            raise LockedKernelRefused(op, name, why, _table(rows, unavailable))
        if row.status == REFUSED:
            raise LockedKernelRefused(op, name, row.reason, _table(rows, unavailable))


def _check_all(rows: list[_Row], target: Target, seed: int | None) -> None:
    seed = secrets.randbits(31) if seed is None else seed
    gen = torch.Generator(device=target.device).manual_seed(seed)
    for op in OPERATIONS:
        live = [r for r in rows if r.candidate.operation == op and r.status == PASSED]
        if not live:
            continue
        cases = build_cases(op, target, gen, real_size=target.device.type == "cuda")
        for row in live:
            _check_row(row, cases, target)
            if row.status == REFUSED:
                row.reason += f" (check seed {seed})"


def _check_row(row: _Row, cases: list[Case], target: Target) -> None:
    if row.candidate.backend == "torch_sdpa" and target.device.type == "cuda":
        _pin_sdpa(row, cases)
        return
    reason = check(row.candidate.fn, cases)
    if reason is None:
        row.reason = f"passed check ({_labels(cases)})"
    else:
        row.status, row.reason = REFUSED, f"check failed: {reason}"


def _pin_sdpa(row: _Row, cases: list[Case]) -> None:
    """Probe each SDPA backend alone and bind SDPA restricted to those that never failed."""
    usable, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns for every backend it cannot use
        for label, backend in torch_backend.SDPA_BACKENDS.items():
            failure, ran = _probe(torch_backend.sdpa_attention([backend]), cases)
            if failure is not None:
                notes.append(f"{label} refused: {failure}")
            elif ran:
                usable.append((label, backend))
            else:
                notes.append(f"{label} left out: it takes none of these inputs")
        if not usable:
            row.status, row.reason = REFUSED, "check failed: no SDPA backend passed; " + "; ".join(notes)
            return
        fn = torch_backend.sdpa_attention([b for _, b in usable])
        reason = check(fn, cases)
    if reason is not None:
        row.status, row.reason = REFUSED, f"check failed with SDPA pinned: {reason}"
        return
    row.candidate = dataclasses.replace(row.candidate, fn=fn)
    pinned = ", ".join(label for label, _ in usable)
    row.reason = "; ".join([f"passed check ({_labels(cases)}); SDPA pinned to {pinned}", *notes])


def _probe(fn: object, cases: list[Case]) -> tuple[str | None, bool]:
    """(the first real failure, whether any case ran); 'no kernel for these inputs' is neither."""
    ran = False
    for case in cases:
        reason = run_case(fn, case)
        if reason is None:
            ran = True
        elif "No available kernel" not in reason:
            return reason, ran
    return None, ran


def _labels(cases: list[Case]) -> str:
    return ", ".join(c.label for c in cases)


def _tune(rows: list[_Row], target: Target, options: ResolveOptions) -> None:
    timer = options.timer
    if timer is None:
        if target.device.type != "cuda":
            log.info("kernel tuning skipped: timing runs on CUDA only")
            return
        timer = cuda_timer(target, options.ffn_size)
    key = cache_key(target, options.ffn_size)
    path = cache_path(options.cache_dir, key) if options.cache_dir is not None else None
    timings = load_timings(path, key) if path is not None else {}
    fresh = False
    for row in (r for r in rows if r.status == PASSED):
        op, name = row.key
        cached = timings.get(op, {}).get(name)
        if cached is not None:
            row.time_ms, row.reason = cached, row.reason + "; time from the cache"
            continue
        try:
            row.time_ms = timer(row.candidate)
        except Exception as exc:  # a kernel that fails on the real shapes must not be bound
            row.status = REFUSED
            row.reason = f"failed while timed on the real shapes: {type(exc).__name__}: {exc}"
            continue
        timings.setdefault(op, {})[name] = row.time_ms
        fresh = True
    if path is not None and fresh:
        save_timings(path, key, timings)


def _choose(
    op: str, rows: list[_Row], target: Target, policy: Policy, unavailable: list[tuple[str, str]]
) -> _Row:
    live = [r for r in rows if r.candidate.operation == op and r.status == PASSED]
    if not live:
        raise NoKernelAvailable(f"no kernel for {op} passed (policy: {policy.source})", _table(rows, unavailable))
    pick, why = _rank(op, live, target, policy)
    for row in live:
        if row is not pick:
            row.reason += f"; not chosen, {pick.candidate.name} {_short(why)}"
    pick.status, pick.reason = CHOSEN, f"{why}; {pick.reason}"
    return pick


def _short(why: str) -> str:
    return why.partition(" (")[0]


def _rank(op: str, live: list[_Row], target: Target, policy: Policy) -> tuple[_Row, str]:
    locked = policy.lock.get(op)
    if locked is not None:
        return next(r for r in live if r.candidate.name == locked), f"is locked by {policy.source}"
    if all(r.time_ms is not None for r in live):
        fastest = min(live, key=lambda r: r.time_ms)
        return fastest, f"is fastest on the real shapes ({fastest.time_ms:.4f} ms)"
    order = OPERATION_PRIORITY.get(op) or (
        CUDA_PRIORITY if target.device.type == "cuda" else CPU_PRIORITY
    )

    def rank(row: _Row) -> tuple[int, int]:
        c = row.candidate
        backend = order.index(c.backend) if c.backend in order else len(order)
        return policy.prefer_rank(op, c.name, c.backend), backend

    best = min(live, key=rank)  # min keeps the backend's own order among equals
    if policy.prefer_rank(op, best.candidate.name, best.candidate.backend) < len(policy.prefer.get(op, ())):
        return best, f"comes first in the prefer list of {policy.source}"
    return best, f"comes first in the default order on {target.device.type} ({' > '.join(order)})"


# --- the table -------------------------------------------------------------------------------

_STATUS_ORDER = {CHOSEN: 0, PASSED: 1, REFUSED: 2}


def _table(rows: list[_Row], unavailable: list[tuple[str, str]]) -> tuple[Decision, ...]:
    ordered = sorted(
        rows, key=lambda r: (OPERATIONS.index(r.candidate.operation), _STATUS_ORDER[r.status])
    )
    table = [
        Decision(
            operation=r.candidate.operation,
            candidate=r.candidate.name,
            chosen=r.status == CHOSEN,
            reason=r.reason,
            backend=r.candidate.backend,
            status=r.status,
            time_ms=r.time_ms,
        )
        for r in ordered
    ]
    table += [
        Decision(ALL_OPERATIONS, label, False, reason, backend=label, status=UNAVAILABLE)
        for label, reason in unavailable
    ]
    return tuple(table)


def log_binding(binding: Binding) -> None:
    log.info("kernels bound", extra={"kernels": binding.chosen()})
    for d in binding.table:
        if d.chosen:
            level = logging.INFO
        elif d.reason.startswith("check failed") or d.reason.startswith("failed while timed"):
            level = logging.WARNING  # supported, yet wrong or broken here: worth a look
        else:
            level = logging.DEBUG
        log.log(level, "kernel %s: %s %s (%s)", d.operation, d.candidate, d.status, d.reason)

"""What AdamP and SGDP share as ``torch.optim.Optimizer`` subclasses: grad checks, lazy state,
``state_dtype``, and checkpoints that move both ways with the official ``adamp==0.3.0``.

No maths lives here; the update rules are in :mod:`adamp_core`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as _xp_torch
import numpy as np
import torch
from torch.nn import Parameter as nn_Parameter
from torch.optim.optimizer import required

from adamp_core import fused as _fused
from adamp_core._common import finite_flag, keep_if_finite
from adamp_core.arrays import check_hyper_arrays
from adamp_core.diagnostics import step_diagnostics
from adamp_core.grouped import group_indices

__all__ = ["ProjectedOptimizer", "XP", "no_grad_step", "required"]

# The array-API namespace of every torch tensor (what ``array_namespace(p)`` returns), resolved
# once at import: no per-param or per-step lookup, and nothing for torch.compile to trace.
XP = _xp_torch


def no_grad_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``step`` without autograd, as ``torch.optim``'s ``_use_grad_for_differentiable`` does.

    The two ``graph_break`` calls are torch.optim's own (pytorch/pytorch#104053): they let AOTAutograd
    see the compiled step as an inference graph, so inductor updates params and state in place.
    """

    @functools.wraps(func)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            torch._dynamo.graph_break()
            return func(self, *args, **kwargs)
        finally:
            torch._dynamo.graph_break()
            torch.set_grad_enabled(prev)

    return step


def normalize_state_dtype(value: Any) -> torch.dtype | None:
    """``None`` (state in the param's dtype) or a real floating ``torch.dtype`` (also given as a name)."""
    if value is None:
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"Invalid state_dtype: {value!r} (expected None or a real floating torch.dtype)")
    return dtype


# Group keys that adamp 0.3.0 does not have.
_EXTRA_KEYS = ("maximize", "state_dtype", "skip_nonfinite", "fused", "foreach")
_FUSED_DTYPES = (torch.float32, torch.float64)


def _label(gi: int, pi: int) -> str:
    return f"param_groups[{gi}]['params'][{pi}]"


class ProjectedOptimizer(torch.optim.Optimizer):
    """Base of :class:`adamp_torch.AdamP` and :class:`adamp_torch.SGDP` (not public)."""

    _name = "ProjectedOptimizer"
    _state_keys: tuple[str, ...] = ()  # per-param state arrays, shaped like the param
    # The hyperparameter names every saved group must have: those of adamp 0.3.0's groups (``lr`` and
    # the keys of the adamp_core.hyperparams spec). Not ``self.defaults``: torch's ``__setstate__``
    # adds keys of its own there (``differentiable``), which no saved group needs to carry.
    _group_keys: tuple[str, ...] = ()
    _has_step = False
    _diagnostics: dict[torch.Tensor, Any] | None = None  # see record_diagnostics

    # -- hyperparameters ---------------------------------------------------------------------
    def _check_hyper(self, group: dict[str, Any]) -> Any:
        """Validated hyperparameters of ``group`` (an adamp_core NamedTuple); raises on a bad one."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, refusing bad hyperparameters and complex params
        before the group is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        merged = {**self.defaults, **param_group}
        if all(v is not required for v in merged.values()):  # else torch raises its own error below
            self._check_hyper(merged)
        if "state_dtype" in param_group:
            param_group = {**param_group, "state_dtype": normalize_state_dtype(param_group["state_dtype"])}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for pi, p in enumerate(group["params"]):
            if p.is_complex() or not p.is_floating_point():
                self.param_groups.pop()
                raise TypeError(
                    f"{self._name} supports real floating params only: {_label(len(self.param_groups), pi)} has dtype"
                    f" {p.dtype}"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups saved by adamp==0.3.0 (or an older version of this package) lack our extra keys.
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("state_dtype", None)
            group.setdefault("skip_nonfinite", False)
            group.setdefault("fused", None)
            group.setdefault("foreach", None)
        self.defaults.setdefault("maximize", False)
        self.defaults.setdefault("state_dtype", None)
        self.defaults.setdefault("skip_nonfinite", False)
        self.defaults.setdefault("fused", None)
        self.defaults.setdefault("foreach", None)

    # -- grads ------------------------------------------------------------------------------------
    def _check_grads(self) -> list[Any]:
        """Check every grad of every group against its param (metadata only: no sync), and every
        group's hyperparameters; return the latter. Runs before anything is written, so a bad grad
        anywhere leaves every param and every state as it was."""
        hypers = []
        for gi, group in enumerate(self.param_groups):
            try:  # a group edited after construction (group["lr"] = ...) is checked here, before any write
                hypers.append(self._check_hyper(group))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{exc} (param_groups[{gi}])") from None
            devices = set()  # array hyperparameters are checked once per device of the group's params
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:
                    raise RuntimeError(
                        f"{self._name} does not support sparse gradients: {_label(gi, pi)} has a {g.layout} grad"
                    )
                if p.is_complex() or not p.is_floating_point():
                    raise TypeError(
                        f"{self._name} supports real floating params only: {_label(gi, pi)} has dtype {p.dtype}"
                    )
                if g.dtype != p.dtype:
                    raise TypeError(f"grad of {_label(gi, pi)} has dtype {g.dtype} but the param has dtype {p.dtype}")
                if g.shape != p.shape:
                    raise ValueError(
                        f"grad of {_label(gi, pi)} has shape {tuple(g.shape)} but the param has shape {tuple(p.shape)}"
                    )
                if g.device != p.device:
                    raise ValueError(f"grad of {_label(gi, pi)} is on {g.device} but the param is on {p.device}")
                if p.device not in devices:
                    devices.add(p.device)
                    try:
                        check_hyper_arrays(p, hypers[-1])
                    except (TypeError, ValueError) as exc:
                        raise type(exc)(f"{exc} (param_groups[{gi}])") from None
        return hypers

    # -- lazy state ---------------------------------------------------------------------------------
    def _new_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        dtype = group.get("state_dtype") or p.dtype
        # preserve_format: state keeps the param's memory format (channels_last, transposed views).
        state: dict[str, Any] = {}
        if self._has_step:
            # A 0-d int64 tensor on the param's device: no host sync, no recompile per step under
            # torch.compile (a Python int would be a new constant every step).
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        for key in self._state_keys:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    # -- non-finite gradients (skip_nonfinite=True) ----------------------------------------------
    @staticmethod
    def _check_flags(group: dict[str, Any]) -> None:
        for name in ("maximize", "skip_nonfinite"):
            if not isinstance(group.get(name, False), bool):
                raise TypeError(f"Invalid {name} value: {group[name]!r} (expected True or False)")
        _fused.check_fused(group.get("fused"))
        foreach = group.get("foreach")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach value: {foreach!r} (expected None, True or False)")

    # -- the fused CPU kernels (adamp_core.fused) ---------------------------------------------------
    @staticmethod
    def _fused_group(group: dict[str, Any]) -> bool:
        """Whether this step may use the fused kernels for ``group`` (never inside torch.compile)."""
        if group.get("fused") is False or not _fused.AVAILABLE or torch.compiler.is_compiling():
            return False
        _fused.set_threads(torch.get_num_threads())  # torch.set_num_threads governs the kernels too
        return True

    @staticmethod
    def _fusable(p: torch.Tensor, g: torch.Tensor, *state: torch.Tensor) -> bool:
        """Whether the fused kernels apply to ``p``, ``g`` and the state: plain CPU tensors (no DTensor or
        other subclass), float32/float64, one dtype, C-contiguous."""
        if p.device.type != "cpu" or p.dtype not in _FUSED_DTYPES or type(p) not in (torch.Tensor, nn_Parameter):
            return False
        for x in (g, *state):
            if type(x) is not torch.Tensor or x.dtype != p.dtype or not x.is_contiguous() or x.is_conj() or x.is_neg():
                return False
        return p.is_contiguous()

    def _batchable(self, p: torch.Tensor, g: torch.Tensor, *state: torch.Tensor) -> bool:
        """Whether ``p`` joins its group's one batched kernel call (:func:`adamp_core.fused.adamp_batch`):
        a fusable tensor small enough that per-tensor call overhead would dominate its update, and no
        diagnostics to record (they need each param's old value)."""
        return p.numel() < _fused.BATCH_MAX_SIZE and self._diagnostics is None and self._fusable(p, g, *state)

    def _fused_views(self, p: torch.Tensor, g: torch.Tensor, *state: torch.Tensor) -> list[Any] | None:
        """Zero-copy NumPy views of ``p``, ``g`` and the state when :meth:`_fusable`, else None."""
        return [x.detach().numpy() for x in (p, g, *state)] if self._fusable(p, g, *state) else None

    @staticmethod
    def _fused_batch(batch: list[tuple[Any, ...]], hp: Any, skip: bool) -> list[tuple[Any, ...]]:
        """Update the small tensors of a group with one fused kernel call per dtype.

        ``batch`` holds ``(param, p, g, state tensors, step or None, skip counter or None)``; AdamP's
        entries have a step tensor (the kernel gets ``t + 1``, advanced here where the step ran), SGDP's
        None. Returns the entries the kernel left unwritten for the array-API step (float64 sums out of
        range, :data:`adamp_core.fused.FALLBACK`)."""
        fallback: list[tuple[Any, ...]] = []
        for dtype in {entry[1].dtype for entry in batch}:
            items = [entry for entry in batch if entry[1].dtype == dtype]
            addresses = np.array([[x.data_ptr() for x in (e[1], e[2], *e[3])] for e in items], dtype=np.int64)
            shapes = [tuple(e[1].shape) for e in items]
            np_dtype = np.float32 if dtype == torch.float32 else np.float64
            steps = [e[4] for e in items]
            if steps[0] is not None:  # CPU tensors: reading them is no device sync
                status = _fused.adamp_batch(addresses, shapes, np_dtype, torch.stack(steps).numpy() + 1, hp, skip)
            else:
                status = _fused.sgdp_batch(addresses, shapes, np_dtype, hp, skip)
            done = [e[4] for e, s in zip(items, status, strict=True) if s == _fused.OK and e[4] is not None]
            skipped = [e[5] for e, s in zip(items, status, strict=True) if s == _fused.SKIPPED]
            if done:
                torch._foreach_add_(done, 1)
            if skipped:
                torch._foreach_add_(skipped, 1)
            fallback += [e for e, s in zip(items, status, strict=True) if s == _fused.FALLBACK]
        return fallback

    # -- the multi-tensor array-API step (adamp_core.grouped) ---------------------------------------
    def _foreach_group(self, group: dict[str, Any]) -> bool:
        """Whether this step updates the group's tensors that the fused kernels do not take (CUDA,
        16-bit, non-contiguous, ``fused=False``) together, a few dozen kernels per group of equal row
        length instead of per tensor: not with ``foreach=False``, with diagnostics on (they need each
        param's old value) or inside ``torch.compile`` (which fuses the per-tensor step itself)."""
        return group.get("foreach") is not False and self._diagnostics is None and not torch.compiler.is_compiling()

    def _grouped_steps(self, entries: list[tuple[Any, ...]], hp: Any, skip: bool) -> None:
        """Update ``entries`` (``(param, p, g, state tensors, step or None, skip counter or None)``) with
        :mod:`adamp_core.grouped`: one group per dtype, state dtypes, device and row length (bounded in
        size), written back with one ``torch._foreach_copy_`` per array; a group of one takes the
        per-tensor step (no concatenation). No sync."""
        keys = [(e[1].dtype, e[1].device, tuple(s.dtype for s in e[3])) for e in entries]
        on_cpu = all(e[1].device.type == "cpu" for e in entries)  # a large CPU tensor's step is bandwidth-bound
        for idx in group_indices(keys, [tuple(e[1].shape) for e in entries], on_host=on_cpu):
            items = [entries[i] for i in idx]
            if len(items) == 1:
                self._entry_step(items[0], hp, skip)
                continue
            params, grads = [e[1] for e in items], [e[2] for e in items]
            states = [self._core_state(e[4], e[3]) for e in items]
            new_p, new_states, ok = self._update_group(XP, params, grads, states, hp, skip)
            torch._foreach_copy_(params, new_p)
            n_bufs = len(items[0][3])  # the state's arrays are its last fields (after AdamP's step)
            for j in range(n_bufs):
                torch._foreach_copy_([e[3][j] for e in items], [s[j - n_bufs] for s in new_states])
            if items[0][4] is not None:
                torch._foreach_copy_([e[4] for e in items], [s.step for s in new_states])
            if ok is not None:
                torch._foreach_add_([e[5] for e in items], list(torch.unbind(torch.logical_not(ok).to(torch.int64))))

    # -- diagnostics (issue: make the slowdown visible) -----------------------------------------
    def record_diagnostics(self, enabled: bool = True) -> None:
        """Record :func:`adamp_core.diagnostics.step_diagnostics` of every param at every step from now on
        (``enabled=False`` stops and drops the records). Off by default: then a step computes nothing
        for it. The latest record per param is :attr:`diagnostics`."""
        if not isinstance(enabled, bool):
            raise TypeError(f"Invalid enabled value: {enabled!r} (expected True or False)")
        self._diagnostics = {} if enabled else None

    @property
    def diagnostics(self) -> dict[torch.Tensor, Any]:
        """``{param: StepDiagnostics}`` of the last step (0-d tensors on the param's device, no sync; see
        :func:`adamp_core.diagnostics.to_host`). Empty until a step ran with :meth:`record_diagnostics` on."""
        return {} if self._diagnostics is None else self._diagnostics

    def _record(self, p: torch.Tensor, old: torch.Tensor, new: torch.Tensor, g: torch.Tensor, hp: Any) -> None:
        self._diagnostics[p] = step_diagnostics(old, new, g, hp.delta, hp.eps)

    def _skip_counter(self, p: torch.Tensor) -> torch.Tensor:
        """``state["nonfinite_skips"]`` of ``p``: a 0-d int64 tensor on its device counting the steps
        skipped for a non-finite grad (created at the first step with ``skip_nonfinite=True``)."""
        state = self.state[p]
        if "nonfinite_skips" not in state:
            state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=p.device)
        return state["nonfinite_skips"]

    @staticmethod
    def _keep_if_finite(counter: torch.Tensor, g: Any, new_p: Any, new: Any, p: Any, old: Any, rows: Any) -> Any:
        """The core's ``(new_p, new)`` if ``g`` is finite, else ``(p, old)``; counts the skip. No sync."""
        ok = finite_flag(XP, g, rows)
        counter.add_(torch.logical_not(ok).to(counter.dtype))
        return keep_if_finite(XP, ok, new_p, new, p, old)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` with each ``step`` as a Python int, as ``adamp==0.3.0``
        stores it, so the official optimizer resumes from it with its own float64 bias correction.

        This reads the step counters back to the host: one transfer per device, not per param.
        """
        sd = super().state_dict()
        if not self._has_step:
            return sd
        by_device: dict[torch.device, list[Any]] = {}
        for key, st in sd["state"].items():
            if torch.is_tensor(st.get("step")):
                by_device.setdefault(st["step"].device, []).append(key)
        steps: dict[Any, int] = {}
        for keys in by_device.values():
            values = torch.stack([sd["state"][k]["step"].reshape(()) for k in keys]).tolist()
            steps.update(zip(keys, (int(v) for v in values), strict=True))
        # New per-param dicts: the ones in sd["state"] are our live state dicts.
        sd["state"] = {k: ({**st, "step": steps[k]} if k in steps else st) for k, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, also for a state_dict of ``adamp==0.3.0``.

        Before loading, each state array's shape is checked against its param. After loading,
        ``step`` (Python int from adamp 0.3.0, or a tensor of any dtype) becomes our 0-d int64
        tensor on the param's device, and the state arrays are taken from the saved ones in the
        group's ``state_dtype`` (torch would have cast them to the param's dtype).
        """
        pairs = self._saved_pairs(state_dict)
        for gi, sg in enumerate(state_dict.get("param_groups", [])):
            missing = sorted(k for k in self._group_keys if k not in sg)
            if missing:
                raise ValueError(
                    f"loaded param_groups[{gi}] is missing {missing}: not a {self._name} state dict (a state dict of"
                    " another optimizer?)"
                )
        for saved_id, p, label in pairs:
            saved = state_dict["state"].get(saved_id, {})
            absent = [k for k in self._state_keys if saved and k not in saved]
            if absent:
                raise ValueError(
                    f"state_dict state {saved_id!r} of {label} has keys {sorted(saved)} but {self._name} needs"
                    f" {list(self._state_keys)}: not a {self._name} state dict (a state dict of another optimizer?)"
                )
            if self._has_step and "step" in saved and not torch.is_tensor(saved["step"]):
                _check_saved_step(saved["step"], label)
            for key in self._state_keys:
                v = saved.get(key)
                if torch.is_tensor(v) and v.shape != p.shape:
                    raise ValueError(
                        f"state_dict state {saved_id!r} ({key}) has shape {tuple(v.shape)} but {label} has shape"
                        f" {tuple(p.shape)}"
                    )
        # Our extra group keys that a saved group lacks (adamp 0.3.0 has neither) keep this
        # optimizer's values: loading an official checkpoint must not drop state_dtype=float32.
        kept = [
            {k: g[k] for k in _EXTRA_KEYS if k in g and k not in sg}
            for g, sg in zip(self.param_groups, state_dict.get("param_groups", []), strict=False)
        ]
        super().load_state_dict(state_dict)
        for g, extra in zip(self.param_groups, kept, strict=False):
            g.update(extra)
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, p, _ in pairs:
            st = self.state.get(p)
            if not st:
                continue
            if self._has_step and "step" in st:
                st["step"] = _step_tensor(st["step"], p.device)
            if "nonfinite_skips" in st:  # torch casts it to the param's dtype: back to an int64 count
                st["nonfinite_skips"] = _step_tensor(st["nonfinite_skips"], p.device)
            dtype = groups[id(p)].get("state_dtype")
            if dtype is not None:
                saved = state_dict["state"].get(saved_id, {})
                for key in self._state_keys:
                    if torch.is_tensor(saved.get(key)):
                        st[key] = saved[key].to(device=p.device, dtype=dtype, copy=True)

    def _saved_pairs(self, state_dict: dict[str, Any]) -> list[tuple[Any, torch.Tensor, str]]:
        """(saved id, param, label) for each param, as torch's load_state_dict pairs them."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return []  # torch raises its own error
        pairs = []
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(sg["params"]) != len(g["params"]):
                return []
            pairs += [
                (sid, p, _label(gi, pi)) for pi, (sid, p) in enumerate(zip(sg["params"], g["params"], strict=True))
            ]
        return pairs


def _step_tensor(step: Any, device: torch.device) -> torch.Tensor:
    """A step count (int, or a tensor of any dtype, e.g. torch.optim.Adam's float32) as a 0-d int64
    tensor on ``device``."""
    if torch.is_tensor(step):
        if step.dtype.is_floating_point:
            step = torch.round(step)
        return step.reshape(()).to(device=device, dtype=torch.int64, copy=True)
    return torch.tensor(int(step), dtype=torch.int64, device=device)


def _check_saved_step(step: Any, label: str) -> None:
    if isinstance(step, bool) or not isinstance(step, int | float) or not (0 <= step < 2**62) or step != int(step):
        raise ValueError(f"Invalid saved step for {label}: {step!r} (expected a non-negative integer count)")

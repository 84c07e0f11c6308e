"""Benchmark workloads: the parameter shapes an optimizer step is timed on.

Defined once here and used by ``adamp-xp bench`` and the asv suite (``asv_benchmarks/``).
A :class:`Workload` is only shapes (plus which tensors are scale-invariant, i.e. get a
gradient orthogonal to the weight as behind BatchNorm); nothing is allocated until
:func:`host_data` is called, so sizes can be checked cheaply.

=============  ===========================================================  =========  ===========
name           what                                                         tensors    elements
=============  ===========================================================  =========  ===========
resnet50       ResNet-50 (torchvision layout) params: convs, BN affine, fc        161  25,557,032
transformer    one pre-LN transformer block, d_model 1024, MLP 4096 (+ LN)         12  12,596,224
small          2,000 tensors of 1,024-4,096 elements (4 in 5 are 2-d)           2,000   5,052,658
large          one 8192 x 8192 matrix                                               1  67,108,864
=============  ===========================================================  =========  ===========

``scale`` (argument, else the ``ADAMP_BENCH_SCALE`` environment variable, else 1) shrinks a
workload to about ``scale`` times its elements: widths are multiplied by ``sqrt(scale)`` (the
tensor count stays, so ResNet-50 keeps its 161 tensors) and ``small`` keeps tensor sizes but
has ``round(2000 * scale)`` tensors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ENV_SCALE", "WORKLOAD_NAMES", "Workload", "bench_scale", "get_workload", "host_data"]

ENV_SCALE = "ADAMP_BENCH_SCALE"
WORKLOAD_NAMES: tuple[str, ...] = ("resnet50", "transformer", "small", "large")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    """Parameter shapes of one benchmark model; ``invariant[i]``: tensor ``i`` is scale-invariant."""

    name: str
    scale: float
    description: str
    shapes: tuple[Shape, ...]
    invariant: tuple[bool, ...]

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def n_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def summary(self) -> str:
        scale = "" if self.scale == 1 else f", scale {self.scale:g}"
        return (
            f"{self.name}: {self.description}; {self.n_tensors} tensors, {self.n_elements / 1e6:.2f}M elements{scale}"
        )


def bench_scale(scale: float | None = None) -> float:
    """``scale`` if given, else ``$ADAMP_BENCH_SCALE``, else 1; must be a positive number."""
    what = "scale"
    if scale is None:
        raw = os.environ.get(ENV_SCALE)
        if raw is None or raw.strip() == "":
            return 1.0
        what = ENV_SCALE
        try:
            scale = float(raw)
        except ValueError:
            raise ValueError(f"Invalid {what}: {raw!r} (expected a positive number)") from None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"Invalid {what}: {scale!r} (expected a positive number)")
    return float(scale)


def _width(c: int, scale: float) -> int:
    return max(1, round(c * math.sqrt(scale)))


def _resnet50(scale: float) -> tuple[list[Shape], list[bool]]:
    # torchvision.models.resnet50 named_parameters() order; every conv is followed by BatchNorm,
    # so conv weights are scale-invariant; BN affine params are 1-d; fc is not invariant.
    w = lambda c: _width(c, scale)
    shapes: list[Shape] = []
    inv: list[bool] = []

    def conv(out_c: int, in_c: int, k: int, first: bool = False) -> None:
        shapes.append((w(out_c), 3 if first else w(in_c), k, k))
        inv.append(True)

    def bn(c: int) -> None:
        shapes.extend([(w(c),), (w(c),)])  # weight, bias
        inv.extend([False, False])

    conv(64, 3, 7, first=True)
    bn(64)
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            conv(planes, inplanes, 1)
            bn(planes)
            conv(planes, planes, 3)
            bn(planes)
            conv(planes * 4, planes, 1)
            bn(planes * 4)
            if b == 0:  # downsample: 1x1 conv + BN
                conv(planes * 4, inplanes, 1)
                bn(planes * 4)
            inplanes = planes * 4
    shapes.extend([(w(1000), w(2048)), (w(1000),)])
    inv.extend([False, False])
    return shapes, inv


def _transformer(scale: float) -> tuple[list[Shape], list[bool]]:
    # Pre-LN block: LN -> qkv -> attention -> proj, LN -> fc1 -> GELU -> fc2. No weight is followed by a
    # normalization of its own output, so nothing is scale-invariant (the "neither view" path).
    d = max(8, 8 * round(1024 * math.sqrt(scale) / 8))
    f = 4 * d
    shapes: list[Shape] = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (f, d), (f,), (d, f), (d,)]
    return shapes, [False] * len(shapes)


def _small(scale: float) -> tuple[list[Shape], list[bool]]:
    count = max(1, round(2000 * scale))
    shapes: list[Shape] = []
    inv: list[bool] = []
    for i in range(count):
        n = 1024 + (i * 1543) % 3073  # 1,024 .. 4,096 elements
        if i % 5 == 4:
            shapes.append((n,))
            inv.append(False)
        else:
            rows = (8, 16, 32, 64)[i % 4]  # divides 1024, so rows * (n // rows) stays >= 1024
            shapes.append((rows, n // rows))
            inv.append(i % 2 == 0)
    return shapes, inv


def _large(scale: float) -> tuple[list[Shape], list[bool]]:
    side = _width(8192, scale)
    return [(side, side)], [True]


_BUILDERS = {
    "resnet50": (_resnet50, "ResNet-50 params (convs, BatchNorm affine, fc)"),
    "transformer": (_transformer, "one pre-LN transformer block with LayerNorm (d_model 1024, MLP 4096)"),
    "small": (_small, "2,000 small tensors of 1-4k elements"),
    "large": (_large, "one 64M-element 8192x8192 tensor"),
}


def get_workload(name: str, scale: float | None = None) -> Workload:
    """The workload ``name`` (one of :data:`WORKLOAD_NAMES`) at ``scale`` (see :func:`bench_scale`)."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown workload: {name!r} (choose from {', '.join(WORKLOAD_NAMES)})")
    s = bench_scale(scale)
    build, description = _BUILDERS[name]
    shapes, inv = build(s)
    return Workload(name, s, description, tuple(shapes), tuple(inv))


def host_data(workload: Workload, seed: int = 0, dtype: str = "float32") -> tuple[list[Any], list[Any]]:
    """NumPy ``(params, grads)`` for ``workload``, reproducible from ``seed``.

    Scale-invariant tensors get a gradient orthogonal to the weight row by row (what BatchNorm
    produces, so AdamP/SGDP project on the channel view); the others get a gradient with a radial
    part (``|cos| ~ 0.7``, nothing is projected). Both branches cost the same in ``adamp_core`` (the
    decision is an ``xp.where``); the official code does less work when the channel view fires.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    params, grads = [], []
    for shape, inv in zip(workload.shapes, workload.invariant, strict=True):
        w = rng.standard_normal(shape, dtype=np.float32)
        g = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) > 1:
            w2, g2 = w.reshape(shape[0], -1), g.reshape(shape[0], -1)  # views: edits land in g
            if inv:
                g2 -= w2 * (np.einsum("ij,ij->i", w2, g2) / np.einsum("ij,ij->i", w2, w2))[:, None]
            else:
                g2 += w2
        params.append(w.astype(dtype, copy=False))
        grads.append((g * np.float32(1e-2)).astype(dtype, copy=False))
    return params, grads

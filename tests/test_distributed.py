"""adamp_torch under torch.distributed: DDP, FSDP2 (DTensor params sharded on dim 0), HSDP, ZeRO,
DCP checkpoints and DTensor placements, each against single-process training on the same data.

One group of 2 processes (gloo on CPU) is spawned once for the module and runs every scenario in
turn; rank 0 saves each scenario's full (unsharded) params and optimizer state to a folder, and the
tests compare them here, in the parent, with the same model trained by one process on the whole
global batch. float64 throughout, so "equal" means within 1e-10 relative after several steps.

The network makes all three outcomes of the scale-invariance test happen on sharded tensors:
``conv1`` is followed by GroupNorm(5, 5) (scale-invariant per output channel: the channel view
fires), ``conv2`` by GroupNorm(2, 4) (invariant only to scaling the whole weight: the layer view
fires), ``fc1`` by nothing (neither fires). With 2 ranks the rows split unevenly:
``conv1`` (5 rows) 3 + 2, ``fc1`` (3 rows) 2 + 1, and ``fc2`` (1 row) 1 + 0, an empty shard.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import adamp_core as ac
import adamp_torch
from adamp_xp.testing.oracle import make_grad

WORLD = 2
STEPS = 6
BATCH = 8  # global batch; each rank takes BATCH // WORLD samples
TOL = 1e-10
SPAWN_TIMEOUT_S = 240  # the whole group of scenarios; a hung collective fails the tests instead of hanging
PG_TIMEOUT_S = 60
F64 = torch.float64
KW = {
    "adamp": dict(lr=1e-2, weight_decay=0.1),
    "sgdp": dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
}
STATE_KEYS = {"adamp": ("exp_avg", "exp_avg_sq"), "sgdp": ("momentum",)}
OPTIMIZERS = {"adamp": adamp_torch.AdamP, "sgdp": adamp_torch.SGDP}
# Cautious AdamP/SGDP (caution=True; SGDP as timm steps it, project_buffer=False): the mask's kept fraction is
# a mean over the whole tensor, which the shards of a split tensor must combine (FSDP2 below).
CAUTIOUS = {"cadamp": "adamp", "csgdp": "sgdp"}
KW["cadamp"] = dict(KW["adamp"], caution=True)
KW["csgdp"] = dict(KW["sgdp"], caution=True, project_buffer=False)
for _c, _base in CAUTIOUS.items():
    STATE_KEYS[_c] = STATE_KEYS[_base]


def _optimizer(name: str, optimizers: dict | None = None):
    """The class that runs ``name`` (a cautious name runs its base class with KW's options)."""
    return (optimizers or OPTIMIZERS)[CAUTIOUS.get(name, name)]


def _skip_reason() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend of torch.distributed is not available"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _has(module: str, name: str) -> bool:
    try:
        return hasattr(__import__(module, fromlist=[name]), name)
    except ImportError:
        return False


HAS_FSDP2 = _has("torch.distributed.fsdp", "fully_shard")
HAS_ZERO = _has("torch.distributed.optim", "ZeroRedundancyOptimizer")
HAS_DCP = _has("torch.distributed.checkpoint.state_dict", "get_optimizer_state_dict")


# -- the model and the data (identical in every process) ----------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, bias=False)
        self.gn1 = nn.GroupNorm(5, 5)  # one channel per group: conv1 is scale-invariant per row
        self.conv2 = nn.Conv2d(5, 4, 3, bias=False)
        self.gn2 = nn.GroupNorm(2, 4)  # two channels per group: conv2 is scale-invariant as a whole only
        self.fc1 = nn.Linear(4 * 4 * 4, 3)
        self.fc2 = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().to(F64)


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 3, 8, 8, generator=gen, dtype=F64), torch.randn(BATCH, 1, generator=gen, dtype=F64))
        for _ in range(steps)
    ]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)  # a mean over the batch: equal shards average to the global loss


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list, rank: int = 0, world: int = 1) -> None:
    n = BATCH // world
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]).backward()
        opt.step()


# -- the worker: every scenario, in every process ------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered when it is a DTensor), detached, on the CPU."""
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().cpu().clone()


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer, name: str) -> dict:
    keys = STATE_KEYS[name]
    params = {n: _full(p) for n, p in model.named_parameters()}
    state = {n: {k: _full(opt.state[p][k]) for k in keys} for n, p in model.named_parameters() if p in opt.state}
    return {"params": params, "state": state}


def _fsdp(model: nn.Module, mesh=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for mod in (model.conv1, model.conv2, model.fc1, model.fc2):
        fully_shard(mod, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def scenario_ddp(name: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    opt = OPTIMIZERS[name](model.parameters(), **KW[name])
    train(model, opt, batches(), rank, WORLD)
    return _snapshot(model.module, opt, name)


def scenario_fsdp2(name: str, rank: int) -> dict:
    model = _fsdp(make_net())
    placements = {n: tuple(p.placements) for n, p in model.named_parameters()}
    local_rows = {n: int(p.to_local().shape[0]) for n, p in model.named_parameters()}
    opt = _optimizer(name)(model.parameters(), **KW[name])
    train(model, opt, batches(), rank, WORLD)
    out = _snapshot(model, opt, name)
    out["placements"] = {n: [repr(pl) for pl in v] for n, v in placements.items()}
    out["local_rows"] = [None] * WORLD
    dist.all_gather_object(out["local_rows"], local_rows)
    return out


def scenario_hsdp(name: str, rank: int, shape: tuple[int, int]) -> dict:
    """HSDP: a 2-d mesh (replicate, shard). Shape (1, 2) shards over both ranks; (2, 1) replicates."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    model = _fsdp(make_net(), mesh=mesh)
    opt = OPTIMIZERS[name](model.parameters(), **KW[name])
    train(model, opt, batches(), rank, WORLD)
    out = _snapshot(model, opt, name)
    out["placements"] = {n: [repr(pl) for pl in p.placements] for n, p in model.named_parameters()}
    return out


def scenario_zero(name: str, rank: int) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=OPTIMIZERS[name], **KW[name])
    train(model, opt, batches(), rank, WORLD)
    opt.consolidate_state_dict(to=0)
    out = {"params": {n: _full(p) for n, p in model.module.named_parameters()}}
    if rank == 0:  # the consolidated state is indexed like model.parameters()
        sd = opt.state_dict()
        names = [n for n, _ in model.module.named_parameters()]
        out["state"] = {names[i]: {k: st[k].clone() for k in STATE_KEYS[name]} for i, st in sd["state"].items()}
        out["steps"] = sorted({st["step"] for st in sd["state"].values()}) if name == "adamp" else None
    return out


def scenario_fsdp2_checkpoint(name: str, rank: int) -> dict:
    """Train half the steps, move model and optimizer state through torch.distributed.checkpoint's
    state-dict API into a fresh FSDP2 model and optimizer, train the other half."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    data = batches()
    model = _fsdp(make_net())
    opt = OPTIMIZERS[name](model.parameters(), **KW[name])
    train(model, opt, data[: STEPS // 2], rank, WORLD)
    model_sd, optim_sd = get_state_dict(model, opt)
    model2 = _fsdp(make_net())
    opt2 = OPTIMIZERS[name](model2.parameters(), **KW[name])
    set_state_dict(model2, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train(model2, opt2, data[STEPS // 2 :], rank, WORLD)
    return _snapshot(model2, opt2, name)


REGIMES = ("channel", "layer", "none", "last_rows", "near_threshold")


def grad_for(w: np.ndarray, regime: str, rng: np.random.Generator) -> np.ndarray:
    """A gradient for ``w``: the oracle's regimes (channel / layer / neither view scale-invariant),
    and two that catch statistics reduced over one shard's rows instead of all of them:

    - ``last_rows``: every row orthogonal to its weight row except the last two (on the last rank),
      one aligned and one anti-aligned so that the whole tensor stays orthogonal: the channel view
      must not fire (max over all rows), the layer view must;
    - ``near_threshold``: rows aligned, and the whole tensor's cosine 1.2 times the layer threshold
      ``delta / sqrt(size)`` of the whole tensor: neither view fires, but a shard's size would give a
      threshold above the cosine.
    """
    if w.ndim <= 1 or w.shape[0] < 2 or regime in REGIMES[:3]:
        return make_grad(w, regime if regime in REGIMES[:3] else "none", rng)
    rows = w.reshape(w.shape[0], -1)
    if regime == "last_rows":
        g = make_grad(w, "channel", rng).reshape(rows.shape)
        a = 3.0 * np.linalg.norm(g[-1]) / np.linalg.norm(rows[-1])
        g[-1] += a * rows[-1]
        g[-2] -= a * np.sum(rows[-1] ** 2) / np.sum(rows[-2] ** 2) * rows[-2]
        return g.reshape(w.shape)
    g0 = make_grad(w, "layer", rng)
    t = 1.2 * 0.1 / np.sqrt(w.size)
    c = t * np.linalg.norm(g0) / (np.linalg.norm(w) * np.sqrt(1 - t * t))
    return g0 + c * w


def _decision(p, g) -> int:
    """The view this rank's optimizer step decides for DTensor ``p`` with grad ``g``: the same call
    into the core as the step (local rows and their reductions, or the DTensors themselves)."""
    from adamp_core.projection import decide_view, row_stats
    from adamp_torch._base import XP
    from adamp_torch._distributed import local_shards

    w, g, _, rows = local_shards(p, g)
    dec = decide_view(XP, w, row_stats(XP, w, g), 0.1, torch.tensor(1e-8, dtype=w.dtype), rows)
    channel, layer = bool(_full(dec.channel)), bool(_full(dec.layer))
    return ac.VIEW_CHANNEL if channel else ac.VIEW_LAYER if layer else ac.VIEW_NONE


PLACEMENT_CASES = [  # (shape, "param[/grad] placement"); 5 and 1 rows split unevenly over 2 ranks (1 + 0: empty)
    ((5, 3, 3, 3), "S0"),
    ((1, 6), "S0"),
    ((4, 6), "S0"),
    ((7,), "S0"),
    ((4, 6), "S1"),  # tensor parallel's RowwiseParallel shards a Linear weight on dim 1
    ((3, 4, 2), "R"),
    ((5, 4), "S0/R"),  # param Shard(0), grad Replicate: the step redistributes the grad to the param's placement
]


def scenario_placements(name: str, rank: int) -> dict:
    """The optimizer on DTensor params built directly with each placement, gradients cycling through
    :data:`REGIMES`; against the same optimizer on plain tensors. Records the view each rank decides
    (it must be the same on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    placement = {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}
    out: dict = {"cases": []}
    for shape, pl in PLACEMENT_CASES:
        p_pl, g_pl = (pl.split("/") * 2)[:2]
        rng = np.random.default_rng(len(shape) + sum(shape))
        init = torch.from_numpy(rng.standard_normal(shape))
        plain = nn.Parameter(init.clone())
        sharded = nn.Parameter(distribute_tensor(init.clone(), mesh, [placement[p_pl]]))
        opt_plain = OPTIMIZERS[name]([plain], **KW[name])
        opt_sharded = OPTIMIZERS[name]([sharded], **KW[name])
        views, views_sharded = [], []
        for t in range(2 * len(REGIMES)):
            g = torch.from_numpy(grad_for(plain.detach().numpy(), REGIMES[t % len(REGIMES)], rng))
            plain.grad = g.clone()
            sharded.grad = distribute_tensor(g.clone(), mesh, [placement[g_pl]])
            views.append(int(ac.projected_view(plain.detach(), plain.grad)))
            views_sharded.append(_decision(sharded.detach(), sharded.grad))
            opt_plain.step()
            opt_sharded.step()
        # A plain-tensor grad for a DTensor param is refused, naming both, before anything changes.
        before = _full(sharded)
        sharded.grad = g.clone()
        try:
            opt_sharded.step()
            refused = ""
        except TypeError as exc:
            refused = str(exc)
        unchanged = torch.equal(_full(sharded), before)
        sharded.grad = None
        every_rank, local_shapes = [None] * WORLD, [None] * WORLD
        dist.all_gather_object(every_rank, views_sharded)
        dist.all_gather_object(local_shapes, tuple(sharded.to_local().shape))
        out["cases"].append(
            {
                "shape": shape,
                "placement": pl,
                "local_shapes": local_shapes,
                "views": views,
                "views_every_rank": every_rank,
                "plain": plain.detach().clone(),
                "sharded": _full(sharded),
                "plain_state": {k: opt_plain.state[plain][k].clone() for k in STATE_KEYS[name]},
                "sharded_state": {k: _full(opt_sharded.state[sharded][k]) for k in STATE_KEYS[name]},
                "sharded_state_placements": [str(opt_sharded.state[sharded][k].placements) for k in STATE_KEYS[name]],
                "param_placements": str(sharded.placements),
                "plain_grad_refused": refused,
                "unchanged_after_refusal": unchanged,
            }
        )
    return out


def scenario_fsdp1_warns(name: str, rank: int) -> dict:
    """FSDP1 (use_orig_params=False) hands the optimizer 1-d flat shards: no rows, no projection. Warn."""
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = FullyShardedDataParallel(make_net(), use_orig_params=False, device_id=torch.device("cpu"))
        opt = OPTIMIZERS[name](model.parameters(), **KW[name])
        train(model, opt, batches()[:1], rank, WORLD)
    return {"warnings": [str(w.message) for w in caught if "FlatParameter" in str(w.message)]}


def _scenarios() -> list[tuple[str, object, tuple]]:
    out: list[tuple[str, object, tuple]] = []
    for name in OPTIMIZERS:
        out.append((f"ddp-{name}", scenario_ddp, (name,)))
        if HAS_FSDP2:
            out.append((f"fsdp2-{name}", scenario_fsdp2, (name,)))
            out.append((f"placements-{name}", scenario_placements, (name,)))
        if HAS_ZERO:
            out.append((f"zero-{name}", scenario_zero, (name,)))
    if HAS_FSDP2:
        out += [(f"fsdp2-{name}", scenario_fsdp2, (name,)) for name in CAUTIOUS]
        out.append(("hsdp-1x2-adamp", scenario_hsdp, ("adamp", (1, 2))))
        out.append(("hsdp-2x1-sgdp", scenario_hsdp, ("sgdp", (2, 1))))
        if HAS_DCP:
            out.append(("fsdp2-checkpoint-adamp", scenario_fsdp2_checkpoint, ("adamp",)))
    if _has("torch.distributed.fsdp", "FullyShardedDataParallel"):
        out.append(("fsdp1-warns-sgdp", scenario_fsdp1_warns, ("sgdp",)))
    return out


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    """Every scenario in turn. Rank 0 saves each result; a rank that fails saves its traceback and
    exits, which ends the other rank's pending collective at once (no wait for a timeout)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        for key, fn, args in _scenarios():
            try:
                result = fn(args[0], rank, *args[1:])
            except Exception:
                torch.save(
                    {"error": f"rank {rank}: {traceback.format_exc()}"}, os.path.join(outdir, f"{key}.err{rank}")
                )
                raise
            if rank == 0:
                torch.save(result, os.path.join(outdir, f"{key}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every scenario once in 2 spawned processes (bounded by SPAWN_TIMEOUT_S); a dict
    scenario -> what rank 0 saved, or {"error": ...} for a scenario that failed or never ran."""
    import torch.multiprocessing as mp

    outdir = str(tmp_path_factory.mktemp("distributed"))
    ctx = mp.start_processes(
        _worker, args=(WORLD, _free_port(), outdir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    failure = ""
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                failure = f"the {WORLD} workers did not finish within {SPAWN_TIMEOUT_S} s"
                break
    except Exception as exc:  # a worker raised or died: its scenario's traceback is in outdir
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        for proc in ctx.processes:  # only the processes started here
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    out = {}
    for key, _, _ in _scenarios():
        path = os.path.join(outdir, f"{key}.pt")
        errors = [
            torch.load(os.path.join(outdir, f"{key}.err{r}"), weights_only=False)["error"]
            for r in range(WORLD)
            if os.path.exists(os.path.join(outdir, f"{key}.err{r}"))
        ]
        if errors:
            out[key] = {"error": "\n".join(errors)}
        elif os.path.exists(path):
            out[key] = torch.load(path, weights_only=False)
        else:
            out[key] = {"error": f"did not run: {failure or 'no result saved'}"}
    return out


def _result(results: dict, key: str) -> dict:
    if key not in results:
        pytest.skip(f"{key}: not available in this torch build")
    res = results[key]
    assert "error" not in res, res.get("error")
    return res


# -- the single-process reference ----------------------------------------------------------------------
_SINGLE: dict = {}


def single(name: str, optimizers: dict | None = None) -> dict:
    """The same model trained by one process on the whole global batch; also the view each weight took."""
    if optimizers is not None:  # another implementation (the official one), not cached
        _SINGLE.pop(("other", name), None)
    key = name if optimizers is None else ("other", name)
    if key not in _SINGLE:
        model = make_net()
        kw = KW[name] if optimizers is None else {k: v for k, v in KW[name].items() if k != "project_buffer"}
        opt = _optimizer(name, optimizers)(model.parameters(), **kw)
        views: dict[str, list[int]] = {n: [] for n, p in model.named_parameters()}
        for x, y in batches():
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            kw = KW[name]
            for n, p in model.named_parameters():
                views[n].append(int(ac.projected_view(p.detach(), p.grad, kw.get("delta", 0.1), kw.get("eps", 1e-8))))
            opt.step()
        _SINGLE[key] = {**_snapshot(model, opt, name), "views": views}
    return _SINGLE[key]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (normwise)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max())


def assert_matches_single(res: dict, name: str, *, state: bool = True) -> None:
    ref = single(name)
    errs = {n: rel(res["params"][n], ref["params"][n]) for n in ref["params"]}
    assert max(errs.values()) < TOL, errs
    # The runs actually moved the weights (a no-op optimizer would not pass for a wrong reason).
    init = dict(make_net().named_parameters())
    assert all(rel(ref["params"][n], init[n].detach()) > 1e-4 for n in ref["params"])
    if state:
        assert set(res["state"]) == set(ref["state"])
        serrs = {(n, k): rel(v, ref["state"][n][k]) for n, st in res["state"].items() for k, v in st.items()}
        assert max(serrs.values()) < TOL, serrs


# -- tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_single_process_run_uses_both_views(name):
    """The reference run projects conv1 on the channel view at every step, conv2 at every step and on
    the layer view at most steps (its rows are not scale-invariant one by one, but a row's cosine can
    fall below the threshold by chance), and fc1 never: the distributed runs below are compared where
    every outcome of the test occurs."""
    views = single(name)["views"]
    assert views["conv1.weight"] == [ac.VIEW_CHANNEL] * STEPS
    assert set(views["conv2.weight"]) <= {ac.VIEW_CHANNEL, ac.VIEW_LAYER}
    assert views["conv2.weight"].count(ac.VIEW_LAYER) > STEPS // 2
    assert views["fc1.weight"] == [ac.VIEW_NONE] * STEPS


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_single_process_reference_equals_official_adamp(name):
    """The reference the distributed runs are held to is itself adamp==0.3.0's trajectory."""
    adamp = pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")
    official = single(name, {"adamp": adamp.AdamP, "sgdp": adamp.SGDP})
    ours = single(name)
    errs = {n: rel(ours["params"][n], official["params"][n]) for n in ours["params"]}
    assert max(errs.values()) < TOL, errs
    assert ours["views"] == official["views"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_equals_single_process(results, name):
    assert_matches_single(_result(results, f"ddp-{name}"), name)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_equals_single_process(results, name):
    res = _result(results, f"fsdp2-{name}")
    # Every param is a DTensor sharded on dim 0, and rows split unevenly (fc2's single row: 1 + 0).
    assert all(v == ["Shard(dim=0)"] for v in res["placements"].values()), res["placements"]
    rows = res["local_rows"]
    assert [r["conv1.weight"] for r in rows] == [3, 2]
    assert [r["fc1.weight"] for r in rows] == [2, 1]
    assert [r["fc2.weight"] for r in rows] == [1, 0]
    assert_matches_single(res, name)


@pytest.mark.parametrize("name", list(CAUTIOUS))
def test_single_process_cautious_reference_equals_timm(name):
    """The cautious runs' reference is timm 1.0.31's cautious AdamP/SGDP, and the mask changed the run."""
    from adamp_xp.testing.timm_reference import timm_optimizers

    try:
        timm_adamp, timm_sgdp = timm_optimizers()
    except ImportError as exc:  # pragma: no cover - CI installs timm
        pytest.skip(str(exc))
    theirs = single(name, {"adamp": timm_adamp, "sgdp": timm_sgdp})
    ours, plain = single(name), single(CAUTIOUS[name])
    errs = {n: rel(ours["params"][n], theirs["params"][n]) for n in ours["params"]}
    assert max(errs.values()) < TOL, errs
    assert max(rel(ours["params"][n], plain["params"][n]) for n in ours["params"]) > 1e-3


@pytest.mark.parametrize("name", list(CAUTIOUS))
def test_fsdp2_cautious_equals_single_process(results, name):
    """Rows split over 2 processes (conv1 3 + 2, fc2 1 + 0): every rank masks with the whole tensor's kept
    fraction, so the run equals one process's."""
    assert_matches_single(_result(results, f"fsdp2-{name}"), name)


@pytest.mark.parametrize("key", ["hsdp-1x2-adamp", "hsdp-2x1-sgdp"])
def test_hsdp_equals_single_process(results, key):
    res = _result(results, key)
    assert all(v == ["Replicate()", "Shard(dim=0)"] for v in res["placements"].values()), res["placements"]
    assert_matches_single(res, key.rsplit("-", 1)[1])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_redundancy_optimizer_equals_single_process(results, name):
    res = _result(results, f"zero-{name}")
    assert_matches_single(res, name)
    if name == "adamp":  # the consolidated state_dict stores adamp 0.3.0's int step
        assert res["steps"] == [STEPS]


def test_fsdp2_checkpoint_round_trip_equals_single_process(results):
    assert_matches_single(_result(results, "fsdp2-checkpoint-adamp"), "adamp")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dtensor_placements_equal_plain_tensors(results, name):
    """Shard(0) (even, uneven and with an empty shard), Shard(1) and Replicate DTensors take the same
    steps as plain tensors, and every rank takes the same decision, which is the full tensor's."""
    cases = _result(results, f"placements-{name}")["cases"]
    assert [(c["shape"], c["placement"]) for c in cases] == PLACEMENT_CASES
    seen = set()
    for c in cases:
        label = f"{c['shape']} {c['placement']}"
        assert c["views_every_rank"] == [c["views"]] * WORLD, label
        seen.update(c["views"])
        if len(c["shape"]) > 1 and c["shape"][0] > 1:  # the views the regimes are built to give
            expected = [ac.VIEW_CHANNEL, ac.VIEW_LAYER, ac.VIEW_NONE, ac.VIEW_LAYER, ac.VIEW_NONE] * 2
            assert c["views"] == expected, label
        assert c["param_placements"] == str(
            {"S0": "(Shard(dim=0),)", "S1": "(Shard(dim=1),)", "R": "(Replicate(),)"}[c["placement"].split("/")[0]]
        ), label
        assert "grad" in c["plain_grad_refused"] and "DTensor" in c["plain_grad_refused"], label
        assert c["unchanged_after_refusal"], label
        assert all(p == c["param_placements"] for p in c["sharded_state_placements"]), label
        assert rel(c["sharded"], c["plain"]) < TOL, label
        for k, v in c["sharded_state"].items():
            assert rel(v, c["plain_state"][k]) < TOL, (label, k)
    assert seen == {ac.VIEW_NONE, ac.VIEW_CHANNEL, ac.VIEW_LAYER}
    shapes = {(c["shape"], c["placement"]): c["local_shapes"] for c in cases}
    assert shapes[((5, 3, 3, 3), "S0")] == [(3, 3, 3, 3), (2, 3, 3, 3)]
    assert shapes[((1, 6), "S0")] == [(1, 6), (0, 6)]
    assert shapes[((4, 6), "S1")] == [(4, 3), (4, 3)]


def test_fsdp1_flat_params_warn(results):
    """FSDP1's flat params cannot be projected: the optimizer says so (and points to FSDP2)."""
    from adamp_torch._distributed import FSDP1_WARNING

    assert _result(results, "fsdp1-warns-sgdp")["warnings"] == [FSDP1_WARNING]

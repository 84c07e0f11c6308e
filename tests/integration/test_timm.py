"""timm's optimizer registry and adamp_torch: ``create_optimizer_v2(model, "adampxp")`` builds our class with
timm's param groups, and its steps match timm's own bundled AdamP/SGDP under the same hyperparameters.

timm without torchvision: ``import timm`` imports torchvision (timm.layers, timm.data), and PyPI's
torchvision wheel does not load beside the CPU torch (its _C.so links libtorch_cuda: ``operator
torchvision::nms does not exist``), so CI installs timm with ``--no-deps`` and no torchvision. timm.optim
itself needs only torch and, from the rest of timm, one function: ``timm.models.group_parameters``
(timm/models/_manipulate.py, which needs ``timm.layers.use_reentrant_ckpt``, timm/layers/config.py; for
layer-wise lr decay). The ``timm_optim`` fixture uses ``import timm`` when it works; else it puts the
packages ``timm``, ``timm.layers`` and ``timm.models`` into ``sys.modules`` as empty packages over the
installed folders (their ``__init__.py`` not run) holding those two functions, imports ``timm.optim``
normally, checks that nothing else of timm was imported, and removes it all afterwards.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import adamp
import pytest
import torch

import adamp_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What timm.optim may import of timm when timm's package __init__ (torchvision) is bypassed.
ALLOWED = {"timm", "timm.layers", "timm.layers.config", "timm.models", "timm.models._manipulate"}


def _timm_modules() -> set[str]:
    return {k for k in sys.modules if k == "timm" or k.startswith("timm.")}


@pytest.fixture(scope="module")
def timm_optim():
    before = _timm_modules()
    try:
        import timm  # noqa: F401

        stubbed = False
    except (ImportError, RuntimeError):  # no torchvision, or one built for another torch
        stubbed = True
        for name in _timm_modules():  # what the failed import left half-done
            del sys.modules[name]
        root = Path(importlib.util.find_spec("timm").submodule_search_locations[0])
        for name in ("timm", "timm.layers", "timm.models"):
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
            if "." in name:
                setattr(sys.modules["timm"], name.split(".")[1], package)
        sys.modules["timm.layers"].use_reentrant_ckpt = importlib.import_module("timm.layers.config").use_reentrant_ckpt
        sys.modules["timm.models"].group_parameters = importlib.import_module(
            "timm.models._manipulate"
        ).group_parameters
    module = importlib.import_module("timm.optim")
    if stubbed:
        others = {k for k in _timm_modules() if not k.startswith("timm.optim")} - ALLOWED
        assert not others, f"timm.optim imported more of timm than the loader provides: {sorted(others)}"
    yield module
    if stubbed:  # leave sys.modules as it was: a later `import timm` fails as it did before
        for name in _timm_modules() - before:
            del sys.modules[name]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)


def _train(model, optimizer, steps=6):
    for t in range(steps):
        x, y = _batch(t)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_registry_builds_ours_with_timm_param_groups(timm_optim, run_recipe):
    ns = run_recipe("timm")
    model, opt = ns["model"], ns["optimizer"]
    assert type(opt) is adamp_torch.AdamP
    assert isinstance(timm_optim.get_optimizer_class("adampxp", bind_defaults=False), type)
    sgdp = timm_optim.create_optimizer_v2(model, "sgdpxp", lr=0.1, weight_decay=1e-4)
    assert type(sgdp) is adamp_torch.SGDP
    # timm's groups (its own function is the reference): weight decay only for params with ndim > 1
    ref = timm_optim.param_groups_weight_decay(model, weight_decay=0.05)
    for built, wd in ((opt, 0.05), (sgdp, 1e-4)):
        assert len(built.param_groups) == len(ref) == 2
        for g, r in zip(built.param_groups, ref, strict=True):
            assert [id(p) for p in g["params"]] == [id(p) for p in r["params"]]
            assert g["weight_decay"] == (0.0 if r["weight_decay"] == 0.0 else wd)
            assert all(p.ndim <= 1 for p in g["params"]) == (g["weight_decay"] == 0.0)
    # our defaults are adamp 0.3.0's; timm's registry adds its momentum default (0.9) for SGD types
    official = adamp.AdamP(model.parameters()).defaults
    assert all(opt.defaults[k] == v for k, v in official.items() if k != "weight_decay"), opt.defaults
    assert sgdp.defaults["momentum"] == 0.9 and sgdp.defaults["nesterov"] is False


@pytest.mark.parametrize(
    "kwargs",
    [dict(wd_ratio=0.01, nesterov=True), dict(wd_ratio=0.1, nesterov=False)],
    ids=["timm_defaults", "official_defaults"],
)
def test_adampxp_matches_timm_adamp(timm_optim, run_recipe, kwargs):
    ns = run_recipe("timm")
    ours_model, timm_model = ns["make_model"](), ns["make_model"]()
    ours = timm_optim.create_optimizer_v2(ours_model, "adampxp", lr=1e-2, weight_decay=0.05, **kwargs)
    theirs = timm_optim.create_optimizer_v2(timm_model, "adamp", lr=1e-2, weight_decay=0.05, **kwargs)
    assert type(theirs) is not type(ours) and type(theirs).__module__ == "timm.optim.adamp"
    init = copy.deepcopy(ours_model)
    _train(ours_model, ours)
    _train(timm_model, theirs)
    for (name, p), q, p0 in zip(ours_model.named_parameters(), timm_model.parameters(), init.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p, p0), name


# timm's SGDP differs from adamp 0.3.0 in one case: without nesterov it projects a copy of the momentum
# buffer (paper, Algorithm 1), while adamp 0.3.0 (and so ours) projects the stored buffer in place. With
# nesterov, or momentum 0 (the buffer is rebuilt from the gradient each step), the two coincide.
@pytest.mark.parametrize(
    "kwargs", [dict(momentum=0.9, nesterov=True), dict(momentum=0.0, nesterov=False)], ids=["nesterov", "no_momentum"]
)
def test_sgdpxp_matches_timm_sgdp(timm_optim, run_recipe, kwargs):
    ns = run_recipe("timm")
    ours_model, timm_model = ns["make_model"](), ns["make_model"]()
    ours = timm_optim.create_optimizer_v2(ours_model, "sgdpxp", lr=0.1, weight_decay=1e-4, **kwargs)
    theirs = timm_optim.create_optimizer_v2(timm_model, "sgdp", lr=0.1, weight_decay=1e-4, **kwargs)
    assert type(theirs).__module__ == "timm.optim.sgdp" and type(ours) is adamp_torch.SGDP
    init = copy.deepcopy(ours_model)
    _train(ours_model, ours)
    _train(timm_model, theirs)
    for (name, p), q, p0 in zip(ours_model.named_parameters(), timm_model.parameters(), init.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p, p0), name


def test_sgdpxp_follows_adamp_0_3_0_where_timm_differs(timm_optim, run_recipe):
    """momentum 0.9 without nesterov: ours matches adamp 0.3.0 (the in-place projected buffer), not timm."""
    ns = run_recipe("timm")
    models = [ns["make_model"]() for _ in range(3)]
    kw = dict(lr=0.1, weight_decay=1e-4, momentum=0.9, nesterov=False)
    ours = timm_optim.create_optimizer_v2(models[0], "sgdpxp", **kw)
    theirs = timm_optim.create_optimizer_v2(models[1], "sgdp", **kw)
    official = adamp.SGDP(timm_optim.param_groups_weight_decay(models[2], weight_decay=1e-4), lr=0.1, momentum=0.9)
    for m, o in zip(models, (ours, theirs, official), strict=True):
        _train(m, o)
    conv = [m[0].weight for m in models]  # the projected (scale-invariant) weight
    torch.testing.assert_close(conv[0], conv[2], rtol=1e-5, atol=1e-6)
    assert (conv[0] - conv[1]).abs().max() > 1e-4  # timm's copy-then-project takes another path


@pytest.mark.parametrize(
    "name,kwargs",
    [("adamp", dict(lr=1e-2, weight_decay=0.05, wd_ratio=0.01, nesterov=True)),
     ("adamp", dict(lr=1e-2, weight_decay=0.05, wd_ratio=0.1, nesterov=False)),  # over timm's registry defaults
     ("sgdp", dict(lr=0.1, weight_decay=1e-4, nesterov=True)),
     ("sgdp", dict(lr=0.1, weight_decay=1e-4, nesterov=False))],
    ids=["adamp_timm_defaults", "adamp_official_defaults", "sgdp_nesterov", "sgdp_alg1"],
)
def test_cautious_entries_match_timm_cautious(timm_optim, run_recipe, name, kwargs):
    """``cadampxp``/``csgdpxp`` (the recipe) against timm's own ``cadamp``/``csgdp`` (caution=True), same
    hyperparameters, through ``create_optimizer_v2``; without nesterov SGDP's buffer is timm's (Alg. 1)."""
    ns = run_recipe("timm")
    ours_model, timm_model, plain_model = ns["make_model"](), ns["make_model"](), ns["make_model"]()
    ours = timm_optim.create_optimizer_v2(ours_model, f"c{name}xp", **kwargs)
    theirs = timm_optim.create_optimizer_v2(timm_model, f"c{name}", **kwargs)
    plain = timm_optim.create_optimizer_v2(plain_model, f"{name}xp", **kwargs)
    assert all(g["caution"] is True for g in ours.param_groups) and type(theirs).__module__.startswith("timm.optim")
    _train(ours_model, ours)
    _train(timm_model, theirs)
    _train(plain_model, plain)
    for (n, p), q in zip(ours_model.named_parameters(), timm_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert max((p - q).abs().max() for p, q in zip(ours_model.parameters(), plain_model.parameters(), strict=True)) > 1e-4

"""One spec per optimizer (``adamp_core.optimizers``): every public signature takes its hyperparameters,
in the spec's order and with the spec's defaults, and the spec is the official ``adamp==0.3.0``'s."""

from __future__ import annotations

import inspect

import pytest

import adamp_core as ac
from adamp_core import hyperparams, tree
from adamp_core.optimizers import ADAMP, REQUIRED, SGDP

SPECS = {"adamp": ADAMP, "sgdp": SGDP}


def _hyper(func, skip: int, rename=None):
    """``{name: default}`` of ``func``'s positional-or-keyword parameters after the first ``skip``
    (REQUIRED for none), optax's names mapped to the official ones with ``rename``."""
    out = {}
    params = [p for p in inspect.signature(func).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    for p in params[skip:]:
        default = REQUIRED if p.default is p.empty or type(p.default).__name__ == "_RequiredParameter" else p.default
        out[p.name] = default
    return rename(out) if rename else out


def _official(name):
    adamp = pytest.importorskip("adamp")
    cls = adamp.AdamP if name == "adamp" else adamp.SGDP
    return _hyper(cls.__init__, 2)


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_spec_is_the_official_signature(name):
    assert list(SPECS[name].defaults.items()) == list(_official(name).items())


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_core_signatures_match_the_spec(name):
    spec = SPECS[name]
    want = list(spec.all_defaults.items())  # names, order and defaults: the official ones, then the options
    assert list(_hyper(getattr(ac, f"{name}_step"), 3).items()) == want
    assert list(_hyper(getattr(tree, f"{name}_step"), 3).items()) == want
    assert list(_hyper(getattr(hyperparams, f"check_{name}"), 0).items()) == want
    assert spec.state is getattr(ac, f"{name.replace('adamp', 'AdamP').replace('sgdp', 'SGDP')}State")


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_adapter_signatures_match_the_spec(name):
    spec = SPECS[name]
    adamp_torch = pytest.importorskip("adamp_torch")
    import adamp_array

    cls = spec.name
    assert list(_hyper(getattr(adamp_torch, cls).__init__, 2).items()) == list(spec.all_defaults.items())
    assert list(_hyper(getattr(adamp_array, cls).__init__, 2).items()) == list(spec.all_defaults.items())
    options = {"maximize", "state_dtype", "skip_nonfinite", "fused", "foreach"}
    torch_kw = {p.name for p in inspect.signature(getattr(adamp_torch, cls).__init__).parameters.values()
                if p.kind is p.KEYWORD_ONLY}
    array_kw = {p.name for p in inspect.signature(getattr(adamp_array, cls).__init__).parameters.values()
                if p.kind is p.KEYWORD_ONLY}
    # capturable: torch's option (CUDA graphs), the torch adapter's only
    assert torch_kw == options | {"capturable"} and array_kw == options - {"maximize"}


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_optax_signature_matches_the_spec_with_optax_names(name):
    pytest.importorskip("optax")
    import adamp_optax

    def official_names(h):  # optax's learning_rate and b1, b2 for lr and betas, in place
        out = {}
        for k, v in h.items():
            if k == "b2":
                out["betas"] = (out.pop("betas"), v)
            else:
                out[{"learning_rate": "lr", "b1": "betas"}.get(k, k)] = v
        return out

    got = _hyper(getattr(adamp_optax, name), 0, official_names)
    assert list(got.items()) == list(SPECS[name].all_defaults.items())

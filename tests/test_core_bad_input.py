"""Bad input: every case raises the documented error naming the parameter and value,
before anything is computed."""

from __future__ import annotations

import math

import numpy as np
import pytest

import adamp_core as ac

P = np.ones((3, 4))
G = np.full((3, 4), 0.5)

# (kwargs, error, message regex)
ADAMP_BAD = [
    (dict(lr=-1.0), ValueError, r"Invalid learning rate: -1\.0"),
    (dict(lr=math.nan), ValueError, r"Invalid learning rate: nan"),
    (dict(lr=math.inf), ValueError, r"Invalid learning rate: inf"),
    (dict(lr="0.1"), TypeError, r"Invalid learning rate: '0\.1'"),
    (dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08"),
    (dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1\.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1: -0\.1"),
    (dict(betas=(0.9, math.nan)), ValueError, r"Invalid beta parameter at index 1: nan"),
    (dict(betas=(0.9,)), ValueError, r"Invalid betas: \(0\.9,\)"),
    (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0\.1"),
    (dict(delta=-0.1), ValueError, r"Invalid delta value: -0\.1"),
    (dict(wd_ratio=-1.0), ValueError, r"Invalid wd_ratio value: -1\.0"),
    (dict(wd_ratio=math.nan), ValueError, r"Invalid wd_ratio value: nan"),
    (dict(nesterov=1), TypeError, r"Invalid nesterov value: 1"),
]

SGDP_BAD = [
    (dict(lr=-0.1), ValueError, r"Invalid learning rate: -0\.1"),
    (dict(lr=None), TypeError, r"Invalid learning rate: None"),
    (dict(lr=0.1, momentum=-0.9), ValueError, r"Invalid momentum value: -0\.9"),
    (dict(lr=0.1, momentum=math.nan), ValueError, r"Invalid momentum value: nan"),
    (dict(lr=0.1, dampening=math.nan), ValueError, r"Invalid dampening value: nan"),
    (dict(lr=0.1, weight_decay=-1.0), ValueError, r"Invalid weight_decay value: -1\.0"),
    (dict(lr=0.1, momentum=1.5), ValueError, r"Invalid momentum value: 1\.5 \(expected a number in \[0, 1\]\)"),
    (dict(lr=0.1, dampening=2.0), ValueError, r"Invalid dampening value: 2\.0 \(expected a number in \[0, 1\]\)"),
    (dict(lr=0.1, momentum=1.0, weight_decay=0.1), ValueError, r"Invalid momentum value: 1\.0 .*momentum must be < 1"),
    (dict(lr=0.1, eps=-1.0), ValueError, r"Invalid epsilon value: -1\.0"),
    (dict(lr=0.1, delta=math.nan), ValueError, r"Invalid delta value: nan"),
    (dict(lr=0.1, wd_ratio=-0.5), ValueError, r"Invalid wd_ratio value: -0\.5"),
]


@pytest.mark.parametrize("kwargs,error,match", ADAMP_BAD)
def test_adamp_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        ac.adamp_step(P, G, ac.adamp_init(P), **kwargs)
    with pytest.raises(error, match=match):
        ac.tree.adamp_step([P], [G], ac.tree.adamp_init([P]), **kwargs)


@pytest.mark.parametrize("kwargs,error,match", SGDP_BAD)
def test_sgdp_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        ac.sgdp_step(P, G, ac.sgdp_init(P), **kwargs)
    with pytest.raises(error, match=match):
        ac.tree.sgdp_step([P], [G], ac.tree.sgdp_init([P]), **kwargs)


def _torch(x):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.asarray(x))


# (param, grad, state-maker, error, message regex)
ARRAY_BAD = [
    (P, np.ones((4, 3)), None, ValueError, r"grad shape \(4, 3\) differs from param shape \(3, 4\)"),
    (P, np.ones((3, 4), dtype=np.int64), None, TypeError, r"grad dtype int64 is not real floating"),
    (P, np.ones((3, 4), dtype=np.complex128), None, TypeError, r"grad dtype complex128 is not real floating"),
    (np.ones((3, 4), dtype=np.int32), np.ones((3, 4)), None, TypeError, r"param must have a real floating dtype"),
    (np.ones(3, dtype=bool), np.ones(3), None, TypeError, r"param must have a real floating dtype, got bool"),
    ([1.0, 2.0], np.ones(2), None, TypeError, r"param must be an array, got list"),
    (P, None, None, TypeError, r"grad is None; a gradient is required"),
    (P, "torch", None, TypeError, r"grad comes from array library 'torch' but param from 'numpy'"),
    (P, G, lambda p: ac.sgdp_init(p), TypeError, r"state must be an AdamPState .*got SGDPState"),
    (P, G, lambda p: ac.adamp_init(np.ones((4, 3))), ValueError, r"state\.exp_avg shape \(4, 3\) differs"),
    (P, G, lambda p: ac.AdamPState(-1, *ac.adamp_init(p)[1:]), ValueError, r"Invalid state\.step: -1"),
    (P, G, lambda p: ac.AdamPState(np.zeros(()), *ac.adamp_init(p)[1:]), TypeError, r"state\.step dtype: float64"),
]


@pytest.mark.parametrize("param,grad,make_state,error,match", ARRAY_BAD)
def test_adamp_bad_arrays(param, grad, make_state, error, match):
    if isinstance(grad, str):
        grad = _torch(np.ones((3, 4)))
    state = (
        make_state(param)
        if make_state
        else (ac.adamp_init(param) if hasattr(param, "dtype") and np.issubdtype(param.dtype, np.floating) else None)
    )
    with pytest.raises(error, match=match):
        ac.adamp_step(param, grad, state)


def test_sgdp_wrong_state_and_init_dtype():
    with pytest.raises(TypeError, match=r"state must be an SGDPState .*got AdamPState"):
        ac.sgdp_step(P, G, ac.adamp_init(P), lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid state_dtype: 'float99'"):
        ac.sgdp_init(P, state_dtype="float99")
    with pytest.raises(ValueError, match=r"Invalid state_dtype: 'int32'"):
        ac.adamp_init(P, state_dtype="int32")


def test_grad_on_other_device_is_refused():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to have two devices")
    p = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"grad is on device cuda.* but param on cpu"):
        ac.adamp_step(p, torch.ones(3, 4, device="cuda"), ac.adamp_init(p))


def test_array_hyperparameter_must_be_scalar():
    with pytest.raises(ValueError, match=r"Invalid learning rate: expected a scalar or a 0-d array, got shape \(2,\)"):
        ac.adamp_step(P, G, ac.adamp_init(P), lr=np.ones(2))

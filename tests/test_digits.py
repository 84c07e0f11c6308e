"""``adamp-xp digits`` end to end on a tiny budget (1 epoch, 1 seed): table, PNG, and the mechanism.

On real data with BatchNorm, the scale-invariance test of SGDP/AdamP must find every BN-followed conv
weight scale-invariant (channel view) at every step and the final linear layer never; and with the same
initial weights and batches, momentum SGD must inflate those weights' norm more than SGDP does.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("adamp_torch")

from adamp_xp.experiments import digits  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    return digits.run_digits(epochs=1, seeds=(0,), optimizers=("SGD", "SGDP", "AdamP"), progress=False)


def test_scale_invariant_weights_are_the_bn_convs():
    model = digits.make_model()
    assert digits.scale_invariant_names(model) == ["0.weight", "3.weight", "7.weight"]


def test_projection_fires_on_bn_convs_only(result):
    spe = result.steps_per_epoch
    assert spe == 1347 // 64
    for name in ("SGDP", "AdamP"):
        (run,) = result.by_optimizer(name)
        for wname, views in run.views.items():
            assert views.shape == (spe,)
            if wname in result.scale_invariant:
                assert np.all(views == 1), (name, wname)  # channel view, every step
            else:
                assert np.all(views == 0), (name, wname)  # the linear classifier is not scale-invariant
    assert result.by_optimizer("SGD")[0].views == {}  # the baselines are not tested (nothing to project)


def test_momentum_sgd_inflates_norms_more_than_sgdp(result):
    (sgd,), (sgdp,) = result.by_optimizer("SGD"), result.by_optimizer("SGDP")
    np.testing.assert_allclose(sgd.norm0, sgdp.norm0)  # same initial weights
    growth = lambda r: r.norm[-1] - r.norm0
    assert np.all(growth(sgd) > growth(sgdp))
    assert np.all(np.isfinite(sgd.eff_step)) and np.all(sgd.eff_step > 0)


def test_command_runs_end_to_end_and_writes_png(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="adamp-xp")
    digits.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["digits", "--quick", "--epochs", "1", "--seeds", "1", "--no-progress", "--out", str(tmp_path / "figs")]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for name in ("SGD ", "SGDP", "AdamW", "AdamP", "paired SGDP - SGD", "paired AdamP - AdamW", "100% / 0%"):
        assert name in text, name
    data = (tmp_path / "figs" / "digits.png").read_bytes()
    assert len(data) > 1000 and data.startswith(PNG)


def test_missing_cuda_is_a_clear_exit(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    parser = argparse.ArgumentParser(prog="adamp-xp")
    digits.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["digits", "--device", "cuda", "--no-plot", "--no-progress"])
    assert args.func(args) == 2
    assert "Invalid device: 'cuda'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(epochs=0), r"Invalid epochs: 0"),
        (dict(seeds=()), r"Invalid seeds: \(\)"),
        (dict(optimizers=("SGD", "Lion")), r"Invalid optimizers: \('SGD', 'Lion'\)"),
        (dict(threads=0), r"Invalid threads: 0"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        digits.DigitsConfig(**kwargs)


def test_epoch_ticks_are_whole_epochs_and_the_default_folder_is_git_ignored(tmp_path, monkeypatch, capsys):
    """`digits --quick` used to label epochs 0.5, 1.0, 1.5, ...; without --out the figure goes to
    ./adamp-xp-figures (ignored by git), never over the tracked docs/figures."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from adamp_xp.experiments import DEFAULT_OUT

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="adamp-xp")
    digits.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["digits", "--epochs", "2", "--seeds", "1", "--no-progress"])
    assert args.func(args) == 0
    png = tmp_path / DEFAULT_OUT / "digits.png"
    assert png.exists() and f"figure: {png}" in capsys.readouterr().out
    (fig,) = kept
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks

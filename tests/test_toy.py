"""``adamp-xp toy`` against the paper's lemmas and against independent references.

* Lemma 2.1 (GD) and Lemma 2.2 (momentum) to 1e-12 in float64, with gradients and momentum buffers
  recomputed here in NumPy from the recorded trajectory (not the ones the experiment recorded);
* momentum's norm growth strictly exceeds GD's; SGDP's per-step change of |w|^2 is bounded by the
  second-order term eta^2 |Pi p|^2, with Pi p recomputed here;
* the trajectories equal torch.optim.SGD / torch.optim.Adam and the official adamp.SGDP / adamp.AdamP
  fed the same gradients;
* the projection leaves the effective update direction unchanged and only changes its size;
* the command runs end to end, writes PNGs, and gives the same numbers on every backend.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

import adamp_core as ac
from adamp_xp.experiments import toy

STEPS = 150
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    return toy.run_toy(steps=STEPS)


def _grad(w):
    """grad of -(w/|w|).(w*/|w*|) for w* = (1, 0), written out independently: -(I - w w^T/|w|^2) w* / |w|."""
    n = np.linalg.norm(w)
    u = np.array([1.0, 0.0])
    return -(u - (w @ u) * w / n**2) / n


def test_lemma_2_1_gd_norm_growth_to_float64_rounding(result):
    run = result.run("gd")
    w = run.w
    g = np.array([_grad(x) for x in w[:-1]])
    np.testing.assert_allclose(w[1:], w[:-1] - run.lr * g, rtol=0, atol=1e-15)  # it is plain GD
    sq = np.sum(w**2, axis=1)
    residual = np.abs(sq[1:] - sq[:-1] - run.lr**2 * np.sum(g**2, axis=1)) / sq[1:]
    assert residual.max() <= 1e-12
    assert np.all(np.diff(sq) > 0)  # |w| grows at every step


@pytest.mark.parametrize("beta", toy.DEFAULT_MOMENTA)
def test_lemma_2_2_momentum_norm_growth_and_more_than_gd(result, beta):
    run, gd = result.run("momentum", beta), result.run("gd")
    w, lr = run.w, run.lr
    p, ps = np.zeros(2), []
    for x in w[:-1]:
        p = beta * p + _grad(x)  # heavy-ball buffer, recomputed here
        ps.append(p)
    ps = np.array(ps)
    np.testing.assert_allclose(w[1:], w[:-1] - lr * ps, rtol=0, atol=1e-13)
    sq = np.sum(w**2, axis=1)
    p2 = np.sum(ps**2, axis=1)
    extra = np.array([sum(beta ** (t - k) * p2[k] for k in range(t)) for t in range(len(p2))])
    rhs = sq[:-1] + lr**2 * p2 + 2 * lr**2 * extra
    assert (np.abs(sq[1:] - rhs) / sq[1:]).max() <= 1e-12
    gd_sq = gd.norms**2
    assert sq[-1] - sq[0] > gd_sq[-1] - gd_sq[0]  # strictly more growth than GD with the same lr


def test_norm_growth_increases_with_momentum(result):
    finals = [result.run("momentum", b).norms[-1] for b in toy.DEFAULT_MOMENTA]
    assert finals == sorted(finals) and finals[0] > result.run("gd").norms[-1]


@pytest.mark.parametrize("method", ["sgdp", "sgdp_alg1"])
@pytest.mark.parametrize("beta", toy.DEFAULT_MOMENTA)
def test_sgdp_norm_growth_is_second_order_only(result, method, beta):
    run, mom = result.run(method, beta), result.run("momentum", beta)
    w, lr, eps = run.w, run.lr, result.config.eps
    b, qs, radial = np.zeros(2), [], []
    for x in w[:-1]:
        p = beta * b + _grad(x)
        wn = x / (np.linalg.norm(x) + eps)
        q = p - (wn @ p) * wn  # Pi_w(p), paper Sec. 3.2
        b = q if method == "sgdp" else p  # adamp 0.3.0 stores the projected buffer; Algorithm 1 does not
        qs.append(q)
        radial.append(abs(x @ p) / np.linalg.norm(x))
    qs, radial = np.array(qs), np.array(radial)
    np.testing.assert_allclose(w[1:], w[:-1] - lr * qs, rtol=0, atol=1e-13)
    sq = np.sum(w**2, axis=1)
    second = lr**2 * np.sum(qs**2, axis=1)  # eta^2 |Pi p|^2
    change = sq[1:] - sq[:-1]
    # |w_{t+1}|^2 - |w_t|^2 = eta^2 |Pi p|^2 - 2 eta w.Pi(p). With w/(|w| + eps) in Pi, w.Pi(p) is not 0 but
    # (w.p)(1 - |w|^2/(|w| + eps)^2), at most 2 eps |w.p|/|w|: a first-order remainder of size 4 eta eps |w^.p|.
    slack = 4 * lr * eps * radial * (1 + 1e-6) + 1e-14 * sq[:-1]
    assert np.all(np.abs(change - second) <= slack + 1e-9 * second)
    assert np.sum(np.abs(change - second)) <= 1e-5 * (sq[-1] - sq[0])  # the remainder is negligible overall
    assert sq[-1] < mom.norms[-1] ** 2  # and far less than momentum GD


def test_sgdp_without_momentum_is_gd(result):
    """Where the update is already tangent (plain GD on a scale-invariant w), the projection is a no-op."""
    gd = result.run("gd")
    x, u = gd.w[0].reshape(1, 2), np.array([[1.0, 0.0]])  # (1, 2): one scale-invariant row, projected
    state = ac.sgdp_init(x)
    for t in range(STEPS):
        g = toy.toy_grad(np, x, u)
        assert int(ac.projected_view(x, g)) == ac.VIEW_CHANNEL
        x, state = ac.sgdp_step(x, g, state, lr=gd.lr)
        np.testing.assert_allclose(x.ravel(), gd.w[t + 1], rtol=0, atol=1e-15)


def test_projection_keeps_the_effective_direction_and_enlarges_the_step():
    """Paper Sec. 3: removing the radial part changes |w_{t+1}|, not the direction in which w/|w| moves.
    Row by row (channel view), the tangent parts of w'/|w'| - w/|w| for the plain and the projected
    update are parallel to -Pi(p); with the momentum-like w.p < 0 the projected step is larger."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3))
    g = rng.standard_normal((4, 3))
    g -= np.sum(g * w, axis=1, keepdims=True) / np.sum(w * w, axis=1, keepdims=True) * w  # scale-invariant grad
    buf = rng.standard_normal((4, 3)) - 2.0 * w  # radial part pointing inwards, as Lemma 2.2's w.p < 0
    lr, beta = 0.05, 0.9
    p = beta * buf + g
    plain = w - lr * p
    projected, _ = ac.sgdp_step(w, g, ac.SGDPState(buf), lr=lr, momentum=beta)
    assert int(ac.projected_view(w, g)) == ac.VIEW_CHANNEL
    for r in range(4):
        wh = w[r] / np.linalg.norm(w[r])

        def tangent(x, wh=wh):
            return x - (x @ wh) * wh

        pi_p = tangent(p[r])
        moves = [tangent(x[r] / np.linalg.norm(x[r]) - wh) for x in (plain, projected)]
        for m in moves:
            assert m @ -pi_p / (np.linalg.norm(m) * np.linalg.norm(pi_p)) == pytest.approx(1.0, abs=1e-12)
        assert wh @ p[r] < 0
        steps = [np.linalg.norm(x[r] / np.linalg.norm(x[r]) - wh) for x in (plain, projected)]
        assert steps[1] > steps[0]


def _torch_reference(opt_name, hp, shape, steps):
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.tensor(toy.ToyConfig().w0.reshape(shape), dtype=torch.float64))
    if opt_name in ("SGDP", "AdamP"):
        adamp = pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")
        opt = getattr(adamp, opt_name)([param], **hp)
    else:
        opt = getattr(torch.optim, opt_name)([param], **hp)
    out = [param.detach().numpy().ravel().copy()]
    for _ in range(steps):
        param.grad = torch.from_numpy(_grad(param.detach().numpy().ravel()).reshape(shape))
        opt.step()
        out.append(param.detach().numpy().ravel().copy())
    return np.array(out)


@pytest.mark.parametrize(
    "method,beta,opt_name,hp,shape",
    [
        ("momentum", 0.99, "SGD", dict(lr=toy.DEFAULT_LR, momentum=0.99), (2,)),
        ("sgdp", 0.95, "SGDP", dict(lr=toy.DEFAULT_LR, momentum=0.95), (1, 2)),
        ("adam", None, "Adam", dict(lr=toy.DEFAULT_ADAM_LR), (2,)),
        ("adamp", None, "AdamP", dict(lr=toy.DEFAULT_ADAM_LR), (1, 2)),
    ],
    ids=["SGD", "SGDP", "Adam", "AdamP"],
)
def test_trajectories_match_torch_and_official_optimizers(result, method, beta, opt_name, hp, shape):
    ref = _torch_reference(opt_name, hp, shape, STEPS)
    ours = result.run(method, beta).w
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-12


def test_command_runs_end_to_end_and_writes_pngs(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="adamp-xp")
    toy.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["toy", "--steps", "60", "--momenta", "0.9,0.99", "--out", str(tmp_path / "figs")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for name in (
        "GD",
        "momentum GD 0.9",
        "SGDP 0.99",
        "SGDP (Alg. 1) 0.99",
        "Adam",
        "AdamP",
        "Lemma 2.1 (GD)",
        "Lemma 2.2 (momentum 0.99)",
    ):
        assert name in text
    assert "FAILS" not in text
    for png in ("toy_trajectories.png", "toy_curves.png"):
        data = (tmp_path / "figs" / png).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG)


def test_same_numbers_on_every_backend(backend):
    if backend.library == "numpy":
        pytest.skip("numpy is the reference")
    if not backend.supports("float64"):
        pytest.skip(f"{backend} has no float64")
    ref = toy.run_toy(steps=25, momenta=(0.9,))
    got = toy.run_toy(steps=25, momenta=(0.9,), backend=backend.id)
    assert got.passed
    for a, b in zip(got.runs, ref.runs, strict=True):
        assert a.name == b.name
        np.testing.assert_allclose(a.w, b.w, rtol=0, atol=1e-13)
        np.testing.assert_allclose(a.effective_step, b.effective_step, rtol=1e-9, atol=1e-15)
        np.testing.assert_array_equal(a.view, b.view)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=0), r"Invalid steps: 0"),
        (dict(lr=-0.1), r"Invalid lr: -0.1"),
        (dict(adam_lr=float("nan")), r"Invalid adam_lr: nan"),
        (dict(angle=180.0), r"Invalid angle: 180.0"),
        (dict(momenta=(0.9, 1.0)), r"Invalid momentum: 1.0"),
        (dict(dtype="float16"), r"Invalid dtype: 'float16'"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        toy.ToyConfig(**kwargs)


def test_unknown_backend_is_a_clear_exit(capsys):
    parser = argparse.ArgumentParser(prog="adamp-xp")
    toy.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["toy", "--backend", "tensorflow", "--no-plot"])
    assert args.func(args) == 2
    assert "Unknown backend: 'tensorflow'" in capsys.readouterr().out


def _run_command(argv):
    parser = argparse.ArgumentParser(prog="adamp-xp")
    toy.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["toy", *argv])
    return args.func(args)


def test_without_out_the_figures_go_to_a_folder_git_ignores(tmp_path, monkeypatch, capsys):
    """README's `adamp-xp toy` run in a clone must not overwrite the tracked docs/figures: without --out the
    figures go to ./adamp-xp-figures (which .gitignore ignores), and the command says where."""
    import shutil
    import subprocess
    from pathlib import Path

    from adamp_xp.experiments import DEFAULT_OUT

    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert _run_command(["--steps", "20", "--momenta", "0.9"]) == 0
    folder = tmp_path / DEFAULT_OUT
    assert sorted(p.name for p in folder.iterdir()) == ["toy_curves.png", "toy_trajectories.png"]
    assert f"figures: {folder / 'toy_trajectories.png'}, {folder / 'toy_curves.png'}" in capsys.readouterr().out
    root = Path(toy.__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git clone")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{DEFAULT_OUT}/toy_curves.png"], cwd=root)
    assert ignored.returncode == 0, f"{DEFAULT_OUT}/ is not in .gitignore"


def _figures(monkeypatch, draw):
    """The matplotlib figures ``draw()`` saves (kept from being closed)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    draw()
    return kept


def test_trajectories_have_labelled_axes_and_a_title_clear_of_the_panels(result, tmp_path, monkeypatch):
    (fig,) = _figures(monkeypatch, lambda: toy.plot_trajectories(result, str(tmp_path / "t.png")))
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == len(result.config.momenta) + 1
    for ax in panels:
        assert ax.get_xlabel() and ax.get_ylabel()
        assert not title.overlaps(ax.title.get_window_extent(renderer)), ax.get_title()
        assert title.y0 > ax.title.get_window_extent(renderer).y1


def test_curves_are_sharp_with_even_log_ticks(result, tmp_path, monkeypatch):
    path = tmp_path / "c.png"
    (fig,) = _figures(monkeypatch, lambda: toy.plot_curves(result, str(path)))
    header = path.read_bytes()[:24]
    assert int.from_bytes(header[16:20], "big") >= 1200  # width in pixels: 110 dpi, not 72
    axes = np.array(fig.axes).reshape(3, -1)
    for ax in axes[0]:  # |w|: plain numbers, no minor labels
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert len(labels) >= 2 and all(label.replace(".", "").isdigit() for label in labels), labels
        assert not any(t.get_text() for t in ax.get_yticklabels(minor=True))
    for row in axes[1:]:  # effective step, angle: powers of ten at one even stride per row
        strides = set()
        for ax in row:
            exponents = np.log10(ax.get_yticks()[(ax.get_yticks() >= ax.get_ylim()[0])
                                                 & (ax.get_yticks() <= ax.get_ylim()[1])])
            assert len(exponents) >= 3 and np.allclose(exponents, np.round(exponents))
            strides |= set(np.diff(np.round(exponents)).astype(int))
            assert not any(t.get_text() for t in ax.get_yticklabels(minor=True))
        assert len(strides) == 1, strides

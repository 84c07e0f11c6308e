"""scripts/gpu_check.sh, the one command for a lent GPU machine (README "GPU check"), checked on a CPU.

The dry run prints every command with its limit and runs nothing heavy; the real run's bookkeeping
(continuing after a failure, limits, the budget, the summary) is exercised with a stub Python. Whether
the pytest selection picks GPU cases only is checked by collecting it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FETCH = ROOT / "scripts" / "fetch_gpu_wheels.sh"
BASH = shutil.which("bash")
BUDGET_S = 600  # the 10 minutes a lent machine gives one command

pytestmark = pytest.mark.skipif(BASH is None or shutil.which("timeout") is None, reason="needs bash and timeout")

# "[name  limit N s] command > log" (N is "rest" for the last step: what the budget has left)
PLAN_LINE = re.compile(
    r"^\[(?P<name>[\w-]+)\s+limit\s+(?P<limit>\d+|rest) s\] (?P<cmd>.*) > (?P<log>\S+\.log)(?P<note>.*)$"
)
STEPS = [
    "install-wheels",
    "install-wheels-unpack",
    "install-project",
    "nvidia-smi",
    "machine",
    "pytest-cuda",
    "triton",
    "conformance",
    "bench",
    "pytest-jax-gpu",
]
GPU_K = "cuda or gpu or cupy or other_device or another_device"


def _run(args, *, env=None, script=SCRIPT, timeout=120):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OUT", "DRY_RUN", "GPU_CHECK_"))}
    full_env.update({"PYTHON": sys.executable, **(env or {})})
    return subprocess.run(
        [BASH, str(script), *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT
    )


def _plan(stdout: str) -> dict[str, tuple[str, list[str], str, str]]:
    """{step: (limit, argv, log, note)} from the plan lines of a dry run."""
    out = {}
    for line in stdout.splitlines():
        m = PLAN_LINE.match(line)
        if m:
            out[m["name"]] = (m["limit"], shlex.split(m["cmd"]), m["log"], m["note"])
    return out


def _pytest_selection(argv: list[str]) -> list[str]:
    """The paths, --ignore and -k of a planned pytest command."""
    k = argv[argv.index("-k") + 1]
    return [a for a in argv[3:] if a.startswith(("tests", "--ignore"))] + ["-k", k]


@pytest.mark.parametrize("script", [SCRIPT, FETCH], ids=["gpu_check", "fetch_gpu_wheels"])
def test_scripts_are_valid_bash(script):
    r = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dry_run_lists_every_command_with_its_limit(tmp_path):
    out = tmp_path / "out"
    r = _run(["--dry-run", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    plan = _plan(r.stdout)
    assert list(plan) == STEPS
    py = sys.executable
    for name, (_, _, log, _) in plan.items():
        assert log == str(out / f"{name}.log")
    assert plan["install-wheels"][1][:6] == [py, "-m", "pip", "install", "--no-index", "--no-deps"]
    assert plan["install-wheels-unpack"][3] == "  (only if install-wheels fails)"
    assert plan["install-project"][1] == [
        py,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--no-build-isolation",
        "-e",
        ".",
    ]
    assert plan["nvidia-smi"][1] == ["nvidia-smi"]
    assert plan["triton"][1] == [py, "scripts/gpu_triton_check.py", str(out / "triton.json")]
    assert plan["machine"][1] == [py, "scripts/gpu_machine_info.py", str(out / "machine.json")]
    for name, xml, k in (
        ("pytest-cuda", "pytest-cuda.xml", f"({GPU_K}) and not jax:gpu"),
        ("pytest-jax-gpu", "pytest-jax-gpu.xml", "jax:gpu"),
    ):
        argv = plan[name][1]
        assert argv[:4] == [py, "-m", "pytest", "-q"], argv
        assert argv[argv.index("--junitxml") + 1] == str(out / xml)
        assert _pytest_selection(argv) == [
            "tests",
            "--ignore=tests/integration",
            "--ignore=tests/test_gpu_check.py",
            "-k",
            k,
        ]
    assert plan["conformance"][1] == [
        py,
        "-m",
        "adamp_xp.cli",
        "conformance",
        "--device",
        "cuda",
        "--json",
        str(out / "conformance-cuda.json"),
    ]
    assert plan["bench"][1] == [
        py,
        "-m",
        "adamp_xp.cli",
        "bench",
        "--device",
        "cuda",
        "--quick",
        "--json",
        str(out / "bench-cuda.json"),
    ]
    # The fixed limits, each with its 5 s grace, leave the last step at least half a minute of the budget.
    fixed = sum(int(limit) + 5 for limit, *_ in plan.values() if limit != "rest")
    assert [name for name, (limit, *_) in plan.items() if limit == "rest"] == ["pytest-jax-gpu"]
    assert fixed + 30 <= 570 < BUDGET_S, fixed
    assert "budget 570 s" in r.stdout
    assert f"(the budget left: >= {570 - fixed - 5} s)" in plan["pytest-jax-gpu"][3]
    # The checks ran, and nothing was: no output folder.
    for check in (
        "bash -n scripts/gpu_check.sh",
        "bash -n scripts/fetch_gpu_wheels.sh",
        "scripts/gpu_machine_info.py present",
        "scripts/unpack_wheels.py present",
        "scripts/gpu_triton_check.py present",
        "executable timeout",
        "python module pytest",
        "adamp-xp bench --device",
        "adamp-xp bench --quick",
        "adamp-xp bench --json",
        "adamp-xp conformance --json",
    ):
        assert f"check: ok    {check}" in r.stdout, check
    assert re.search(r"check: (ok   |WARN ) \.whl/ (present|absent)", r.stdout)
    assert re.search(r"dry run: 0 error\(s\), \d+ warning\(s\); nothing was run", r.stdout)
    assert not out.exists()


def test_dry_run_by_environment_and_default_out(tmp_path):
    r = _run([], env={"DRY_RUN": "1", "OUT": str(tmp_path / "lent")})
    assert r.returncode == 0, r.stdout + r.stderr
    plan = _plan(r.stdout)
    assert plan["bench"][1][-1] == str(tmp_path / "lent" / "bench-cuda.json")
    r = _run(["--dry-run"])
    assert _plan(r.stdout)["conformance"][1][-1] == str(ROOT / "gpu-check-out" / "conformance-cuda.json")


def test_dry_run_reports_missing_wheels(tmp_path):
    """A tree without .whl/ (the scripts alone): reported, with the command that fetches them."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    r = _run(["--dry-run"], script=tmp_path / "scripts" / "gpu_check.sh", env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: WARN  .whl/ absent" in r.stdout
    for prefix in ("array_api_compat", "array_api_strict", "adamp"):
        assert f"check: WARN  wheel .whl/{prefix}-*.whl missing: run bash scripts/fetch_gpu_wheels.sh" in r.stdout
    assert "install --no-index --no-deps .whl/MISSING.whl" in r.stdout


def _stub_env(tmp_path, *, pytest_sleep=0, budget=570, pip_status=0):
    """PATH with a stub nvidia-smi, and a stub Python that fails `conformance`, sleeps in `pytest` and
    exits with ``pip_status`` from pip."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'stub nvidia-smi'\n")
    (bin_dir / "python-stub").write_text(
        '#!/bin/sh\necho "stub $*"\ncase " $* " in\n'
        f'  *" -m pytest "*) exec sleep {pytest_sleep} ;;\n'
        '  *" conformance "*) exit 3 ;;\n'
        f'  *" -m pip "*) exit {pip_status} ;;\n'
        "esac\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python-stub"),
        "TMPDIR": str(tmp_path),
        "GPU_CHECK_BUDGET_S": str(budget),
    }


def _summary(out: Path) -> dict[str, str]:
    """{step: its row of summary.txt, after the name}"""
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[1].split() == ["step", "exit", "status", "seconds", "limit", "outcome"]
    return {line.split()[0]: line.split(None, 1)[1] for line in lines[2:-1]}


def test_run_continues_after_failing_steps_and_summarises(tmp_path):
    """pip fails (the wheels are unpacked instead, the tree is on PYTHONPATH anyway) and conformance fails:
    every step still runs, the summary says so and the exit status is non-zero."""
    out = tmp_path / "out"
    r = _run([str(out)], env=_stub_env(tmp_path, pip_status=1))
    assert r.returncode == 1, r.stdout + r.stderr
    rows = _summary(out)
    assert list(rows) == STEPS
    status = {name: row.split()[0] for name, row in rows.items()}
    assert status == {**{n: "0" for n in STEPS}, "install-wheels": "1", "install-project": "1", "conformance": "3"}
    assert rows["install-wheels"].endswith("unpacked instead")
    assert rows["install-project"].endswith("PYTHONPATH used instead")
    assert (out / "summary.txt").read_text().splitlines()[-1] == "FAILED: conformance"
    assert r.stdout.rstrip().endswith("FAILED: conformance")
    assert "stub -m adamp_xp.cli bench --device cuda --quick --json" in (out / "bench.log").read_text()
    assert "# exit status 3 after" in (out / "conformance.log").read_text()
    assert '"failed": ["conformance"]' in (out / "summary.json").read_text()
    assert {p.name for p in out.iterdir()} >= {f"{n}.log" for n in STEPS} | {"plan.txt", "summary.json"}


def test_run_without_failures_exits_zero_and_skips_the_unpack(tmp_path):
    out = tmp_path / "out"
    r = _run([str(out)], env={**_stub_env(tmp_path), "GPU_CHECK_ONLY": "install-wheels install-wheels-unpack bench"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(_summary(out)) == ["install-wheels", "bench"]
    assert (out / "summary.txt").read_text().splitlines()[-1] == "all steps passed"


def test_run_stops_a_step_at_its_limit_and_keeps_to_the_budget(tmp_path):
    """An 8 s budget: pytest-cuda (sleeping a minute) gets what is left after the 5 s grace, is stopped
    there, and the steps after it do not start."""
    out = tmp_path / "out"
    env = {**_stub_env(tmp_path, pytest_sleep=60, budget=8), "GPU_CHECK_MIN_STEP_S": "1"}
    r = _run([str(out)], env=env, timeout=60)
    assert r.returncode == 1
    rows = _summary(out)
    status, secs, limit = rows["pytest-cuda"].split()[:3]
    assert status == "124", rows
    # its limit is what the budget left after the grace; the seconds are whole clock seconds read at start
    # and end, so a step stopped at 3 s can read 4 (3.2 s across two second boundaries)
    assert int(limit) <= 3 and int(secs) <= int(limit) + 1, rows
    assert rows["pytest-jax-gpu"].startswith("not run (budget)")
    assert "# stopped at its limit" in (out / "pytest-cuda.log").read_text()
    assert (out / "summary.txt").read_text().splitlines()[-1].startswith("FAILED: pytest-cuda ")


@pytest.mark.slow
def test_pytest_selection_collects_only_gpu_cases():
    """The script's selection, collected here once (about 20 s: every test module is imported): every case
    is a GPU one (torch:cuda, jax:gpu, cupy, a `cuda` device id, or a test named for CUDA or a second
    device), each backend has its cases, and no CPU case is in it. The two runs split it: pytest-cuda is
    this selection "and not jax:gpu", pytest-jax-gpu the rest (every jax:gpu id matches "gpu")."""
    plan = _plan(_run(["--dry-run"]).stdout)
    cuda_sel, jax_sel = _pytest_selection(plan["pytest-cuda"][1]), _pytest_selection(plan["pytest-jax-gpu"][1])
    assert cuda_sel[-1] == f"({GPU_K}) and not jax:gpu" and jax_sel[-1] == "jax:gpu"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *cuda_sel[:-1], GPU_K],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    gpu_id = re.compile(r"torch:cuda|jax:gpu|cupy|[\[-]cuda[\]-]|_cuda_|other_device|another_device")
    assert [i for i in ids if not gpu_id.search(i)] == []
    assert [i for i in ids if re.search(r"torch:cpu|jax:cpu|\[numpy|-numpy\]|array_api_strict", i)] == []
    assert [i for i in ids if i.startswith(("tests/integration", "tests/test_gpu_check.py"))] == []
    for backend in ("torch:cuda", "jax:gpu", "cupy"):
        assert sum(backend in i for i in ids) > 50, backend
    # the tests that need a second device, named so that the selection finds them
    assert "tests/test_core_bad_input.py::test_grad_on_other_device_is_refused" in ids
    assert "tests/test_torch_features.py::test_grad_on_another_device_is_refused" in ids

"""Every command the README, docs/cli.md and the demo print runs as printed, in a fresh shell, and succeeds.

The shell is ``bash -c`` in a temporary folder, with the ``bin`` folder of the environment running the tests first
on ``PATH`` (where ``pip`` put ``noisescale``), as after ``. .venv/bin/activate``.  The README's Python blocks run
as written, each as its own script.  A command that cannot run here (minutes of training, ``torchrun``, GPUs, the
network) is listed in ``EXCLUDED`` with the reason; an exclusion the docs no longer print fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHELL_DOCS = (README, ROOT / "docs" / "cli.md")
BIN = Path(sys.executable).parent
COMMAND_WORDS = ("noisescale", "python", "torchrun", "make", "pip", ".")

EXCLUDED = {
    "make demo": "creates .venv and installs packages (minutes); these tests run inside such an environment",
    "make test": "runs this test suite",
    "make TORCH=torch==2.5.1 test": "installs another torch (network, minutes) and runs this test suite",
    "pip install -e '.[demo,report]'": "installs packages (network); would change the environment under test",
    "pip install -c <(pip freeze | grep '^torch==') -e '.[demo,report]'": "installs packages (network), as above",
    "pip install 'noisescale[dashboard]'": "installs packages (network); the tests run with the dashboard installed",
    "noisescale dashboard runs": "serves until stopped; tests/integration/test_dashboard_cli.py starts the server "
    "and reads its pages",
    "noisescale demo --task charlm": "about a minute of training on 2 cores; test_cli.py trains it for 3 steps",
    "noisescale demo --noisy-labels 0.05": "800 steps of training with per-example scores; test_groups_cli.py runs "
    "it for 150 steps",
    "python benchmarks/adaptive.py": "about 90 minutes of training on 2 cores (fixed batches, ramps, the controller "
    "and its ablations, several seeds); tests/unit/test_controller_*.py test the controller itself",
    "torchrun --standalone --nproc-per-node 2 examples/ddp_train.py": "torchrun: two processes training for "
    "minutes; tests/distributed/ run the rank source on 2 gloo processes",
    "torchrun --standalone --nproc-per-node 8 examples/ddp_train.py": "needs 8 GPUs",
    "python examples/preference_noise.py": "three DPO runs, minutes on 2 cores; test_examples_integrations.py runs it "
    "for 4 steps",
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-id gns --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500 "
    "examples/ddp_train.py": "needs two machines with 8 GPUs each and a network between them",
}
EXCLUDED_PYTHON = {
    "model = DDP(model)": "a fragment of examples/ddp_train.py (no process group outside torchrun)",
    "from noisescale.integrations.lightning import": "fragments showing the callbacks (docs/integrations.md); the "
    "examples run them whole in tests/integration/test_examples_integrations.py",
    "monitor = ns.GNSMonitor(model, sinks=": "one line showing the sinks argument (docs/sinks.md has whole examples)",
    "sampler = ns.AdaptiveBatchSampler(": "the controller's calls in a loop, elided (noisescale demo --adaptive runs "
    "the whole loop; tests/unit/test_controller_apply.py tests it)",
    "m = monitor.step(batch_size=len(x), groups=": "two lines showing the step's arguments (docs/sources.md has the "
    "whole loop)",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BIN / "noisescale").exists(), reason="the noisescale script is not installed beside python"
    ),
]


def shell_commands(path: Path) -> list[str]:
    """The commands of ``bash`` blocks (continuation lines joined, comments dropped) and, in the README, inline
    code that starts with a command word."""
    text = path.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = _strip_comment(line).strip()
            if command:
                out.append(" ".join(command.split()))
    if path == README:
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            if span.split()[0] in COMMAND_WORDS and " " in span:
                out.append(span)
    return out


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, after a space)."""
    in_quote = None
    for i, ch in enumerate(line):
        if in_quote:
            in_quote = None if ch == in_quote else in_quote
        elif ch in "'\"":
            in_quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def env(*, with_bin: bool = True) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    path = [p for p in e.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()]
    e["PATH"] = os.pathsep.join(([str(BIN)] if with_bin else []) + path)
    e["PYTHONUNBUFFERED"] = "1"
    # One torch thread: on shared cores two intra-op threads spin-wait on each other and a step can take 30 times
    # longer (the commands themselves are unchanged).
    e["OMP_NUM_THREADS"] = "1"
    return e


def bash(command: str, cwd: Path, *, with_bin: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env(with_bin=with_bin), capture_output=True, text=True, timeout=timeout
    )


SHORT_DEMO = "demo --steps 20 --batch-size 32 --name look"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with the environment under test as ./.venv, the examples, and a short demo's run in ./runs."""
    root = tmp_path_factory.mktemp("readme")
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "examples").symlink_to(ROOT / "examples")
    return root


@pytest.fixture(scope="module")
def short_demo(workdir):
    """What ``noisescale demo`` printed to a pipe (the environment on PATH)."""
    done = bash(f"noisescale {SHORT_DEMO}", workdir)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_docs_print_commands_and_every_exclusion_is_still_printed():
    printed = {c for doc in SHELL_DOCS for c in shell_commands(doc)}
    assert {"noisescale demo", "noisescale show digits", ". .venv/bin/activate"} <= printed
    assert set(EXCLUDED) <= printed, set(EXCLUDED) - printed
    blocks = python_blocks()
    assert all(any(b.startswith(start) for b in blocks) for start in EXCLUDED_PYTHON)


def test_every_shell_command_runs_as_printed(workdir, short_demo):
    """Each distinct command once (the README and docs/cli.md share some), in the order the docs print them."""
    commands = list(dict.fromkeys(c for doc in SHELL_DOCS for c in shell_commands(doc)))
    ran = []
    for command in commands:
        if command in EXCLUDED:
            continue
        done = bash(command, workdir)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        ran.append(command)
    assert {"noisescale demo", "noisescale show digits", "noisescale report digits --png -o report.png"} <= set(ran)
    assert {"report.html", "report.png", "report-steps.html"} <= {p.name for p in workdir.iterdir()}


def test_activating_the_environment_puts_noisescale_on_path(workdir):
    assert bash("command -v noisescale", workdir, with_bin=False).stdout.strip() != str(BIN / "noisescale")
    done = bash(". .venv/bin/activate && command -v noisescale && noisescale --version", workdir, with_bin=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == str(Path(sys.prefix) / "bin" / "noisescale")


def test_without_a_terminal_the_demo_shows_progress_before_its_explanation(short_demo):
    lines = short_demo.splitlines()
    progress = [i for i, line in enumerate(lines) if re.match(r"step +\d+/20 ", line)]
    assert len(progress) == 10 and progress[-1] < lines.index("Look further")


@pytest.mark.parametrize("with_bin", [True, False], ids=["activated", "not-activated"])
def test_the_demos_look_further_commands_run_as_printed(workdir, short_demo, with_bin):
    """After ``make demo`` the shell has no active environment: the printed commands must still run, and the
    printed activation line must work."""
    if with_bin:
        printed = short_demo
    else:
        done = bash(f"{shlex.quote(str(BIN / 'noisescale'))} {SHORT_DEMO}", workdir, with_bin=False)
        assert done.returncode == 0, done.stderr
        printed = done.stdout
    text = printed.split("\nLook further\n", 1)[1]
    commands = [
        line.strip() for line in text.splitlines() if line.startswith("  ") and not line.strip().startswith("(")
    ]
    assert len(commands) == 2 and "show" in commands[0] and "report" in commands[1]
    assert commands[0].startswith("noisescale ") == with_bin
    for command in commands:
        ran = bash(command, workdir, with_bin=with_bin)
        assert ran.returncode == 0, f"`{command}`:\n{ran.stderr[-2000:]}"
    hint = re.search(r"put its virtualenv on your PATH: (.*)\)$", text, re.M)
    assert (hint is None) == with_bin
    if hint is not None:
        ran = bash(f"{hint.group(1)} && noisescale --version", workdir, with_bin=False)
        assert ran.returncode == 0 and ran.stdout.startswith("noisescale "), ran.stderr


def test_quick_start_runs_as_written(workdir):
    (quick,) = [b for b in python_blocks() if "monitor = ns.GNSMonitor(model)" in b]
    (workdir / "quick_start.py").write_text(quick, encoding="utf-8")
    done = bash("python quick_start.py", workdir, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["100", "200", "300"]
    assert all("B_simple " in line and "tr(Σ)" in line for line in lines)


def test_record_a_run_runs_as_written(workdir):
    (block,) = [b for b in python_blocks() if "ns.Run(" in b]
    (workdir / "record.py").write_text(block, encoding="utf-8")
    done = bash("python record.py", workdir, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((workdir / "runs").glob("my-run-*.sqlite"))
    values = done.stdout.strip().strip("[]").split()
    assert len(values) == 5 and all(float(v) > 0 for v in values)


def test_paying_less_runs_as_written(workdir):
    (block,) = [b for b in python_blocks() if "ns.GNSMonitor(model, every=10)" in b]
    (workdir / "every.py").write_text(block, encoding="utf-8")
    done = bash("python every.py", workdir, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    status, measured_step, b_simple = done.stdout.split()
    assert (status, measured_step) == ("unmeasured", "11")  # step 20 carries step 11's measurement
    assert float(b_simple) > 0


def test_every_python_block_is_run_or_excluded():
    for block in python_blocks():
        known = any(k in block for k in ("monitor = ns.GNSMonitor(model)", "ns.Run(", "GNSMonitor(model, every=10)"))
        assert known or any(block.startswith(start) for start in EXCLUDED_PYTHON), block[:200]

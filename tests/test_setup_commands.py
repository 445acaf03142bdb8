"""What the README's "Set up" says must stay true: two commands, and CI runs the second.

The commands themselves (a fresh venv, then pip) are exercised by every CI run;
these checks keep the README, `.ci/run`, the extras and the markers from drifting.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_MARKER = "# The README's test command"
INNER_LOOP = "not clients and not packaging and not slow"


def setup_commands() -> list[str]:
    """The command lines of the README's "Set up" code block, in order."""
    section = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def ci_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith(CI_MARKER))
    return lines[marker + 1]


def test_readme_has_exactly_two_commands() -> None:
    serve, tests = setup_commands()
    assert serve.endswith("regproxy serve"), serve
    assert tests.endswith("-m pytest"), tests


def test_ci_runs_the_readme_test_command_exactly() -> None:
    assert ci_command() == setup_commands()[1]


def test_commands_install_into_a_venv() -> None:
    """Debian 12's and Ubuntu 24.04's python3 refuse `pip install` (PEP 668)."""
    for command in setup_commands():
        first, *rest = command.split(" && ")
        assert first == "sh packaging/venv.sh", command
        assert all(part.startswith(".venv/bin/") for part in rest), command
    packages = (ROOT / ".ci" / "run").read_text()
    assert "python3-venv" in packages  # `python3 -m venv` needs it on Debian


def test_venv_script_makes_a_venv_with_pip(tmp_path: Path) -> None:
    """packaging/venv.sh in a fresh folder: a .venv whose pip runs; a second run keeps it."""
    script = ROOT / "packaging" / "venv.sh"
    for _ in range(2):
        done = subprocess.run(
            ["sh", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    pip = subprocess.run(
        [str(tmp_path / ".venv" / "bin" / "pip"), "--version"], capture_output=True, text=True
    )
    assert pip.returncode == 0 and "pip" in pip.stdout, pip.stderr


def test_test_command_installs_every_extra() -> None:
    """The whole suite needs them all (ruff in test_style, PyInstaller in test_binary)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    command = setup_commands()[1]
    assert f"-e '.[{','.join(extras)}]'" in command, (sorted(extras), command)


def test_inner_loop_leaves_out_the_slow_groups() -> None:
    """The README's inner-loop selection deselects every test of the marked groups."""
    assert f'-m "{INNER_LOOP}"' in (ROOT / "README.md").read_text()
    slow = ["tests/clients", "tests/ops/test_binary.py", "tests/ops/test_packaging.py"]
    slow.append("tests/cli/test_gc_stress.py")
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q"]
    done = subprocess.run(
        [*args, "-m", INNER_LOOP, *slow], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 5, done.stdout + done.stderr  # 5: every test deselected
    assert "deselected" in done.stdout, done.stdout

"""The README's 5-minute tour runs as written (issue 15).

The tour's bash block is taken from README.md and run by bash in an empty
directory (holding only a link to ``examples/``, as a clone would), so the
database it names (``$PWD/tour.sqlite3``) is fresh. What differs from a
reader's shell: the install line is skipped (the test runs inside the installed
environment), the simulator gets a free port instead of 8765
(``IDIS_SIMULATOR_URL`` says which) so the test never meets another process on
8765, and the README's Python example runs just before the simulator is
stopped, where its text places it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
_TOUR = re.compile(r"^## A 5-minute tour\n.*?^```bash\n(?P<body>.*?)^```", re.M | re.S)
_IN_CODE = re.compile(r"^In code, a provider call.*?^```python\n(?P<body>.*?)^```", re.M | re.S)


def tour_commands() -> str:
    """The tour's bash block from README.md, without the install line."""
    match = _TOUR.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert match is not None, "README.md has no bash block under '## A 5-minute tour'"
    lines = match.group("body").splitlines()
    assert lines[0].startswith("python3 -m venv"), "the tour starts by installing"
    return "\n".join(lines[1:]) + "\n"


def code_example() -> str:
    """The README's Python example, which runs against the tour's simulator."""
    match = _IN_CODE.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert match is not None, "README.md has no python block after 'In code, a provider call'"
    return match.group("body")


def test_the_tour_block_is_found_and_does_the_whole_job() -> None:
    """The extraction finds the RB-09 commands, handlers and both verify-syncs (not vacuous)."""
    tour = tour_commands()

    for command in (
        "idis-integrations db upgrade",
        "idis-integrations status",
        "check_token('crm_provider')",
        "IDIS_HANDLERS=integrations_service.handlers:register",
        "idis-integrations reconcile --provider crm_provider",
        "--repair",
        "kill %1",
    ):
        assert command in tour
    assert tour.count("idis-integrations verify-sync") == 2  # before and after the drift


def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    """Every command succeeds; reconcile applies the provider's changes; verify-sync checks them."""
    port = free_port()
    # The Python example runs where its text says: before the simulator is stopped.
    example = f"python - <<'EOF'\n{code_example()}print('example ok')\nEOF\n"
    script = tour_commands().replace("kill %1", example + "kill %1").replace("8765", str(port))
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDIS_")}
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["IDIS_SIMULATOR_URL"] = f"http://127.0.0.1:{port}"
    env["COLUMNS"] = "120"

    # Output to files, not pipes: the simulator in the background would hold a pipe open.
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        process = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=out_file,
            stderr=err_file,
            start_new_session=True,  # the simulator joins its group, so a failed run stops it too
        )
        try:
            process.wait(timeout=240)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    out, err = out_path.read_text(), err_path.read_text()

    assert process.returncode == 0, f"tour failed ({process.returncode}):\n{out}\n{err}"
    assert (tmp_path / "tour.sqlite3").is_file()
    assert f"database: sqlite:///{tmp_path}/tour.sqlite3" in err
    applied = re.search(r"│ applied\s+│ (\d+)", out)
    assert applied is not None, out
    assert applied.group(1) == "10"
    assert "10 checked, 10 match, 0 mismatch" in out
    assert re.search(r"rec_1 .*│ repaired", out), out
    assert "10 checked, 9 match, 1 mismatch, 1 repaired" in out
    assert "example ok" in out

"""Shared helpers of the benchmarks: machine facts, load average, run summaries, result files.

Standard library only, so the TRL worker (bench/ppo_trl_worker.py, in its own venv)
can import it too.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "outputs" / "bench"
"""Where the benchmarks keep their models, MLflow stores and Prefect homes (gitignored)."""

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
}


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment plus the offline/telemetry settings and `extra`."""
    env = {**os.environ, **OFFLINE_ENV, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of `packages` in this interpreter (missing ones omitted)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
    }


def summary(values: list[float]) -> dict:
    """Median, min, max and the raw values of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def fmt(s: dict, digits: int = 2, unit: str = "") -> str:
    """'median (min-max)' of a summary."""
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def write_result(name: str, data: dict) -> Path:
    """bench/results/<name>-<UTC time>.json, plus <name>-latest.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    data = {"benchmark": name, "utc": stamp, "command": " ".join([Path(sys.executable).name, *sys.argv]), **data}
    text = json.dumps(data, indent=2, default=str)
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(text)
    (RESULTS / f"{name}-latest.json").write_text(text)
    return path


def git_commit() -> str:
    """The working tree's HEAD (and '+dirty' when files differ from it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


WARM_UP_FLOW = "from prefect import flow\n@flow(name='bench-warm-up')\ndef warm_up():\n    return 1\nwarm_up()\n"


def warm_prefect_home(prefect_home: Path, python: str = sys.executable, attempts: int = 3) -> float:
    """Create PREFECT_HOME's database with one trivial flow run (retried); returns the seconds it took.

    On a busy machine the first temporary server of a fresh PREFECT_HOME (database
    creation and migrations) can exceed PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS;
    the benchmarks measure later runs against a warm home, as repeated `rlhf run`s see.
    """
    prefect_home.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for _ in range(attempts):
        proc = subprocess.run(
            [python, "-c", WARM_UP_FLOW],
            env=offline_env(PREFECT_HOME=str(prefect_home)),
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            return time.perf_counter() - t0
    raise RuntimeError(f"warm-up flow failed {attempts} times in {prefect_home}:\n{proc.stderr[-2000:]}")

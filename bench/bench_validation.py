"""Benchmark: validate 10,000 preference rows (target: <= 10 s on a CPU machine).

    MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false \
        PYTHONPATH=. python bench/bench_validation.py [--rows 10000] [--repeats 3] [--tokenizer PATH]

Times, in one fresh process: the first `validate_file` call (including the
one-off imports of `great_expectations` and `datasets` work), then warm repeats,
and the time to write the GX Data Docs page. Prints one line per figure; the
figures go in docs/benchmarks.md under "## Validation".
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="preference rows to validate")
    parser.add_argument("--repeats", type=int, default=3, help="warm repeats after the first (cold) call")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path, to include the token-length check")
    args = parser.parse_args()

    t0 = time.perf_counter()
    from rlhf.builtin.dataset import BuiltinSizes, build_builtin_rows
    from rlhf.config import ValidationConfig
    from tasks.validate import validate_file

    tokenizer = None
    if args.tokenizer:
        from models.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    import_s = time.perf_counter() - t0
    rows = build_builtin_rows(0, BuiltinSizes(preferences=args.rows))["preferences"]
    cfg = ValidationConfig()
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        path = Path(tmp) / "preferences.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

        t0 = time.perf_counter()
        report = validate_file(str(path), "preference", cfg, tokenizer)
        cold_s = time.perf_counter() - t0
        warm = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            validate_file(str(path), "preference", cfg, tokenizer)
            warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        report.result_json()
        report.data_docs()
        docs_s = time.perf_counter() - t0

    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"rows: {report.rows}, success: {report.success}, tokenizer: {bool(tokenizer)}")
    print(f"project imports (excl. great_expectations): {import_s:.2f} s")
    print(f"first validate_file (cold, incl. GX import): {cold_s:.2f} s")
    if warm:
        print(f"warm validate_file: best {min(warm):.2f} s, mean {sum(warm) / len(warm):.2f} s over {len(warm)}")
    print(f"GX result JSON + Data Docs HTML: {docs_s:.2f} s")


if __name__ == "__main__":
    main()

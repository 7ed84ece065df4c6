"""DeepSpeed ZeRO-2 and ZeRO-3 through the shipped launch files: a few stage-1 steps run, and
the first-step loss equals the plain run's.

    python bench/deepspeed_check.py              # one GPU, bf16 (tolerance 1e-2 relative)
    python bench/deepspeed_check.py --dry-run    # two CPU processes, fp32 (tolerance 1e-6)

The plain run uses launch/single_gpu.yaml (launch/multi_gpu.yaml for the two CPU processes);
each file is launched as the README shows, overriding only the process count.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--config", "configs/quickstart/stage1.yaml", "--max-steps", "3", "--save-every", "3",
         "--batch-size", "8", "--query-max-len", "32", "--passage-max-len", "48", "--report-to", "none",
         "--progress-bar", "false"]  # fmt: skip


def first_losses(launch_file: str, processes: int, run_dir: Path) -> list[float]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_file,
               "--num_processes", str(processes), "train/stage1.py", *FLAGS, "--output-dir", str(run_dir)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        sys.exit(f"{launch_file} failed:\n{result.stderr[-4000:]}")
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="two CPU processes instead of one GPU")
    args = parser.parse_args()
    processes, tolerance = (2, 1e-6) if args.dry_run else (1, 1e-2)
    plain = "launch/multi_gpu.yaml" if args.dry_run else "launch/single_gpu.yaml"
    work = Path(tempfile.mkdtemp(prefix="tpembed-deepspeed-"))
    reference = first_losses(plain, processes, work / "plain")
    print(f"{plain}: losses {[round(x, 5) for x in reference]}")
    failures = 0
    for launch_file in ("launch/deepspeed_zero2.yaml", "launch/deepspeed_zero3.yaml"):
        losses = first_losses(launch_file, processes, work / Path(launch_file).stem)
        relative = abs(losses[0] - reference[0]) / abs(reference[0])
        verdict = "ok" if relative <= tolerance else "DIFFERENT"
        failures += verdict != "ok"
        print(f"{launch_file}: losses {[round(x, 5) for x in losses]}, first step vs plain: "
              f"relative difference {relative:.2e} (tolerance {tolerance:g}) {verdict}")  # fmt: skip
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

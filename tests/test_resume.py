"""Kill a run with SIGKILL anywhere and resume it: the steps that run again give the losses they
gave before the kill."""

import contextlib
import json
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, free_port, subprocess_env
from tpembed.train.checkpoint import complete_checkpoints, latest_checkpoint

STAGE1 = REPO / "configs/quickstart/stage1.yaml"
STAGE2 = REPO / "configs/quickstart/stage2.yaml"
# small and short, with a schedule that changes every step (warm-up 2, linear decay to step 10)
COMMON = ["--max-steps", "10", "--save-every", "3", "--warmup-steps", "2", "--batch-size", "8",
          "--query-max-len", "32", "--passage-max-len", "48", "--report-to", "none", "--progress-bar", "false",
          "--keep-last", "2"]  # fmt: skip


def command(script, config, run_dir, processes, *flags):
    """Two processes start from the shipped launch/multi_gpu.yaml, as the README shows (only the
    process count and the port change)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if processes > 1:
        launcher[3:3] = ["--config_file", str(REPO / "launch/multi_gpu.yaml")]
        launcher += ["--main_process_port", free_port()]
    return [*launcher, str(REPO / "train" / script), "--config", str(config), "--output-dir", str(run_dir),
            *COMMON, *flags]  # fmt: skip


def run(cmd):
    """Run to the end; returns stderr."""
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stderr


def run_until_killed(cmd, condition, timeout=300):
    """Start `cmd` and SIGKILL its whole process tree once `condition()` holds; returns what it
    wrote to stderr."""
    process = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the kill point: {process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            kill_tree(process.pid)
            raise AssertionError("kill point never reached")
        time.sleep(0.002)
    kill_tree(process.pid)
    process.wait()
    stderr = process.stderr.read()
    process.stderr.close()
    return stderr


def kill_tree(pid):
    """SIGKILL a launcher and every process under it, frozen first so that they all stop at one
    instant. The launcher starts its workers in sessions of their own: killing its process group
    would leave them running."""
    launcher = psutil.Process(pid)
    launcher.suspend()  # it can start nothing while its tree is collected
    tree = [launcher, *launcher.children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.suspend()
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    deadline = time.time() + 60
    for process in tree[1:]:  # not our children: wait until gone, or a zombie nobody has reaped yet
        while not dead(process):
            assert time.time() < deadline, f"process {process.pid} survived SIGKILL"
            time.sleep(0.01)


def dead(process):
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def staging_of(run_dir, step):
    return run_dir / "checkpoints" / f".tmp-step-{step:08d}"


def assert_replayed(resumed, before, from_step, rel=0.0):
    """The steps after `from_step` that ran before the kill and again after the resume: same
    datasets and learning rates, and losses identical (fp32 on CPU), or within `rel` where the
    two legs ran with different process counts (their sums are ordered differently)."""
    replayed = [r for r in before if r["step"] > from_step]
    assert replayed, f"nothing logged after step {from_step} before the kill"
    assert [r["step"] for r in resumed[: len(before)]] == [r["step"] for r in before], "steps in order, none lost"
    for b in replayed:
        a = resumed[b["step"] - 1]
        assert (a["step"], a["dataset"], a["lr"]) == (b["step"], b["dataset"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=rel, abs=0), (a["step"], a["loss"], b["loss"])


def kill_during_a_save(cmd, run_dir):
    """Kill while a checkpoint is being written; retries at later saves if one completes first."""
    for step in (6, 9):
        run_until_killed(cmd, lambda: staging_of(run_dir, step).exists() or latest_checkpoint_step(run_dir) >= step)
        if staging_of(run_dir, step).exists() and latest_checkpoint_step(run_dir) < step:
            return step
        cmd = cmd + ["--resume-from", "auto"] if "--resume-from" not in cmd else cmd
    pytest.fail("never caught a save in progress")


def logged_past_a_checkpoint(run_dir, checkpoint, steps, last=10):
    """Whether a checkpoint at or after step `checkpoint` is complete and `steps` more steps (as
    many as are left) are logged after it: a kill now makes the resume run them again."""
    latest = latest_checkpoint_step(run_dir)
    return latest >= checkpoint and len(logged_steps(run_dir)) >= min(latest + steps, last)


def latest_checkpoint_step(run_dir):
    found = complete_checkpoints(run_dir)
    return found[-1][0] if found else 0


def test_kill_anywhere_and_resume(tmp_path):
    """Two processes (the barriers and per-rank state of a save are what can break), killed while
    saving and between steps; the steps between the checkpoint and a kill run again after the
    resume and must give the same losses. The middle leg runs with one process: a checkpoint moves
    from two processes to one and back, and the data order does not change (the sampler ignores
    the process count)."""
    run_dir = tmp_path / "run"
    cmd = command("stage1.py", STAGE1, run_dir, 2)
    # 1) SIGKILL in the middle of writing a checkpoint: the previous one stays complete
    killed_at = kill_during_a_save(cmd, run_dir)
    assert not (run_dir / "checkpoints" / f"step-{killed_at:08d}").exists()
    assert latest_checkpoint(run_dir).name == f"step-{killed_at - 3:08d}"
    first = logged_steps(run_dir)
    # 2) resume with one process, then SIGKILL it between steps, after the next checkpoint
    one = command("stage1.py", STAGE1, run_dir, 1, "--resume-from", "auto")
    stderr = run_until_killed(one, lambda: logged_past_a_checkpoint(run_dir, killed_at, 2))
    assert "resuming a 2-process run with 1 processes" in stderr, stderr[-3000:]
    assert f"at step {killed_at - 3}\n" in stderr, stderr[-3000:]
    second = logged_steps(run_dir)
    assert_replayed(second, first, killed_at - 3, rel=1e-5)
    resumed_at = latest_checkpoint_step(run_dir)
    # 3) resume with two processes to the end
    stderr = run(cmd + ["--resume-from", "auto"])
    assert "resuming a 1-process run with 2 processes" in stderr, stderr[-3000:]
    assert f"at step {resumed_at}\n" in stderr, stderr[-3000:]
    last = logged_steps(run_dir)
    assert [r["step"] for r in last] == list(range(1, 11))
    if resumed_at < 10:  # (10 only when the first catch failed and the last save beat the kill)
        assert_replayed(last, second, resumed_at, rel=1e-5)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "stale staging directories are removed"
    assert [s for s, _ in complete_checkpoints(run_dir)] == [9, 10], "keep_last=2"


def test_stage2_kill_and_resume(tmp_path, quickstart_stage1):
    """Two processes, several task types: every sampler and RNG state of stage 2 comes back (the
    steps after the checkpoint run again with identical losses)."""
    flags = ["--init-from", str(quickstart_stage1), "--query-max-len", "64"]
    run_dir = tmp_path / "run"
    cmd = command("stage2.py", STAGE2, run_dir, 2, *flags)
    run_until_killed(cmd, lambda: logged_past_a_checkpoint(run_dir, 3, 2))
    before, resumed_at = logged_steps(run_dir), latest_checkpoint_step(run_dir)
    stderr = run(cmd + ["--resume-from", "auto"])
    assert f"at step {resumed_at}\n" in stderr, stderr[-3000:]
    after = logged_steps(run_dir)
    assert [r["step"] for r in after] == list(range(1, 11))
    assert_replayed(after, before, resumed_at)
    tasks = {r["task"] for r in after}
    assert len(tasks) >= 2, f"the check should cover more than one task type, saw {tasks}"

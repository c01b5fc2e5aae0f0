"""End-to-end tests on a real one-node SLURM cluster started on localhost.

tests/slurm/cluster.sh installs slurm + munge with apt-get when missing (needs root),
starts munged/slurmctld/slurmd without systemd and waits for the node to be idle.
When the cluster cannot be started here the whole module is skipped, with the reason
and the tail of the slurm logs in the skip message.

Run with:  pytest -m slurm tests/test_slurm.py -rs
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
SBATCH_EXAMPLE = REPO / "examples" / "slurm" / "pretrain_long.sbatch"

# Start may include `apt-get install` (about 10-30 s, longer with `apt-get update`).
START_TIMEOUT_S = int(os.environ.get("SLURM_TEST_START_TIMEOUT_S", "900"))
# Wall-clock limit for the training job (CPU demo sizes).
TRAIN_TIMEOUT_S = int(os.environ.get("SLURM_TEST_TRAIN_TIMEOUT_S", "1800"))

# Environment for examples/pretrain_long.sh: CPU demo sizes. Every size there is an env
# variable; keep these names in sync with that script (unknown names are ignored).
DEMO_ENV = {
    # The demo's model and sequence sizes, fewer iterations; output under the job's tmp dir.
    "TRAIN_ITERS": "8",
    "EVAL_INTERVAL": "4",
    "SAVE_INTERVAL": "8",
}

ITER_RE = re.compile(r"iteration\s+(\d+)\s*/\s*(\d+)\s*\|.*?lm loss:? ([0-9.eE+-]+)")


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f"--- {path} (last {n} lines) ---\n" + "\n".join(lines[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tails(cluster_dir: Path) -> str:
    parts = [_tail(cluster_dir / "log" / name) for name in ("slurmctld.log", "slurmd.log")]
    parts += [_tail(cluster_dir / "apt.log", 10), _tail(Path("/var/log/munge/munged.log"), 10)]
    return "\n".join(p for p in parts if p)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Start the cluster; yield the environment (with SLURM_CONF) for sbatch/srun."""
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("SLURM test cluster needs Linux and bash")
    cluster_dir = tmp_path_factory.mktemp("slurm_cluster")
    # Free ports, so a cluster already running on the default 6817/6818 doesn't clash.
    start_env = dict(os.environ, SLURM_TEST_CTLD_PORT=str(_free_port()),
                     SLURM_TEST_SLURMD_PORT=str(_free_port()))
    try:
        proc = subprocess.run(
            ["bash", str(CLUSTER_SH), "start", str(cluster_dir)],
            capture_output=True, text=True, timeout=START_TIMEOUT_S, env=start_env,
        )
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(cluster_dir)],
                       capture_output=True, timeout=120)
        pytest.skip(f"SLURM cluster did not start within {START_TIMEOUT_S}s\n"
                    + _log_tails(cluster_dir))
    conf = None
    for line in proc.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            conf = line.split("=", 1)[1].strip()
    if proc.returncode != 0 or not conf:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(cluster_dir)],
                       capture_output=True, timeout=120)
        # cluster.sh's own messages (the reason is its last one), then the log tails.
        msgs = [l for l in proc.stderr.splitlines() if l.startswith("[cluster.sh]")]
        reason = msgs[-1] if msgs else f"cluster.sh rc={proc.returncode}"
        pytest.skip(
            f"SLURM cluster could not start here: {reason}\n"
            + "\n".join(msgs[-10:]) + "\n" + _log_tails(cluster_dir)
        )

    env = dict(os.environ)
    env["SLURM_CONF"] = conf
    # Jobs inherit this environment (sbatch --export=ALL): make the venv's python/torchrun
    # the ones found on PATH inside the job.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if var != "SLURM_CONF":
            del env[var]  # don't leak an outer allocation into the test jobs
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(cluster_dir)],
                       capture_output=True, timeout=120)


def _sbatch_wait(env, args, timeout, cwd=REPO):
    """`sbatch --parsable --wait ARGS`; returns (returncode, job_id, stdout+stderr)."""
    cmd = ["sbatch", "--parsable", "--wait", *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        job = out.strip().split(";")[0].splitlines()[0] if out.strip() else None
        if job:
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=60)
        pytest.fail(f"job did not finish within {timeout}s: {' '.join(cmd)}")
    out = proc.stdout.strip()
    job_id = out.splitlines()[0].split(";")[0] if out else None
    return proc.returncode, job_id, proc.stdout + proc.stderr


def test_two_task_job(slurm_env, tmp_path):
    script = tmp_path / "two_tasks.sbatch"
    out_file = tmp_path / "two_tasks-%j.out"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=two-tasks\n"
        "#SBATCH --nodes=1\n"
        "#SBATCH --ntasks=2\n"
        "set -euo pipefail\n"
        "srun bash -c 'echo \"TASK procid=$SLURM_PROCID ntasks=$SLURM_NTASKS "
        "localid=$SLURM_LOCALID nodelist=$SLURM_JOB_NODELIST host=$(hostname)\"'\n"
    )
    rc, job_id, log = _sbatch_wait(slurm_env, [f"--output={out_file}", str(script)],
                                   timeout=300, cwd=tmp_path)
    assert rc == 0, f"sbatch --wait failed (rc={rc}):\n{log}"
    out = Path(str(out_file).replace("%j", job_id)).read_text()
    tasks = re.findall(r"TASK procid=(\d+) ntasks=(\d+) localid=(\d+)", out)
    assert sorted(int(p) for p, _, _ in tasks) == [0, 1], out
    assert {n for _, n, _ in tasks} == {"2"}, out
    assert sorted(int(lid) for _, _, lid in tasks) == [0, 1], out


def test_pretrain_long_sbatch(slurm_env, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    out_file = tmp_path / "pretrain-%j.out"
    env = dict(slurm_env)
    env.update(DEMO_ENV)
    env["METRICS_JSONL"] = str(metrics)
    env["OUTPUT_DIR"] = str(tmp_path / "run")  # fresh checkpoints: nothing to resume from
    env.setdefault("LAUNCHER", "srun")
    time_limit_min = max(1, math.ceil(TRAIN_TIMEOUT_S / 60))
    rc, job_id, log = _sbatch_wait(
        env,
        ["--ntasks=2", "--nodes=1", f"--time={time_limit_min}", f"--output={out_file}",
         str(SBATCH_EXAMPLE)],
        timeout=TRAIN_TIMEOUT_S + 120,
    )
    out_path = Path(str(out_file).replace("%j", job_id or "?"))
    out = out_path.read_text(errors="replace") if out_path.exists() else "<no job output>"
    # No accounting here (no sacct): `sbatch --wait` exits with the job's exit code,
    # 0 only when the job COMPLETED.
    assert rc == 0, f"job {job_id} did not complete (rc={rc}):\n{log}\n{out[-4000:]}"

    losses = {}
    for m in ITER_RE.finditer(out):
        losses[int(m.group(1))] = float(m.group(3))
    assert len(losses) >= 2, f"expected >= 2 'iteration i/n | ... | lm loss x |' lines:\n{out[-4000:]}"
    its = sorted(losses)
    first, last = losses[its[0]], losses[its[-1]]
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert last < first, f"loss did not decrease: {[(i, losses[i]) for i in its]}"

    assert metrics.exists(), f"METRICS_JSONL={metrics} not written:\n{out[-4000:]}"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    jl = [float(r["loss"]) for r in records if "loss" in r]
    assert jl, f"no 'loss' fields in {metrics}: {records[:5]}"
    assert all(math.isfinite(v) for v in jl), jl

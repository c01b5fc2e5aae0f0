"""tools/gpu_check.py on CPU at tiny sizes: the stages that can run here pass, the GPU-only ones
SKIP, a stage that fails (or whose process dies) is a FAIL with a non-zero exit status, and the
JSON output carries the numbers."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "tools", "gpu_check.py")
LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+)( |$)")


def run_check(tmp_path, *extra, timeout=400):
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--output",
                           str(output), *extra], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = {}
    for line in proc.stdout.splitlines():
        match = LINE.match(line)
        if match:
            assert match.group(2) not in lines, f"two lines for {match.group(2)}:\n{proc.stdout}"
            lines[match.group(2)] = match.group(1)
    with open(output) as f:
        report = json.load(f)
    return proc, lines, report


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("gpu_check"))


def test_cpu_run_passes_what_runs_here_and_skips_gpu_stages(cpu_run):
    proc, lines, report = cpu_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines == {"environment": "PASS", "model_builds": "PASS", "correctness_2k": "PASS",
                     "speed_memory": "SKIP", "packed_training_smoke": "PASS", "mfu_8k": "SKIP"}, \
        proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == "gpu_check: 4 passed, 0 failed, 2 skipped"
    assert report["finished"] and report["summary"] == {"passed": 4, "failed": 0, "skipped": 2}
    assert os.path.exists(report["log"])


def test_json_output_has_the_numbers(cpu_run):
    _, _, report = cpu_run
    stages = report["stages"]
    env = stages["environment"]["numbers"]
    assert env["cuda"] is False and env["megatron_core"] and env["flex_attention"] is True

    built = stages["model_builds"]["numbers"]
    assert built["attention"] == built["planned"] == "flex" and built["layer_spec"] == "local"
    assert built["layers"] == 2 and built["backward"] == "skipped_cpu"

    corr = stages["correctness_2k"]
    n = corr["numbers"]
    assert n["seq"] == 256 and n["cases"] == 5 and n["cases_skipped"] == 0
    # fp32 on CPU: every backend agrees with the fp64 reference to ~1e-6.
    for key in ("flex_out", "blockwise_out", "blockwise_dq", "blockwise_dk", "blockwise_dv",
                "sdpa_out", "sdpa_dq"):
        assert 0 <= n[key] < 1e-5, (key, n[key])
    assert "flex_dq" not in n and n["flex_bwd"].startswith("SKIP")  # FlexAttention: no CPU backward
    kinds = {(c["kind"], c["cp"], c["groups"]) for c in corr["details"]["cases"]}
    assert kinds == {("causal", 1, 2), ("documents", 1, 2), ("branches", 1, 1),
                     ("documents", 2, 2), ("branches", 4, 1)}

    packed = stages["packed_training_smoke"]["numbers"]
    assert packed["attention"] == "flex" and packed["train"] == "SKIP_cpu"
    assert packed["loss_max_rel"] <= 1e-5 and packed["logits_err"] <= 1e-5
    assert packed["leak_logits_err"] > 0.1  # without the document mask the check sees the leak

    for stage in ("speed_memory", "mfu_8k"):
        assert stages[stage]["numbers"]["reason"] == "needs_cuda"


def test_a_failing_stage_is_reported_and_fails_the_run(tmp_path):
    """--inject-failure perturbs FlexAttention's output by 10%: correctness_2k must catch it."""
    proc, lines, report = run_check(tmp_path, "--stages", "environment,correctness_2k",
                                    "--inject-failure", "correctness_2k")
    assert proc.returncode != 0
    assert lines == {"environment": "PASS", "correctness_2k": "FAIL"}, proc.stdout
    result = report["stages"]["correctness_2k"]
    assert result["status"] == "FAIL" and "flex out error" in result["error"]
    assert result["numbers"]["flex_out"] > 0.05 and result["numbers"]["blockwise_out"] < 1e-5
    assert proc.stdout.rstrip().splitlines()[-1] == "gpu_check: 1 passed, 1 failed, 0 skipped"


def test_a_stage_whose_process_dies_fails_alone(tmp_path):
    """A crash (as a CUDA fault would) costs only the running stage; a new process runs the rest."""
    proc, lines, report = run_check(tmp_path, "--stages", "environment,model_builds",
                                    "--inject-failure", "crash:environment")
    assert proc.returncode != 0
    assert lines == {"environment": "FAIL", "model_builds": "PASS"}, proc.stdout
    assert "died" in report["stages"]["environment"]["error"]

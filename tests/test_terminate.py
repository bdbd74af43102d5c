"""SIGTERM (docker stop, SLURM preemption) stops pretraining with a checkpoint; the same
command then resumes."""

import os
import signal
import subprocess
import sys
import time

import torch


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(small_dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bids_roimae.cli", str(small_dataset.root), str(out),
           "group", "--patch-size", "3", "--steps", "60", "--batch-size", "2",
           "--skip-bids-validation"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    deadline = time.time() + 240
    for line in proc.stderr:
        seen.append(line)
        if "step 10/60" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(seen)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, "".join(seen) + rest
    assert "rerun the same command to resume" in rest and "Traceback" not in rest
    ckpt = out / "models" / "roimae_mask-roi_preset-tiny_ps-3" / "checkpoint.pt"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= step < 60
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {step}" in done.stderr
    final = torch.load(ckpt.with_name("model.pt"), weights_only=True)
    assert final["step"] == 60

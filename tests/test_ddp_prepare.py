"""``group --mode pretrain`` under torchrun: each run is prepared once, by one rank."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

PREPARED = re.compile(r"(sub-\w+?_task-\w+(?:_run-\w+)?): prepared \d+ frames")


def test_two_cpu_ranks_prepare_each_run_once(small_dataset, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "torchrun-logs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "--log-dir", str(logs), "--redirects", "3", "-m", "bids_roimae.cli",
         str(small_dataset.root), str(out), "group", "--mode", "pretrain",
         "--skip-bids-validation", "--device", "cpu", "--model-preset", "tiny",
         "--steps", "2", "--batch-size", "2", "-w", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=300)
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert proc.returncode == 0, "\n".join(v[-2000:] for v in rank_logs.values())
    assert sorted(rank_logs) == [0, 1]

    per_rank = {rank: Counter(PREPARED.findall(text)) for rank, text in rank_logs.items()}
    total = per_rank[0] + per_rank[1]
    n_runs = len(small_dataset["bold_files"])
    assert len(list((out / "cache").rglob("*.npy"))) == n_runs == 6
    # every cache entry was made by exactly one rank, and both ranks did a share
    assert len(total) == n_runs and set(total.values()) == {1}
    assert sum(per_rank[0].values()) == sum(per_rank[1].values()) == n_runs // 2
    summary = json.loads(next((out / "models").glob("*/summary.json")).read_text())
    assert summary["world_size"] == 2 and summary["n_runs"] == n_runs
    assert all(re.search(rf"rank {r} of 2 prepares {n_runs // 2} of {n_runs} runs", text)
               for r, text in rank_logs.items())
    assert not list(Path(out).rglob("*.tmp*"))

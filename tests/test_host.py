"""The host's memory and cores as the analysis passes size themselves from them."""

import os

from bids_roimae.host import UNKNOWN_MEMORY_BYTES, available_memory, usable_cores

GIB = 1 << 30


def write_meminfo(path, free_kb, available_kb):
    path.write_text(f"MemTotal:       24000000 kB\nMemFree:        {free_kb} kB\n"
                    f"MemAvailable:   {available_kb} kB\nBuffers:           1000 kB\n")
    return path


def test_page_cache_counts_as_available(tmp_path):
    """After reading a few runs, most free memory is page cache: MemAvailable, not
    MemFree, is what a pass may use."""
    meminfo = write_meminfo(tmp_path / "meminfo", 1_000_000, 20_000_000)
    assert available_memory(meminfo, tmp_path / "no-cgroup") == 20_000_000 * 1024


def test_a_container_memory_limit_caps_it(tmp_path):
    meminfo = write_meminfo(tmp_path / "meminfo", 1_000_000, 20_000_000)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{6 * GIB}\n")
    (v2 / "memory.current").write_text(f"{2 * GIB}\n")
    assert available_memory(meminfo, v2) == 4 * GIB
    (v2 / "memory.max").write_text("max\n")  # no limit
    assert available_memory(meminfo, v2) == 20_000_000 * 1024
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{3 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    assert available_memory(meminfo, tmp_path / "v1") == 2 * GIB
    (v1 / "memory.limit_in_bytes").write_text(f"{(1 << 63) - 4096}\n")  # v1's "no limit"
    assert available_memory(meminfo, tmp_path / "v1") == 20_000_000 * 1024


def test_unreadable_meminfo_falls_back(tmp_path):
    value = available_memory(tmp_path / "missing", tmp_path / "missing")
    assert value > 0
    assert value == UNKNOWN_MEMORY_BYTES or value <= os.sysconf("SC_PHYS_PAGES") * \
        os.sysconf("SC_PAGE_SIZE")


def test_cores_are_the_affinity_set():
    assert usable_cores() == len(os.sched_getaffinity(0))

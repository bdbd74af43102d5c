"""predict reads each run's windows once for the prediction, IG and fidelity."""

import numpy as np

from bids_roimae.app.predict import read_run_windows
from bids_roimae.training.windows import window_starts


class CountingEntry:
    """A cache entry that counts how often its token file is opened and read."""

    def __init__(self, n_frames, n_tokens=5, n_voxels=3):
        self.n_frames = n_frames
        self._tokens = np.arange(n_frames * n_tokens * n_voxels, dtype=np.float32).reshape(
            n_frames, n_tokens, n_voxels)
        self.opened = self.reads = 0

    def tokens(self):
        self.opened += 1
        return self._tokens

    def window(self, start, length, out=None, tokens=None):
        self.reads += 1
        block = (self._tokens if tokens is None else tokens)[start:start + length]
        out[...] = block
        return out


def test_one_read_serves_prediction_and_attribution():
    entry = CountingEntry(n_frames=47)
    rw = read_run_windows(entry, window=8, per_run_predict=5, per_run_attribution=3)
    predict, attribution = window_starts(47, 8, 5), window_starts(47, 8, 3)
    assert entry.opened == 1  # one memory map for the run
    assert entry.reads == len(np.union1d(predict, attribution)) < len(predict) + len(attribution)
    for rows, starts in ((rw.predict_rows, predict), (rw.attribution_rows, attribution)):
        assert len(rows) == len(starts)
        for row, start in zip(rows, starts):
            np.testing.assert_array_equal(rw.windows[row], entry._tokens[start:start + 8])
    assert read_run_windows(CountingEntry(n_frames=6), 8, 5, 3) is None  # shorter than a window

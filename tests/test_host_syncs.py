"""The training loop reads the device once per log line, not once (or a dozen times) per step.

On CPU nothing really waits, so the test counts what would wait on a GPU: every read of a tensor's value into
Python (``item``, ``tolist``, ``bool(t)``, ``float(t)``, ``int(t)``, ``t.cpu()``, ``t.numpy()``, ...). Reads of
the loader's own CPU tensors (the pairs' overlap boxes) are host data and do not count; neither do data loading,
checkpoints, validation and the end of the run, which are sync points by nature.
"""
import contextlib
import traceback

import pytest
import torch

from test_train import tiny

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class ReadCounter:
    """Counts value reads of tensors while ``phase`` is set, and where they came from."""

    def __init__(self):
        self.phase = None
        self.reads = {"step": [], "log": []}
        self.host_inputs = []  # the loader's batches: CPU data before it reaches the device
        self._inside = False

    @contextlib.contextmanager
    def in_phase(self, phase):
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def wrap(self, name, real):
        def read(tensor, *args, **kwargs):
            if self.phase and not self._inside and not any(tensor is t for t in self.host_inputs):
                where = next((f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in
                              reversed(traceback.extract_stack()[:-1]) if "/cacnb/" in f.filename), "?")
                self.reads[self.phase].append(f"{name} at {where}")
            outer, self._inside = self._inside, True  # one read may call another (float -> item)
            try:
                return real(tensor, *args, **kwargs)
            finally:
                self._inside = outer
        return read


@pytest.fixture
def counter(monkeypatch):
    import cacnb.train as train_mod

    counter = ReadCounter()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    trainer = train_mod.Trainer
    real_run, real_log, real_loader = trainer.run, trainer._log_train, trainer._loader
    calls = {"log": 0}

    def run(self):
        with counter.in_phase("step"):
            return real_run(self)

    def log_train(self, *args, **kwargs):
        calls["log"] += 1
        with counter.in_phase("log"):
            return real_log(self, *args, **kwargs)

    def loader(self, *args, **kwargs):
        with counter.in_phase(None):  # the sampler's seed: a CPU generator
            batches = real_loader(self, *args, **kwargs)

        def counted():
            while True:
                with counter.in_phase(None):
                    batch = next(batches)
                counter.host_inputs.extend(batch.values())
                yield batch
        return counted()

    def not_counted(real):
        def call(self, *args, **kwargs):
            with counter.in_phase(None):
                return real(self, *args, **kwargs)
        return call

    monkeypatch.setattr(trainer, "run", run)
    monkeypatch.setattr(trainer, "_log_train", log_train)
    monkeypatch.setattr(trainer, "_loader", loader)
    for boundary in ("_save", "_maybe_validate", "_finish"):  # checkpoints, validation, the final digests
        monkeypatch.setattr(trainer, boundary, not_counted(getattr(trainer, boundary)))
    counter.log_lines = calls
    return counter


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")  # the tiny run's random weights
def test_one_host_read_per_log_line(tmp_path, synthetic_data_dir, counter):
    from cacnb.train import train

    # 3 supervised warm-up steps, then 3 CAC steps; a log line every 3 steps
    train(tiny(tmp_path, synthetic_data_dir, **{"train.log_every": 3, "train.val_every": 0,
                                                "loss.epoch_start_unsup": 1}))
    assert counter.log_lines["log"] == 2
    reads = counter.reads
    assert len(reads["log"]) == 2, reads["log"]  # means, NaN/Inf check and stop flag in one transfer
    # The one inherent read inside a step: the CAC loss streams its negatives in label blocks whose sizes (and
    # the count of active anchors) must reach Python, in one transfer (cacnb.contrastive._plan). Supervised
    # steps read nothing.
    assert len(reads["step"]) <= 3, reads["step"]
    assert all("_plan" in r for r in reads["step"]), reads["step"]

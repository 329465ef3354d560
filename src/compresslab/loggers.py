"""Loggers that keep what an earlier attempt of a resumed run logged.

Lightning's ``CSVLogger`` deletes ``csv/metrics.csv`` when it starts on a folder that
has one, so ``resume=`` would lose every row logged before the interruption. This one
appends: the rows already in the file stay, the header is taken over (and widened, with
the old rows rewritten, when new metric names appear), and a last row cut short by a
kill is dropped rather than glued to the next one.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            text = file.read()
        if text and not text.endswith("\n"):  # the process died while writing a row
            text = text[:text.rfind("\n") + 1]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                file.write(text)
        header = next(csv.reader(text.splitlines()), [])
        # the writer appends with its columns sorted, as Lightning wrote the header
        self.metrics_keys = sorted(header)
        if header != self.metrics_keys:
            self._rewrite_with_new_header(self.metrics_keys)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` (see the module)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

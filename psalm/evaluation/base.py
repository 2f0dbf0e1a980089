"""A detectron2 ``DatasetEvaluator`` base for per-sample metrics whose ground truth is in the data set.

Subclasses implement ``_process_one(record, inp, out) -> stats`` (small, picklable) and
``_summarize(stats_by_key) -> dict``. The base looks ground truth up by ``sample_id`` in
``DatasetCatalog.get(dataset_name)`` (loaded once per process, on first use), gathers the
per-sample statistics of every rank with ``detectron2.utils.comm.gather`` and summarises on the
main process; other ranks return ``None`` from ``evaluate`` (detectron2 convention).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

logger = logging.getLogger(__name__)


def sample_key(d: dict):
    """The evaluator key of a dataset dict or mapped input: ``sample_id``, else ``image_id``."""
    if "sample_id" in d:
        return d["sample_id"]
    if "image_id" in d:
        return d["image_id"]
    raise KeyError(
        "model input has neither 'sample_id' nor 'image_id': the data mapper must pass them through "
        "(docs/DESIGN.md, 'Dataset dicts')"
    )


class SampleGTEvaluator(DatasetEvaluator):
    """Base: per-sample statistics, GT from the registered data set (see module docstring)."""

    task_key = "sample"

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: str | None = None):
        self.dataset_name = dataset_name
        self.metadata = MetadataCatalog.get(dataset_name)
        self._distributed = distributed
        self._output_dir = output_dir
        self._records: dict | None = None
        self._stats: dict = {}
        self._logger = logging.getLogger(type(self).__module__)

    def reset(self):
        self._stats = {}

    # ----------------------------------------------------------------- ground truth
    def _record(self, inp: dict) -> dict:
        if self._records is None:
            records = DatasetCatalog.get(self.dataset_name)
            self._records = {}
            for r in records:
                k = sample_key(r)
                if k in self._records:
                    raise ValueError(
                        f"data set '{self.dataset_name}' has two samples with key {k!r}; "
                        "its dicts need a unique 'sample_id'"
                    )
                self._records[k] = r
        if "sample_id" not in inp and self._records and "sample_id" in next(iter(self._records.values())):
            raise KeyError(
                f"model input for {inp.get('file_name', '?')!r} has no 'sample_id', but the dicts of "
                f"'{self.dataset_name}' are keyed by it: the data mapper must pass 'sample_id' through"
            )
        k = sample_key(inp)
        if k not in self._records:
            raise KeyError(f"sample {k!r} is not in data set '{self.dataset_name}'")
        return self._records[k]

    # ----------------------------------------------------------------- DatasetEvaluator API
    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            record = self._record(inp)
            self._stats[sample_key(record)] = self._process_one(record, inp, out)

    def _gathered(self) -> dict | None:
        if not self._distributed:
            return dict(self._stats)
        comm.synchronize()
        parts = comm.gather(self._stats, dst=0)
        if not comm.is_main_process():
            return None
        merged = {}
        for part in parts:
            merged.update(part)  # a sample seen by two ranks counts once
        return merged

    def evaluate(self):
        stats = self._gathered()
        if stats is None:
            return None
        if not stats:
            self._logger.warning("[%s] no predictions were processed for '%s'", type(self).__name__, self.dataset_name)
            return OrderedDict()
        n_total = len(self._records) if self._records is not None else None
        if n_total is not None and len(stats) < n_total:
            self._logger.warning(
                "[%s] evaluated %d of the %d samples of '%s'", type(self).__name__, len(stats), n_total, self.dataset_name
            )
        results = self._summarize(stats)
        self._logger.info("[%s] %s on '%s' (%d samples): %s", type(self).__name__, self.task_key,
                          self.dataset_name, len(stats), results)
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            path = os.path.join(self._output_dir, f"{self.task_key}_per_sample.json")
            with open(path, "w") as f:
                json.dump({str(k): v for k, v in stats.items()}, f)
        return OrderedDict({self.task_key: results})

    # ----------------------------------------------------------------- to implement
    def _process_one(self, record: dict, inp: dict, out: dict):
        raise NotImplementedError

    def _summarize(self, stats: dict) -> dict:
        raise NotImplementedError

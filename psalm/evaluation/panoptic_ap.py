"""Thing mask AP of a panoptic run: detectron2's ``COCOEvaluator`` on an instance-evaluation view.

A panoptic data set numbers its K classes (things and stuff) 0..K-1, so its thing classes need not
be 0..T-1: ADE20K-150's 100 things are interleaved with stuff (``bed`` is 7). detectron2's
``COCOEvaluator`` maps predicted classes back to data-set ids through
``thing_dataset_id_to_contiguous_id`` and requires those ids to be exactly 0..T-1.
:class:`PanopticThingAPEvaluator` therefore

* registers a metadata-only view ``<dataset>/thing_ap_view`` (:func:`thing_ap_view`) with the
  panoptic set's instance annotations (``json_file``: ``instances_*2017.json`` for COCO, the json of
  ``datasets/prepare_ade20k_instance.py`` for ADE20K), ``thing_classes`` and
  ``thing_dataset_id_to_contiguous_id`` = {data-set id: rank 0..T-1 in data-set-id order};
* turns the ``pred_classes`` of each thing-only ``instances`` output from the K-class space into
  that rank, and each input's ``image_id`` into the id the instance json gives the same image file
  (Mask2Former's ADE jsons use the file stem for both; a json with other ids still matches);
* hands the result to ``COCOEvaluator(view, tasks=("segm",), use_fast_impl=False)`` (degenerate GT
  polygons dropped, :class:`~psalm.evaluation.coco_json.ValidPolygonCOCOEvaluator`; official
  COCO API), whose ``evaluate()`` it returns (``{"segm": {...}}``).

The panoptic metadata must hold ``json_file``, ``thing_classes`` (T names, contiguous-id order)
and ``thing_dataset_id_to_contiguous_id`` (data-set id -> id in the K-class space).
"""
from __future__ import annotations

import json
import logging
import os

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Instances

from psalm.data.datasets._common import MissingDatasetFileError

from .coco_json import ValidPolygonCOCOEvaluator

__all__ = ["PanopticThingAPEvaluator", "thing_ap_view", "THING_AP_VIEW_SUFFIX"]

logger = logging.getLogger(__name__)

THING_AP_VIEW_SUFFIX = "/thing_ap_view"


def _instance_json_path(dataset_name: str, meta) -> str:
    """The panoptic set's instance json; a clear error when it is not there."""
    path = meta.get("json_file", None)
    if path and os.path.isfile(path):
        return path
    hint = meta.get("instance_json_prepare", None) or "see datasets/README.md"
    raise MissingDatasetFileError(
        f"thing mask AP of panoptic data set '{dataset_name}' needs its instance annotations "
        f"(metadata 'json_file' = {path!r}), which do not exist. Create them ({hint}), or set "
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON False to evaluate without thing AP."
    )


def thing_ap_view(dataset_name: str) -> tuple[str, dict[int, int]]:
    """(Re-)register the instance-evaluation metadata view of panoptic data set ``dataset_name``.

    Returns:
        ``(view_name, k_to_rank)``: the name to give ``COCOEvaluator`` and the map from a
        K-class-space thing id to its rank 0..T-1 in the view.
    """
    meta = MetadataCatalog.get(dataset_name)
    json_file = _instance_json_path(dataset_name, meta)
    things = meta.get("thing_dataset_id_to_contiguous_id", None)
    names = meta.get("thing_classes", None)
    if not things or names is None or len(names) != len(things):
        raise ValueError(
            f"panoptic data set '{dataset_name}' needs metadata thing_dataset_id_to_contiguous_id and "
            f"thing_classes with one name per thing class (got {len(things or {})} ids, "
            f"{None if names is None else len(names)} names)"
        )
    # thing_classes are in contiguous-id order; the view ranks things in data-set-id order, the
    # order in which COCOeval reports per-category results
    name_of = dict(zip(sorted(things.values()), names))
    dataset_ids = sorted(int(d) for d in things)
    view = dict(
        json_file=json_file,
        thing_classes=[name_of[things[d]] for d in dataset_ids],
        thing_dataset_id_to_contiguous_id={d: r for r, d in enumerate(dataset_ids)},
        evaluator_type="coco",
        source_dataset=dataset_name,
    )
    view_name = dataset_name + THING_AP_VIEW_SUFFIX
    if view_name in MetadataCatalog.list():
        MetadataCatalog.remove(view_name)  # metadata values cannot be overwritten in place
    MetadataCatalog.get(view_name).set(**view)
    return view_name, {things[d]: r for r, d in enumerate(dataset_ids)}


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


class PanopticThingAPEvaluator(DatasetEvaluator):
    """Thing mask AP of a panoptic data set (module docstring); detectron2 ``DatasetEvaluator`` API."""

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: str | None = None):
        self.dataset_name = dataset_name
        self.view_name, self._k_to_rank = thing_ap_view(dataset_name)
        view = MetadataCatalog.get(self.view_name)
        with open(view.json_file, encoding="utf-8") as f:
            gt = json.load(f)
        json_ids = {int(c["id"]) for c in gt.get("categories", [])}
        if json_ids != set(view.thing_dataset_id_to_contiguous_id):
            raise ValueError(
                f"instance json {view.json_file!r} of '{dataset_name}' has {len(json_ids)} categories, but the "
                f"panoptic set has {len(self._k_to_rank)} thing classes; ids only in the json: "
                f"{sorted(json_ids - set(view.thing_dataset_id_to_contiguous_id))[:10]}, only in the panoptic "
                f"metadata: {sorted(set(view.thing_dataset_id_to_contiguous_id) - json_ids)[:10]}. Wrong json_file?"
            )
        self._id_by_stem = {_stem(img["file_name"]): img["id"] for img in gt["images"]}
        self._json_image_ids = {img["id"] for img in gt["images"]}
        del gt
        self._coco = ValidPolygonCOCOEvaluator(self.view_name, tasks=("segm",), distributed=distributed,
                                               output_dir=output_dir,
                                   use_fast_impl=False)

    def reset(self):
        self._coco.reset()

    def _json_image_id(self, inp: dict):
        stem = _stem(inp["file_name"]) if inp.get("file_name") else None
        if stem in self._id_by_stem:
            return self._id_by_stem[stem]
        if inp.get("image_id") in self._json_image_ids:
            return inp["image_id"]
        raise ValueError(
            f"image {inp.get('file_name')!r} (image_id {inp.get('image_id')!r}) of '{self.dataset_name}' is not in "
            f"its instance json {MetadataCatalog.get(self.view_name).json_file!r} (matched by file name, then "
            "image id); the panoptic and instance annotations must cover the same images"
        )

    def _to_view(self, instances: Instances) -> Instances:
        """A copy of thing-only ``instances`` with ``pred_classes`` as view ranks (K-space ids in)."""
        classes = instances.pred_classes.tolist()
        bad = sorted({c for c in classes if c not in self._k_to_rank})
        if bad:
            raise ValueError(
                f"'{self.dataset_name}': panoptic 'instances' predict class(es) {bad[:5]}, which are not thing classes "
                f"(there are {len(self._k_to_rank)}); panoptic instance outputs must be thing-only, which needs "
                "'is_thing' from the metadata's prompt_is_thing in the model input"
            )
        out = Instances(instances.image_size, **instances.get_fields())
        out.pred_classes = torch.tensor([self._k_to_rank[c] for c in classes], dtype=torch.int64)
        return out

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            instances = self._to_view(out["instances"].to("cpu"))
            self._coco.process([{"image_id": self._json_image_id(inp), "file_name": inp.get("file_name")}],
                               [{"instances": instances}])

    def evaluate(self):
        return self._coco.evaluate()

"""The PSALM meta-architecture (``META_ARCH_REGISTRY`` name ``"PSALM"``).

Data flow (``docs/DESIGN.md``, "Forward data flow"):

1. images (uint8 [B, 3, S, S]) normalised in fp32, cast to the model dtype; the Swin ``backbone``
   runs ONCE and its features feed both the projector and the pixel decoder;
2. ``projector(res5)`` -> image tokens [B, (S/64)^2, H];
3. one ``TokenizedPrompt`` per sample: built by the mapper in the data path (``x["prompt"]``), or
   here by the same :func:`~psalm.data.prompt.prompt_for_input` for inputs that come without one;
4. interactive: :class:`~psalm.modeling.conditions.RegionPooler` pools each visual prompt into a
   token; :class:`~psalm.modeling.sequence.SequenceAssembler` splices everything into
   ``inputs_embeds`` [B, L, H];
5. ``llm.model(inputs_embeds=...)`` -> hidden states after the final LayerNorm (no ``lm_head`` on
   segmentation forwards);
6. conditions: mask tokens -> ``mask_token_projector`` (queries [B, Q, D]); class spans ->
   ``class_projector`` [B, K+1, D]; refer span -> ``refer_projector`` [B, 1, D]; region tokens ->
   ``region_projector`` [R_b, D]; only the batch task's condition is computed;
7. ``pixel_decoder(features)`` -> mask features + 3 multi-scale maps;
8. ``predictor`` -> masks and the task's logits at every stage;
9. training: :class:`~psalm.modeling.criterion.SetCriterion` (segmentation) or the next-token
   loss (instruction / caption); inference: :class:`~psalm.modeling.postprocessing.PSALMPostProcessor`
   or ``llm.generate`` (instruction / caption).

A training batch must hold one task (the multi-task sampler guarantees it). At inference a batch may
mix tasks: it is split into groups of one task (and, for category tasks, one class count), each run
as one batched forward, and the outputs are returned in input order.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from ...config import extension_options_set
from .. import tasks as T
from ..conditions import (
    RegionPooler,
    category_condition,
    gather_mask_tokens,
    gather_region_tokens,
    sentence_condition,
)
from ..criterion import SetCriterion
from ..llm import build_llm, build_tokenizer, causal_lm_loss
from ..pixel_decoder import build_pixel_decoder
from ..postprocessing import PSALMPostProcessor
from ..projector import build_projector
from psalm.data.prompt import PromptBuilder, TokenizedPrompt, check_prompt_matches, prompt_for_input
from ..sequence import AssembledSequence, SequenceAssembler
from ..transformer_decoder import build_transformer_decoder

logger = logging.getLogger(__name__)

__all__ = ["PSALM", "Conditions", "SegmentationForward", "build_psalm_model", "parameter_counts"]


@dataclasses.dataclass
class Conditions:
    """Predictor inputs read from the LLM (D = decoder hidden size)."""

    queries: torch.Tensor  # [B, Q, D]
    classes: torch.Tensor | None = None  # [B, K+1, D], canonical order (class_names + background)
    refer: torch.Tensor | None = None  # [B, 1, D]
    regions: list[torch.Tensor] | None = None  # B x [R_b, D]


@dataclasses.dataclass
class SegmentationForward:
    """Everything one segmentation forward computed (for losses, post-processing and parity checks)."""

    task: str
    prompts: list[TokenizedPrompt]
    image_tokens: torch.Tensor  # [B, N, H]
    region_features: list[torch.Tensor] | None  # B x [R_b, H] (pooled visual prompts, LLM input)
    sequence: AssembledSequence
    hidden_states: torch.Tensor  # [B, L, H]
    conditions: Conditions
    outputs: dict  # predictor outputs (pred_masks, pred_*_logits, aux_outputs)


def _batch_task(batched_inputs: Sequence[Mapping]) -> str:
    tasks = {T.check_task(x["task"]) for x in batched_inputs}
    if len(tasks) != 1:
        raise ValueError(f"a batch must hold one task here, got {sorted(tasks)}")
    return tasks.pop()


@META_ARCH_REGISTRY.register()
class PSALM(nn.Module):
    """PSALM: Swin + projector + Phi + Mask2Former-style decoder, one model for every task.

    Inputs and outputs follow ``docs/DESIGN.md`` ("Model input" / "Model output"): ``forward``
    takes a list of per-image dicts; in training it returns a dict of scalar losses, at inference a
    list of result dicts. State-dict prefixes: ``backbone``, ``projector``, ``llm``, ``mask_tokens``,
    ``mask_token_projector``, ``class_projector``, ``refer_projector``, ``region_projector``,
    ``pixel_decoder``, ``predictor``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        projector: nn.Module,
        llm: nn.Module,
        pixel_decoder: nn.Module,
        predictor: nn.Module,
        criterion: nn.Module,
        region_pooler: RegionPooler,
        postprocessor: PSALMPostProcessor,
        tokenizer=None,
        num_mask_tokens: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        projector_in_feature: str = "res5",
        freeze_backbone: bool = True,
        backbone_eval_mode: bool = True,
        refer_pooling: str = "mean",
        shuffle_classes_train: bool = True,
        lm_loss_weight: float = 1.0,
        max_new_tokens: int = 128,
        seg_token: str = "[SEG]",
        model_max_length: int = 2048,
        prompt_style: str = "official",
    ):
        """
        Args:
            backbone: detectron2 ``Backbone`` with res2..res5 outputs.
            projector: res5 [B, C, h, w] -> image tokens [B, N, H].
            llm: transformers ``PhiForCausalLM`` (``llm.model`` gives the hidden states).
            pixel_decoder, predictor: the mask generator (``docs/DESIGN.md``).
            criterion: the segmentation :class:`SetCriterion`.
            region_pooler: visual prompts -> region tokens.
            postprocessor: predictor outputs -> detectron2-standard results.
            tokenizer: the PSALM tokenizer; None only for models that are never run (e.g. built on
                the meta device for checkpoint checks).
            num_mask_tokens: Q, equal to the predictor's number of queries.
            pixel_mean, pixel_std: RGB normalisation (0-255 scale).
            projector_in_feature: backbone feature fed to the projector.
            freeze_backbone: no gradients to the backbone (it runs under ``no_grad``).
            backbone_eval_mode: keep a frozen backbone in eval mode in ``train()`` (False: the
                official behaviour, DropPath stays active).
            refer_pooling: ``"mean"`` (official) or ``"last"``: see ``conditions.sentence_condition``.
            shuffle_classes_train: shuffle the class order of category prompts in training (official).
            lm_loss_weight: weight of the next-token loss of instruction / caption batches.
            max_new_tokens: generation length for instruction / caption inference.
        """
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.llm = llm
        hidden = llm.config.hidden_size
        decoder_dim = predictor.query_embed.weight.shape[1]
        if num_mask_tokens != predictor.num_queries:
            raise ValueError(
                f"MODEL.PSALM.NUM_MASK_TOKENS={num_mask_tokens} must equal MODEL.MASK_FORMER.NUM_OBJECT_QUERIES="
                f"{predictor.num_queries} (each mask token becomes one decoder query)"
            )
        self.mask_tokens = nn.Parameter(torch.zeros(num_mask_tokens, hidden))
        self.mask_token_projector = nn.Linear(hidden, decoder_dim)
        self.class_projector = nn.Linear(hidden, decoder_dim)
        self.refer_projector = nn.Linear(hidden, decoder_dim)
        self.region_projector = nn.Linear(hidden, decoder_dim)
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.criterion = criterion
        self.region_pooler = region_pooler
        self.postprocessor = postprocessor

        self.tokenizer = tokenizer
        self.prompt_builder = (
            PromptBuilder(tokenizer, seg_token=seg_token, model_max_length=model_max_length, style=prompt_style)
            if tokenizer is not None
            else None
        )
        self.sequence_assembler = SequenceAssembler("right")
        self.generation_assembler = SequenceAssembler("left")

        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"MODEL.PIXEL_MEAN / PIXEL_STD must have 3 values (RGB), got {pixel_mean} / {pixel_std}")
        # kept as Python floats: normalisation is always done in fp32 (exactly as the official mapper)
        self.pixel_mean = [float(v) for v in pixel_mean]
        self.pixel_std = [float(v) for v in pixel_std]
        self.projector_in_feature = projector_in_feature
        self.freeze_backbone = bool(freeze_backbone)
        self.backbone_eval_mode = bool(backbone_eval_mode)
        if refer_pooling not in ("mean", "last"):
            raise ValueError(f"MODEL.PSALM.REFER_POOLING must be 'mean' or 'last', got {refer_pooling!r}")
        self.refer_pooling = refer_pooling
        self.shuffle_classes_train = bool(shuffle_classes_train)
        self.lm_loss_weight = float(lm_loss_weight)
        self.max_new_tokens = int(max_new_tokens)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            if self.backbone_eval_mode:
                self.backbone.eval()

    @classmethod
    def from_config(cls, cfg, device: str | torch.device | None = None, tokenizer=None):
        """``device="meta"`` builds the structure only (no memory, no tokenizer needed)."""
        cls.check_extension_options(cfg)
        on_meta = device is not None and torch.device(device).type == "meta"
        if tokenizer is None and not on_meta:
            tokenizer = build_tokenizer(cfg)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        p = cfg.MODEL.PSALM
        if p.PROJECTOR.IN_FEATURE not in shapes:
            raise ValueError(
                f"MODEL.PSALM.PROJECTOR.IN_FEATURE={p.PROJECTOR.IN_FEATURE!r} is not a backbone output {list(shapes)}"
            )
        llm = build_llm(cfg, tokenizer=tokenizer, device=device)
        hidden = llm.config.hidden_size
        pixel_decoder = build_pixel_decoder(cfg, shapes)
        return {
            "backbone": backbone,
            "projector": build_projector(cfg, shapes[p.PROJECTOR.IN_FEATURE].channels, hidden),
            "llm": llm,
            "pixel_decoder": pixel_decoder,
            "predictor": build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, shapes),
            "criterion": SetCriterion(cfg),
            "region_pooler": RegionPooler.from_config(cfg),
            "postprocessor": PSALMPostProcessor(cfg),
            "tokenizer": tokenizer,
            "num_mask_tokens": p.NUM_MASK_TOKENS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "projector_in_feature": p.PROJECTOR.IN_FEATURE,
            "freeze_backbone": p.FREEZE_BACKBONE,
            "backbone_eval_mode": p.BACKBONE_EVAL_MODE,
            "refer_pooling": p.REFER_POOLING,
            "shuffle_classes_train": p.SHUFFLE_CLASSES_TRAIN,
            "lm_loss_weight": p.LM_LOSS_WEIGHT,
            "max_new_tokens": cfg.TEST.PSALM.MAX_NEW_TOKENS,
            "seg_token": p.SEG_TOKEN,
            "model_max_length": p.MODEL_MAX_LENGTH,
            "prompt_style": p.PROMPT_STYLE,
        }

    @classmethod
    def check_extension_options(cls, cfg) -> None:
        """The official model reads no ``MODEL.EXTENSIONS`` key: any of them set is an error (they are read
        by the classes of ``psalm.modeling.extensions``, selected by name; docs/DESIGN.md)."""
        options = extension_options_set(cfg)
        if options:
            raise ValueError(
                f"MODEL.EXTENSIONS.{{{', '.join(options)}}} set, but MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} "
                "(the official model) does not read them: select MODEL.META_ARCHITECTURE 'ExtendedPSALM' (and, for "
                "the scoring-head options, MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME 'ExtendedPSALMDecoder'), or "
                "leave MODEL.EXTENSIONS at its defaults"
            )

    # ------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.mask_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_tokens.dtype

    def train(self, mode: bool = True):
        """As ``nn.Module.train``, but a frozen backbone stays in eval mode (``BACKBONE_EVAL_MODE``)."""
        super().train(mode)
        if mode and self.freeze_backbone and self.backbone_eval_mode:
            self.backbone.eval()
        return self

    def _require_prompt_builder(self) -> PromptBuilder:
        if self.prompt_builder is None:
            raise RuntimeError(
                "this PSALM has no tokenizer (built on the meta device or without MODEL.PSALM.TOKENIZER); "
                "build it with a tokenizer to run it"
            )
        return self.prompt_builder

    # ------------------------------------------------------------------------------ vision
    def preprocess_images(self, batched_inputs: Sequence[Mapping]) -> torch.Tensor:
        """uint8 images [3, S, S] -> normalised [B, 3, S, S] (computed in fp32, cast to the model dtype)."""
        images = [x["image"] for x in batched_inputs]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"images of one batch must share one padded size, got {sorted(shapes)}")
        shape = shapes.pop()
        if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
            raise ValueError(f"images must be square padded RGB tensors [3, S, S] (PSALMDatasetMapper), got {shape}")
        x = torch.stack([im.to(self.device) for im in images]).float()
        mean = torch.tensor(self.pixel_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def encode_images(self, batched_inputs: Sequence[Mapping], with_pixel_decoder: bool = True) -> dict:
        """Image-only computations, shareable between prompts on the same image.

        Returns:
            ``{"features": {res2..res5}, "image_tokens": [B, N, H]}`` plus, with
            ``with_pixel_decoder``, ``"mask_features"`` [B, mask_dim, S/4, S/4] and
            ``"multi_scale_features"`` (3 maps, coarse to fine).
        """
        images = self.preprocess_images(batched_inputs)
        if self.freeze_backbone:
            with torch.no_grad():
                features = self.backbone(images)
        else:
            features = self.backbone(images)
        out = {"features": features, "image_tokens": self.projector(features[self.projector_in_feature])}
        if with_pixel_decoder:
            out.update(self._pixel_decoder(features))
        return out

    def _pixel_decoder(self, features) -> dict:
        mask_features, _, multi_scale = self.pixel_decoder(features)
        return {"mask_features": mask_features, "multi_scale_features": list(multi_scale)}

    # ------------------------------------------------------------------------------ language
    def build_prompts(self, batched_inputs: Sequence[Mapping], generation: bool = False) -> list[TokenizedPrompt]:
        """One :class:`TokenizedPrompt` per input.

        The data path builds them: :class:`~psalm.data.mapper.PSALMDatasetMapper` puts ``"prompt"`` in every
        input it maps (in the loader's workers, class order shuffled there in training), and this only checks
        that it belongs to the input. Inputs without one (the predictor, hand-made dicts) get theirs from
        the same function, :func:`~psalm.data.prompt.prompt_for_input` (class order shuffled from torch's
        global RNG in training).
        """
        builder = self._require_prompt_builder()
        prompts = []
        for i, x in enumerate(batched_inputs):
            prompt = x.get("prompt")
            if prompt is not None:
                check_prompt_matches(prompt, x, generation=generation, where=f"input {i}")
            else:
                prompt = prompt_for_input(
                    builder, x, shuffle_classes=self.training and self.shuffle_classes_train, generation=generation,
                    where=f"input {i}",
                )
            prompts.append(prompt)
        return prompts

    def pool_regions(self, image_tokens: torch.Tensor, batched_inputs: Sequence[Mapping]) -> list[torch.Tensor]:
        """Visual prompts -> region tokens (B x [R_b, H]). Inputs may carry ``region_points``
        [R, P, 2] ((row/S, col/S) coordinates) to replay recorded sample points (all or none)."""
        masks = [x["region_masks"].to(self.device) for x in batched_inputs]
        given = [x.get("region_points") is not None for x in batched_inputs]
        if any(given) and not all(given):
            raise ValueError("either every input of the batch gives 'region_points' or none does")
        points = [x["region_points"] for x in batched_inputs] if all(given) else None
        return self.region_pooler(image_tokens, masks, points=points)

    def run_llm(self, sequence: AssembledSequence) -> torch.Tensor:
        """Hidden states after the final LayerNorm [B, L, H] (no ``lm_head``)."""
        out = self.llm.model(
            inputs_embeds=sequence.inputs_embeds, attention_mask=sequence.attention_mask, use_cache=False
        )
        return out.last_hidden_state

    def sentence_projector(self) -> nn.Module:
        """The Linear(H -> D) applied to sentence conditions: ``refer_projector`` (official ``SEG_token_projector``)."""
        return self.refer_projector

    def read_conditions(
        self, task: str, hidden: torch.Tensor, sequence: AssembledSequence, prompts: Sequence[TokenizedPrompt]
    ) -> Conditions:
        """The queries and the task's condition embeddings from the LLM hidden states."""
        if sequence.mask_token_positions is None:
            raise ValueError(f"task {task!r}: the prompts have no mask tokens (<seg>)")
        cond = Conditions(self.mask_token_projector(gather_mask_tokens(hidden, sequence.mask_token_positions)))
        kind = T.condition_type(task)
        if kind == "category":
            restore = torch.stack([p.restore_index for p in prompts])
            cond.classes = self.class_projector(category_condition(hidden, sequence.class_span_ids, restore))
        elif kind == "sentence":
            pooled = sentence_condition(hidden, sequence.refer_span_mask, self.refer_pooling)
            cond.refer = self.sentence_projector()(pooled)
        elif kind == "region":
            cond.regions = [self.region_projector(r) for r in gather_region_tokens(hidden, sequence.region_positions)]
        return cond

    # ------------------------------------------------------------------------------ forwards
    def forward_segmentation(
        self, batched_inputs: Sequence[Mapping], image_features: Mapping | None = None
    ) -> SegmentationForward:
        """Steps 1-8 for a batch of one segmentation task (see the module docstring).

        Args:
            image_features: optional :meth:`encode_images` output for these inputs (shared encoding).
                It may also hold ``"region_image_tokens"`` [B, N, H]: the image tokens that the
                visual prompts are pooled from when they were drawn on ANOTHER image (video object
                segmentation pools frame t's prompts from the memory frame's encoding).
        """
        task = _batch_task(batched_inputs)
        if not T.is_segmentation_task(task):
            raise ValueError(f"forward_segmentation got the language task {task!r}")
        if image_features is None:
            image_features = self.encode_images(batched_inputs)
        elif "mask_features" not in image_features:
            image_features = {**image_features, **self._pixel_decoder(image_features["features"])}
        image_tokens = image_features["image_tokens"]
        prompts = self.build_prompts(batched_inputs)
        regions = None
        if T.is_region_task(task):
            regions = self.pool_regions(image_features.get("region_image_tokens", image_tokens), batched_inputs)
        sequence = self.sequence_assembler(
            prompts, self.llm.get_input_embeddings(), image_tokens, self.mask_tokens, regions
        )
        hidden = self.run_llm(sequence)
        cond = self.read_conditions(task, hidden, sequence, prompts)
        outputs = self.run_predictor(image_features, cond)
        return SegmentationForward(task, prompts, image_tokens, regions, sequence, hidden, cond, outputs)

    def run_predictor(self, image_features: Mapping, cond: Conditions) -> dict:
        """Step 8: the predictor on the pixel decoder's maps (``image_features``) and the conditions."""
        return self.predictor(
            image_features["multi_scale_features"],
            image_features["mask_features"],
            cond.queries,
            cond.refer,
            cond.classes,
            cond.regions,
        )

    def forward(self, batched_inputs: Sequence[Mapping], image_features: Mapping | None = None):
        """Training: dict of losses. Inference: list of result dicts (``docs/DESIGN.md``)."""
        if not batched_inputs:
            raise ValueError("empty batch")
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs, image_features=image_features)

    def losses(self, batched_inputs: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Per-task losses of a single-task batch: the criterion's (segmentation) or ``loss_lm``."""
        task = _batch_task(batched_inputs)
        if T.is_lm_task(task):
            feats = self.encode_images(batched_inputs, with_pixel_decoder=False)
            prompts = self.build_prompts(batched_inputs)
            seq = self.sequence_assembler(prompts, self.llm.get_input_embeddings(), feats["image_tokens"])
            # lm_head only where a next-token target exists (no [B, L, V] logits)
            return {"loss_lm": self.lm_loss_weight * causal_lm_loss(self.llm, self.run_llm(seq), seq.labels)}
        fwd = self.forward_segmentation(batched_inputs)
        targets = []
        for i, x in enumerate(batched_inputs):
            inst = x.get("instances")
            if inst is None:
                raise ValueError(f"training input {i} ({task}) has no 'instances' (gt_masks / gt_classes)")
            targets.append({"masks": inst.gt_masks.to(self.device), "labels": inst.gt_classes.to(self.device)})
        return self.criterion(fwd.outputs, targets)

    @torch.no_grad()
    def inference(self, batched_inputs: Sequence[Mapping], image_features: Mapping | None = None) -> list[dict]:
        """Results in input order; mixed batches run as one forward per (task, class count) group."""
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(batched_inputs):
            task = T.check_task(x["task"])
            key = (task, len(x.get("class_names") or ()) if T.is_category_task(task) else 0)
            groups.setdefault(key, []).append(i)
        results: list[dict | None] = [None] * len(batched_inputs)
        for (task, _), idx in groups.items():
            inputs = [batched_inputs[i] for i in idx]
            feats = None
            if image_features is not None:
                feats = image_features if len(idx) == len(batched_inputs) else _select_batch(image_features, idx)
            if T.is_lm_task(task):
                outs = [{"text": t} for t in self.generate_text(inputs, image_features=feats)]
            else:
                outs = None
                if T.is_category_task(task):  # a class list over the context runs in class chunks
                    from psalm.inference.class_chunks import maybe_chunked_category_inference

                    outs = maybe_chunked_category_inference(self, inputs, feats)
                if outs is None:
                    fwd = self.forward_segmentation(inputs, image_features=feats)
                    outs = self.postprocessor(fwd.outputs, inputs)
            for i, out in zip(idx, outs):
                results[i] = out
        return results

    @torch.no_grad()
    def generate_text(self, batched_inputs: Sequence[Mapping], image_features: Mapping | None = None) -> list[str]:
        """Greedy answers to the conversations' last human turns (left-padded batched ``generate``)."""
        if image_features is None:
            image_features = self.encode_images(batched_inputs, with_pixel_decoder=False)
        prompts = self.build_prompts(batched_inputs, generation=True)
        seq = self.generation_assembler(prompts, self.llm.get_input_embeddings(), image_features["image_tokens"])
        tok = self.tokenizer
        ids = self.llm.generate(
            inputs_embeds=seq.inputs_embeds,
            attention_mask=seq.attention_mask.long(),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]


def _select_batch(tree, idx: Sequence[int]):
    """Rows ``idx`` of every tensor of a (dict / list) tree of batched tensors."""
    if isinstance(tree, torch.Tensor):
        return tree[list(idx)]
    if isinstance(tree, Mapping):
        return {k: _select_batch(v, idx) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_select_batch(v, idx) for v in tree)
    return tree


def build_psalm_model(cfg, device: str | torch.device | None = None, tokenizer=None) -> PSALM:
    """Build ``MODEL.META_ARCHITECTURE`` (:class:`PSALM` or a registered subclass) from ``cfg`` on ``device``
    (default ``cfg.MODEL.DEVICE``).

    ``device="meta"`` builds the full structure without memory or initialisation (seconds even for
    the full-size model): for parameter counts and checkpoint key / shape checks. Such a model has
    no tokenizer and cannot run.
    """
    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if not (isinstance(arch, type) and issubclass(arch, PSALM)):
        raise ValueError(
            f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} is not PSALM or a subclass of it"
        )
    device = torch.device(device if device is not None else cfg.MODEL.DEVICE)
    if device.type == "meta":
        with torch.device("meta"):
            return arch(cfg, device="meta", tokenizer=tokenizer)
    model = arch(cfg, device=device, tokenizer=tokenizer)
    return model.to(device)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Elements per top-level module of ``model.state_dict()`` (parameters and persistent buffers)."""
    counts: dict[str, int] = {}
    for key, value in model.state_dict().items():
        top = key.split(".", 1)[0]
        counts[top] = counts.get(top, 0) + value.numel()
    return counts

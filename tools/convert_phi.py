#!/usr/bin/env python
"""Convert an HF phi-1_5 directory into PSALM's language-model weights (stage-2 initialisation).

    python tools/convert_phi.py --hf-dir /path/to/phi-1_5 --output checkpoints/phi15_psalm.pth \\
        [--tokenizer DIR] [--save-tokenizer DIR] [--prefix llm.] [--seed 0] \\
        [--config-file configs/coco/psalm_swin_base_phi15.yaml] [KEY VALUE ...]

The directory holds ``config.json``, the weights (``model.safetensors``, sharded safetensors or
``pytorch_model.bin``; transformers >= 4.37 ``q_proj/k_proj/v_proj`` layout or the 4.36 fused
``query_key_value`` layout) and normally the tokenizer. The tokenizer (``--tokenizer``, default the
same directory) gets ``[PAD]`` and ``[SEG]`` as PSALM's ``train.py`` adds them; the vocabulary is
resized to ``MODEL.PSALM.LLM.VOCAB_SIZE`` (50297): base rows kept, ``[PAD]`` = mean of the base
rows, ``[SEG]`` ~ N(0, 0.02) (``--seed``). ``lm_head.bias`` is dropped (PSALM's ``lm_head`` has no
bias) and reported.

Writes ``{"model": state_dict, "dropped": {key: reason}}`` with keys ``<prefix>model.*`` and
``<prefix>lm_head.weight`` (``llm.`` = the PSALM meta-architecture's names). Before writing, the
keys and shapes are checked against the ``PhiForCausalLM`` that ``build_llm`` makes from the config;
nothing is written on a mismatch (the error lists every missing, unexpected and mis-shaped key).
``--save-tokenizer`` writes the PSALM tokenizer (with ``[PAD]`` / ``[SEG]``) for ``MODEL.PSALM.TOKENIZER``.
"""

import argparse
import logging
import sys

import torch

from psalm.checkpoint.phi_keys import hf_phi_to_psalm, read_hf_phi_dir
from psalm.checkpoint.strict import IncompatibleKeysError, check_state_dict
from psalm.config import get_psalm_cfg
from psalm.modeling.llm import build_llm, build_tokenizer, tokenizer_vocab_plan

logger = logging.getLogger("convert_phi")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF phi-1_5 directory (config.json + weights)")
    parser.add_argument("--output", required=True, help="output file (.pth)")
    parser.add_argument("--tokenizer", default="", help="tokenizer directory (default: --hf-dir)")
    parser.add_argument("--save-tokenizer", default="", help="write the PSALM tokenizer ([PAD], [SEG]) here")
    parser.add_argument("--prefix", default="llm.", help="key prefix of the output (default 'llm.')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the [SEG] row initialisation")
    parser.add_argument("--config-file", default="", help="psalm config (default: the built-in Phi-1.5 defaults)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = get_psalm_cfg(args.config_file or None, args.opts)
    cfg.MODEL.PSALM.LLM.NAME_OR_PATH = args.hf_dir
    cfg.MODEL.PSALM.TOKENIZER = args.tokenizer or args.hf_dir
    tokenizer = build_tokenizer(cfg)
    base, mean_ids = tokenizer_vocab_plan(tokenizer, cfg.MODEL.PSALM.PAD_TOKEN, cfg.MODEL.PSALM.SEG_TOKEN)
    skeleton = build_llm(cfg, tokenizer=tokenizer, device="meta")  # checks config.json against cfg

    sd, config = read_hf_phi_dir(args.hf_dir)
    conv = hf_phi_to_psalm(
        sd,
        config,
        num_base_tokens=base,
        target_vocab_size=cfg.MODEL.PSALM.LLM.VOCAB_SIZE,
        mean_init_ids=mean_ids,
        seed=args.seed,
    )
    report = check_state_dict(skeleton, conv.state_dict)
    if not report.ok:
        raise IncompatibleKeysError(report, f"converted {args.hf_dir}")
    for key, why in sorted(conv.dropped.items()):
        logger.info("dropped %s: %s", key, why)
    state = {args.prefix + k: v.contiguous() for k, v in conv.state_dict.items()}
    torch.save({"model": state, "dropped": conv.dropped, "__author__": "tools/convert_phi.py"}, args.output)
    logger.info("wrote %s: %d keys, vocabulary %d rows", args.output, len(state), cfg.MODEL.PSALM.LLM.VOCAB_SIZE)
    if args.save_tokenizer:
        tokenizer.save_pretrained(args.save_tokenizer)
        logger.info("wrote the PSALM tokenizer to %s", args.save_tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())

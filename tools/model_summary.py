#!/usr/bin/env python
"""Build a PSALM config on the meta device (no memory, no initialisation, seconds even at full size)
and print its parameter count per top-level module as JSON lines and a table.

    python tools/model_summary.py --config-file configs/coco/psalm_swin_base_phi15.yaml
"""
import argparse
import json
import logging
import sys

from psalm.config import get_psalm_cfg
from psalm.modeling.meta_arch import build_psalm_model
from psalm.modeling.meta_arch.psalm import parameter_counts

logger = logging.getLogger("psalm.tools.model_summary")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = get_psalm_cfg(args.config_file, args.opts)
    model = build_psalm_model(cfg, device="meta")
    counts = parameter_counts(model)
    trainable = {
        name: sum(p.numel() for p in mod.parameters() if p.requires_grad) if hasattr(mod, "parameters") else 0
        for name, mod in model.named_children()
    }
    total = sum(counts.values())
    for name, n in counts.items():
        sys.stdout.write(json.dumps({"module": name, "parameters": n, "trainable": trainable.get(name, n)}) + "\n")
    sys.stdout.write(json.dumps({"module": "total", "parameters": total}) + "\n")
    width = max(len(k) for k in counts)
    for name, n in counts.items():
        logger.info("%-*s %15s  (%5.1f%%)", width, name, f"{n:,}", 100.0 * n / total)
    logger.info("%-*s %15s", width, "total", f"{total:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

import pathlib

import pytest
from detectron2.config import get_cfg

from psalm.config import add_psalm_config, get_psalm_cfg

from .conftest import REPO_ROOT

CONFIGS = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").rglob("*.yaml"))


def test_configs_found():
    assert "configs/coco/psalm_swin_base_phi15.yaml" in CONFIGS
    assert any(c.startswith("configs/tiny/") for c in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_yaml_loads(path):
    cfg = add_psalm_config(get_cfg())
    cfg.merge_from_file(str(REPO_ROOT / path))
    # the official PSALM, or the research extensions selected by name (psalm.modeling.extensions)
    assert cfg.MODEL.META_ARCHITECTURE in ("PSALM", "ExtendedPSALM")
    assert cfg.MODEL.PSALM.NUM_MASK_TOKENS == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES


def test_paper_model_config():
    cfg = get_psalm_cfg(str(REPO_ROOT / "configs/coco/psalm_swin_base_phi15.yaml"))
    assert cfg.MODEL.SWIN.DEPTHS == [2, 2, 18, 2]
    assert cfg.MODEL.PSALM.LLM.HIDDEN_SIZE == 2048
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
    assert cfg.INPUT.IMAGE_SIZE == 1024 and cfg.INPUT.PAD_VALUE == 128.0


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  PSALM:\n    NUM_MASK_TOKENZ: 3\n")
    with pytest.raises(KeyError, match="MODEL.PSALM.NUM_MASK_TOKENZ"):
        get_psalm_cfg(str(bad))


def test_add_psalm_config_is_idempotent():
    cfg = add_psalm_config(get_cfg())
    cfg.MODEL.PSALM.NUM_MASK_TOKENS = 7
    assert add_psalm_config(cfg).MODEL.PSALM.NUM_MASK_TOKENS == 7


# ----------------------------------------------------------------------------- every key is read
# A key counts as read when some module of psalm/ or tools/ (psalm/config.py excluded: it only defines
# them) reads it: ``<expr>.SECTION.LEAF`` or ``x.LEAF`` where ``x = <expr>.SECTION`` in that module, or
# ``x.LEAF`` through a function argument when LEAF names one key only, or the string "LEAF" (getattr / a
# field table) in a module that also uses SECTION. Writes in error messages ("MODEL.X.Y=...") and
# ``merge_from_list`` options are strings with dots: they never count.
import ast  # noqa: E402

# detectron2 keys whose value add_psalm_config changes and that detectron2's own builders read
_DETECTRON2_READERS = ("modeling/meta_arch/build.py", "modeling/backbone/build.py", "solver/build.py",
                       "engine/defaults.py", "data/build.py", "checkpoint/detection_checkpoint.py")


def _leaf_keys(node, prefix=""):
    out = {}
    for k, v in node.items():
        if type(v).__name__ == "CfgNode":
            out.update(_leaf_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _tail(node):
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.slice.value
    return None


class _Reads(ast.NodeVisitor):
    def __init__(self, path):
        self.path, self.pairs, self.via_name, self.aliases, self.constants, self.sections = path, set(), {}, {}, set(), set()

    def visit_Assign(self, node):
        tail = _tail(node.value)
        for t in node.targets:
            if tail is not None and isinstance(t, ast.Name):
                self.aliases.setdefault(t.id, set()).add(tail)
        self.generic_visit(node)

    def visit_Attribute(self, node):
        self.sections.add(node.attr)
        tail = _tail(node.value)
        if tail is not None:
            self.pairs.add((tail, node.attr))
        elif isinstance(node.value, ast.Name):
            self.via_name.setdefault(node.attr, set()).add(node.value.id)
        self.generic_visit(node)

    def visit_Constant(self, node):
        if isinstance(node.value, str):
            self.constants.add(node.value)

    def reads(self, key: str, unique_leaf: bool) -> bool:
        section, leaf = key.split(".")[-2:]
        if (section, leaf) in self.pairs:
            return True
        names = self.via_name.get(leaf, set())
        if any(section in self.aliases.get(n, ()) for n in names):
            return True
        if names and unique_leaf and not any(n in self.aliases for n in names):
            return True  # e.g. def clip_gradients(clip_cfg, ...): clip_cfg.CLIP_TYPE
        return leaf in self.constants and (section in self.sections or section in self.constants)


def _scan(paths):
    out = []
    for p in paths:
        r = _Reads(str(p))
        r.visit(ast.parse(pathlib.Path(p).read_text()))
        out.append(r)
    return out


def _unread_keys(cfg, readers, d2_readers):
    base = _leaf_keys(get_cfg())
    ours = _leaf_keys(cfg)
    leaves = {}
    for k in ours:
        leaves[k.rsplit(".", 1)[-1]] = leaves.get(k.rsplit(".", 1)[-1], 0) + 1
    unread = []
    for key, value in ours.items():
        added = key not in base
        if not added and base[key] == value:
            continue  # detectron2's own key at detectron2's default: not ours to check
        unique = leaves[key.rsplit(".", 1)[-1]] == 1
        scope = readers if added else readers + d2_readers
        if not any(r.reads(key, unique) for r in scope):
            unread.append(key)
    return unread


@pytest.fixture(scope="module")
def key_readers():
    import detectron2

    files = [p for p in sorted((REPO_ROOT / "psalm").rglob("*.py")) + sorted((REPO_ROOT / "tools").glob("*.py"))
             if p != REPO_ROOT / "psalm" / "config.py"]
    d2 = pathlib.Path(detectron2.__file__).parent
    return _scan(files), _scan([d2 / f for f in _DETECTRON2_READERS])


def test_every_key_add_psalm_config_adds_is_read(key_readers):
    readers, d2_readers = key_readers
    unread = _unread_keys(add_psalm_config(get_cfg()), readers, d2_readers)
    assert not unread, f"config keys that no code reads (delete or wire them): {unread}"


def test_the_key_scan_catches_an_unread_key(key_readers):
    """The check above can fail: keys nothing reads are reported, also next to keys with the same leaf."""
    from detectron2.config import CfgNode as CN

    readers, d2_readers = key_readers
    baseline = set(_unread_keys(add_psalm_config(get_cfg()), readers, d2_readers))
    cfg = add_psalm_config(get_cfg())
    cfg.MODEL.PSALM.UNREAD_TEST_KEY = 1  # a new leaf
    cfg.MODEL.SWIN.FREEZE = True  # leaf FREEZE is read, but as MODEL.PSALM.LLM.FREEZE
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0  # Mask2Former's key; TRANSFORMER_ENC_LAYERS is read, not this
    cfg.MODEL.SEM_SEG_HEAD.NAME = "PSALMMaskHead"  # detectron2's key: only its semantic segmentor reads it
    cfg.TEST.PSALM.EXTRA = CN({"DTYPE": "fp32"})  # a second DTYPE leaf under a section nothing reads
    unread = set(_unread_keys(cfg, readers, d2_readers)) - baseline
    assert unread == {"MODEL.PSALM.UNREAD_TEST_KEY", "MODEL.SWIN.FREEZE", "MODEL.MASK_FORMER.ENC_LAYERS",
                           "MODEL.SEM_SEG_HEAD.NAME", "TEST.PSALM.EXTRA.DTYPE"}, unread

"""setup.py declares every third-party module that psalm/ imports (or names it as a documented exception),
its pins come from scripts/constraints.txt, and `import psalm` without detectron2 says how to get it."""
import ast
import re
import subprocess
import sys

from .conftest import REPO_ROOT

# import name -> distribution name, where they differ
DIST = {"cv2": "opencv-python", "PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml"}
# not declared on purpose (setup.py's docstring says why)
UNDECLARED = {"detectron2", "panopticapi", "torch_ms_deform_attn"}


def _setup_lists():
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS_REQUIRE"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found["INSTALL_REQUIRES"], found["EXTRAS_REQUIRE"]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, 1)[0].lower()


def _top_level_imports(paths):
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_import_of_the_package_is_declared():
    install, extras = _setup_lists()
    declared = {_name(r) for r in install}
    imports = _top_level_imports(sorted((REPO_ROOT / "psalm").rglob("*.py")))
    third_party = {m for m in imports - set(sys.stdlib_module_names) - {"psalm", "__future__"}}
    missing = sorted(m for m in third_party - UNDECLARED if DIST.get(m, m).lower().replace("_", "-") not in declared)
    assert not missing, f"psalm/ imports {missing} but setup.py's INSTALL_REQUIRES does not declare them"
    # the demo's imports are in the [demo] extra
    demo_imports = _top_level_imports([REPO_ROOT / "demo" / "app.py"])
    assert "gradio" in demo_imports and "gradio" in {_name(r) for r in extras["demo"]}


def test_declared_dependencies_are_pinned():
    install, extras = _setup_lists()
    pinned = {_name(line) for line in (REPO_ROOT / "scripts" / "constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    pinned = {p.replace("_", "-") for p in pinned}
    reqs = install + [r for v in extras.values() for r in v]
    unpinned = sorted(_name(r) for r in reqs if _name(r).replace("_", "-") not in pinned)
    assert not unpinned, f"{unpinned} are declared in setup.py but not pinned in scripts/constraints.txt"
    required = {_name(line) for line in (REPO_ROOT / "scripts" / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {"gradio", "selenium"} <= required  # installed by scripts/install.sh, so CI runs the demo tests


def test_import_without_detectron2_says_how_to_get_it():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'detectron2' or name.startswith('detectron2.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'detectron2'\")\n"
        "sys.meta_path.insert(0, Block())\n"
        "import psalm\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=120)
    assert proc.returncode != 0
    assert "psalm needs detectron2, which has no release on the package registry" in proc.stderr
    assert "scripts/install.sh" in proc.stderr

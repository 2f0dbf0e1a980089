"""Print the versions of everything psalm depends on: ``python -m psalm.collect_env``.

Includes whether detectron2 is the patched ``pb1-detectron2`` sdist build (no C++ ops) or a full
build from source, and which multi-scale deformable attention backend ``DEFORM_ATTN_IMPL=auto``
would use.
"""
import importlib
import importlib.metadata as md
import platform
import sys

__all__ = ["collect_env_info", "main"]


def _version(module_name, dist_name=None):
    try:
        mod = importlib.import_module(module_name)
    except Exception as e:  # report any import failure verbatim; this is a diagnostics tool
        return f"not importable ({type(e).__name__}: {e})"
    ver = getattr(mod, "__version__", None)
    if ver is None and dist_name:
        try:
            ver = md.version(dist_name)
        except md.PackageNotFoundError:
            ver = "unknown"
    return f"{ver} @ {getattr(mod, '__file__', '?')}"


def _detectron2_build():
    try:
        from detectron2 import _C
    except ImportError:
        return "unknown (no detectron2._C)"
    if getattr(_C, "PSALM_PATCHED_SDIST", False):
        return "patched pb1-detectron2 sdist (pure Python; no C++/CUDA ops)"
    try:
        return f"compiled ({_C.get_compiler_version()}, CUDA {_C.get_cuda_version()})"
    except Exception as e:
        return f"compiled (version query failed: {e})"


def _deform_attn_backend():
    from psalm.modeling.pixel_decoder.ms_deform_attn import _import_kernel, resolve_deform_attn_impl

    _, err = _import_kernel()
    choice = resolve_deform_attn_impl("auto")
    return choice if err is None else f"{choice} (kernel not importable: {err})"


def collect_env_info() -> str:
    import torch

    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("machine", platform.machine()),
        ("psalm", _version("psalm", "psalm-d2")),
        ("torch", _version("torch")),
        ("torch CUDA build", str(torch.version.cuda)),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
        rows.append(("bf16 supported", str(torch.cuda.is_bf16_supported())))
    rows += [
        ("torchvision", _version("torchvision")),
        ("detectron2", _version("detectron2", "pb1-detectron2")),
        ("detectron2 build", _detectron2_build()),
        ("transformers", _version("transformers")),
        ("tokenizers", _version("tokenizers")),
        ("timm", _version("timm")),
        ("pycocotools", _version("pycocotools", "pycocotools")),
        ("fvcore", _version("fvcore", "fvcore")),
        ("opencv", _version("cv2")),
        ("scipy", _version("scipy")),
        ("numpy", _version("numpy")),
        ("MSDeformAttn kernel", _version("torch_ms_deform_attn", "torch-ms-deform-attn")),
        ("MSDeformAttn backend (auto)", _deform_attn_backend()),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main():
    sys.stdout.write(collect_env_info() + "\n")


if __name__ == "__main__":
    main()

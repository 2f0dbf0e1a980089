"""Makes ``import pixellm`` work for the project's tests (the project is not an installed package)."""
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pixellm_tok_dir(tmp_path_factory):
    """psalm's tiny tokenizer + the PixelLM tokens, built once per test session."""
    from pixellm.data.datasets import save_tiny_pixellm_tokenizer

    return save_tiny_pixellm_tokenizer(tmp_path_factory.mktemp("pixellm_tok") / "tok")

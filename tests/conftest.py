import os

# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from m3embed.testing import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def xlmr_tokenizer():
    return tiny_tokenizer("xlmr")


@pytest.fixture(scope="session")
def bert_tokenizer():
    return tiny_tokenizer("bert")


@pytest.fixture
def xlmr_model(xlmr_tokenizer):
    torch.manual_seed(0)
    return tiny_model("xlmr", tokenizer=xlmr_tokenizer)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: thread hand-offs cost more than the math. Modules ask
    for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

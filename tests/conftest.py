import contextlib
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# tests import simpo, train, eval, data, demo
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`python train.py`: the offline demo with its own settings, trained once for every test that
    reads it (test_train's and test_eval's). Only the run folder is chosen, and a checkpoint is kept
    at step 64 of 128, which changes nothing in the training. Returns its folder, base model, data,
    config and stdout."""
    import train
    folder = tmp_path_factory.mktemp("demo")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(["--output-dir", str(folder / "demo"), "--save-every", "64"])
    assert code == 0, err.getvalue()
    run = folder / "demo"
    config = json.loads((run / "run_config.json").read_text())
    assert (run / "checkpoint-64" / "adapter_config.json").is_file()
    return SimpleNamespace(run=run, model=folder / "demo-model", dataset=Path(config["dataset"]),
                           config=config, stdout=out.getvalue())


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and two OpenMP threads on two cores shared
    with another busy process spin-wait for ages (10x slower)."""
    torch.set_num_threads(1)


def pytest_configure(config):
    # Backward through a 4-bit op with no autograd kernel gives silently wrong gradients
    # (see train.load_model).
    config.addinivalue_line("filterwarnings",
                            "error:.*an autograd kernel was not registered:UserWarning")


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length):
    """Token ids of one pair (message lists), as preferences.load_examples tokenizes whole splits;
    None if it leaves the pair out (identical responses, or one truncated to nothing)."""
    import preferences
    batch = {"prompt": [prompt], "chosen": [prompt + [chosen]], "rejected": [prompt + [rejected]]}
    row = preferences.tokenize_batch(batch, [0], tokenizer, "pair",
                                     preferences.end_of_turn(tokenizer),
                                     preferences.prompt_head(tokenizer), max_length,
                                     max_prompt_length)
    if row["status"][0] != preferences.KEPT:
        return None
    return {name: row[name][0] for name in preferences.COLUMNS}

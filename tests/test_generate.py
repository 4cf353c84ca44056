"""`recur generate`: a checkpoint's model rebuilt from its config continues a prompt exactly as the
trained model does; text is decoded across bytes, a generated BOS ends it, bad input is refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from harness_tasks import tiny

from recur.cli import main
from recur.config import RunConfig, config_hash
from recur.corpus import BOS
from recur.generate import generate_text, generate_tokens, load_checkpoint, prompt_tokens, resolve_checkpoint
from recur.training import ConfigError, Trainer


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A text run trained a few steps with checkpoints: (its checkpoint dir, the trainer at its end)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = RunConfig(task="text", task_args={"corpus": "prose"}, model="gru", d_model=16, n_layers=1, seq_len=32,
                    steps=6, batch_size=4, lr=3e-3, eval_batches=1, mlp=None, device="cpu", early_stop=None)
    trainer = Trainer(cfg, progress=False, checkpoint_dir=root / config_hash(cfg), checkpoint_every=6)
    trainer.fit()
    return root, trainer


def test_a_checkpoint_is_found_from_a_step_a_run_or_its_parent_folder(text_ckpt, tmp_path):
    root, trainer = text_ckpt
    run = root / config_hash(trainer.cfg)
    step = run / "step-00000006"
    assert resolve_checkpoint(root) == resolve_checkpoint(run) == resolve_checkpoint(step) == step
    with pytest.raises(ConfigError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "absent")
    with pytest.raises(ConfigError, match="is not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "a" / "LATEST").parent.mkdir()
    (tmp_path / "a" / "LATEST").write_text("step-00000001\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "LATEST").write_text("step-00000001\n")
    with pytest.raises(ConfigError, match="holds 2 runs"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="names a checkpoint that is not there"):
        resolve_checkpoint(tmp_path / "a")


def test_the_loaded_model_is_the_trained_one_and_generates_what_it_would(text_ckpt):
    root, trainer = text_ckpt
    model, task, cfg = load_checkpoint(root, device="cpu")
    assert cfg == trainer.cfg and not model.training
    for (k, a), b in zip(model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), k
    prompt = prompt_tokens(task, prompt="def ")
    assert prompt == [BOS, *b"def "]
    trainer.model.eval()
    expected = trainer.model.generate(torch.tensor([prompt]), 20)[0, len(prompt):].tolist()
    got = list(generate_tokens(model, prompt, 20))
    assert got == expected[:len(got)] and (len(got) == 20 or expected[len(got)] == BOS)
    # sampling is seeded: the same seed gives the same sample, another seed (almost surely) another one
    a = list(generate_tokens(model, prompt, 30, temperature=1.0, seed=1))
    assert a == list(generate_tokens(model, prompt, 30, temperature=1.0, seed=1))
    assert a != list(generate_tokens(model, prompt, 30, temperature=1.0, seed=2))


def test_text_is_decoded_incrementally_and_a_bos_ends_it():
    class Scripted(torch.nn.Module):
        """Emits the bytes of 'é!' (a two-byte character, split over two steps), then BOS, then 'x'."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def stream(self, inputs, max_new_tokens, temperature, top_k, generator=None):
            for t in [*"é!".encode(), BOS, ord("x")][:max_new_tokens]:
                yield torch.tensor([t])

    from recur.tasks import get_task

    task = get_task("text", corpus="prose")
    assert "".join(generate_text(Scripted(), task, "a", 10)) == "é!"
    assert list(generate_text(Scripted(), task, "a", 1)) == ["\ufffd"]  # half a character at the end: shown


def test_the_command_streams_text_and_prints_json(text_ckpt, capsys):
    root, trainer = text_ckpt
    assert main(["generate", "--checkpoint", str(root), "--prompt", "import ", "--max-new-tokens", "12",
                 "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, task, _ = load_checkpoint(root)
    assert out["prompt"] == "import " and out["output"] == "".join(generate_text(model, task, "import ", 12))
    assert main(["generate", "--checkpoint", str(root), "--prompt", "x", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("x") and "gru on text" in captured.err


def test_a_probe_checkpoint_takes_and_gives_token_ids(tmp_path, capsys):
    cfg = tiny(steps=3)
    Trainer(cfg, progress=False, checkpoint_dir=tmp_path / "run", checkpoint_every=3).fit()
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--tokens", "1,2,0", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt"] == [1, 2, 0] and len(out["tokens"]) == 4
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "hi"]) == 2
    assert "has no text encoding" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--tokens", "1,99999"]) == 2
    assert "token ids must lie in" in capsys.readouterr().err


def test_bad_options_are_refused_before_generating(text_ckpt, tmp_path, capsys):
    root, _ = text_ckpt
    assert main(["generate", "--checkpoint", str(root), "--prompt", "x", "--top-k", "0"]) == 2
    assert "top_k must be in" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(root), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(root)]) == 2  # neither --prompt nor --tokens

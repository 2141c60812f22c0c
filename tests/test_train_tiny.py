"""End to end: the example transformer (examples/train_transformer.py) trains with the tape
and AdamW on the NumPy backend, flash and naive attention give the same loss curve, and
checkpointed blocks give the same training as plain ones.

Threshold: the reverse task (vocab 16, seqlen 16, 2 layers, d_model 32) starts at a loss of
about ln(15) = 2.7; after 200 steps the last-10-step mean was 0.005-0.009 for seeds 0-4 and
held-out accuracy 100% (measured on 2 CPU cores, 5-8 s per run). The test asks for < 0.1 and
>= 98%, a margin of more than 10x on the loss.
"""
import json
import os
import sys

import numpy as np
import pytest

from conftest import error_report

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
import train_transformer as tt  # noqa: E402
import compare_naive  # noqa: E402

LOSS_THRESHOLD = 0.1
ACCURACY_THRESHOLD = 0.98


def curve_text(losses, every=10):
    return "loss curve: " + ", ".join(f"{i}:{l:.3f}" for i, l in enumerate(losses) if i % every == 0)


def test_tiny_transformer_learns_to_reverse_on_the_cpu():
    result = tt.train(tt.Config(device="cpu", task="reverse", steps=200, seed=0), log=lambda *a: None)
    losses = result["losses"]
    assert losses[0] > 2.0, curve_text(losses)
    assert result["final_train_loss"] < LOSS_THRESHOLD, curve_text(losses)
    assert result["heldout"]["token_accuracy"] >= ACCURACY_THRESHOLD, (result["heldout"], curve_text(losses))
    assert result["tokens_per_s"] > 0 and result["peak_memory_bytes"] > 0


def test_flash_and_naive_attention_give_the_same_loss_curve():
    cfg = tt.Config(device="cpu", task="copy", steps=40, pos="rope", tie=True, seed=3)
    curves = compare_naive.loss_curves(cfg)
    flash, naive = np.array(curves["flash"]), np.array(curves["naive"])
    assert flash[-1] < flash[0] - 0.1, curve_text(flash, 5)  # it is training
    assert curves["max_abs_diff"] < 1e-4, error_report(flash, naive)


def test_checkpointed_blocks_train_exactly_like_plain_ones():
    cfg = tt.Config(device="cpu", steps=15, dtype="float64", seed=5)
    plain = tt.train(cfg, log=lambda *a: None)["losses"]
    recomputed = tt.train(tt.Config(**{**cfg.__dict__, "checkpoint": True}), log=lambda *a: None)["losses"]
    assert np.allclose(plain, recomputed, rtol=1e-12, atol=0), error_report(recomputed, plain)


def test_memory_table_shows_flash_keeping_less_than_naive():
    cfg = tt.Config(device="cpu", layers=1, d_model=32, heads=2)
    (row,) = compare_naive.memory_table(cfg, [256], batch=2)
    # naive keeps P (batch x heads x 256 x 256 float32 = 1 MiB) per layer; flash keeps none.
    assert row["naive"]["peak_bytes"] - row["flash"]["peak_bytes"] > 2 * 2 * 256 * 256 * 4 * 0.9, row
    assert "| 256 | 2 |" in compare_naive.markdown([row], cfg)


def test_training_script_command_line_writes_json(tmp_path):
    out = tmp_path / "result.json"
    tt.main(["--device", "cpu", "--steps", "3", "--task", "sort", "--tie", "--pos", "rope",
             "--checkpoint", "--log-every", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 3 and np.isfinite(result["losses"]).all()
    for key in ("tokens_per_s", "peak_memory_bytes", "heldout", "device", "parameters"):
        assert key in result
    assert result["config"]["checkpoint"] is True


@pytest.mark.gpu
def test_tiny_transformer_learns_to_reverse_on_the_gpu():
    result = tt.train(tt.Config(device="gpu", task="reverse", steps=200, seed=0), log=lambda *a: None)
    losses = result["losses"]
    assert result["final_train_loss"] < LOSS_THRESHOLD, curve_text(losses)
    assert result["heldout"]["token_accuracy"] >= ACCURACY_THRESHOLD, (result["heldout"], curve_text(losses))


@pytest.mark.gpu
def test_gpu_flash_and_naive_give_the_same_loss_curve():
    cfg = tt.Config(device="gpu", task="copy", steps=40, seqlen=128, d_model=64, heads=2, pos="rope", seed=3)
    curves = compare_naive.loss_curves(cfg)
    assert curves["max_abs_diff"] < 2e-3, error_report(curves["flash"], curves["naive"])

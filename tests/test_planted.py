"""Planted alignment, reduced size: the generator is calibrated and the trainer learns the non-linear map.

Every recall here is scored the same way — predictions from the test inputs retrieving the test targets,
the task the true map's recall is calibrated on (an earlier version scored the trainer against the noisier
captions and so understated it). At this size (8-d inputs, 20k pairs, 30 epochs) the measured figures are:
true map 0.614, ridge 0.083, MSE 0.566 (92 % of the true map), contrastive 0.435 (71 %). So the issue's
≥ 90 % bar is met here by the MSE loss only. At the full size (768-d, 200k pairs) neither loss comes near
it yet — see the README's *Does the trainer learn?*; `python -m training.run planted --out DIR` prints those
figures. The bars below leave a margin under the measured figures; they must hold on every CPU.
"""
import pytest

from training.planted import run_planted


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    return run_planted(tmp_path_factory.mktemp("planted"), n_train=20_000, n_eval=1000, in_dim=8, out_dim=32,
                       hidden=32, epochs=30, batch_size=256, lr=5e-3, proj_hidden=128, num_blocks=2, cpu_threads=1)


def test_generator_is_calibrated(figures):
    assert 0.5 <= figures["true_map_r1"] <= 0.7
    assert 0.2 <= figures["true_map_r1_text"] <= 0.4  # captions: noisier than the targets, still informative
    assert figures["ridge_r1"] < 0.5 * figures["true_map_r1"]  # the map is far from linear


@pytest.mark.parametrize("loss", ["mse", "contrastive"])
def test_trainer_beats_ridge_by_ten_points(figures, loss):
    assert figures[f"{loss}_r1"] >= figures["ridge_r1"] + 0.10, figures


@pytest.mark.parametrize("loss, share", [("mse", 0.85), ("contrastive", 0.60)])  # measured 92 % and 71 %
def test_trainer_recovers_most_of_the_true_map(figures, loss, share):
    assert figures[f"{loss}_r1"] >= share * figures["true_map_r1"], figures

"""Figures say what they show: labelled reconstruction rows, fusion weights as visible deviations with their values,
one block numbering (0-based, as ``fusion_layers``) everywhere, a filter plot with clean, chance and data named.

Each figure is really drawn and saved; ``Figure.savefig`` is wrapped only to keep the figure for inspection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY, TINY_DECODER, tiny_recipe
from matplotlib.figure import Figure

from mffzoo.analysis.filters import plot_filters
from mffzoo.analysis.freq import plot_frequency
from mffzoo.analysis.fusion import plot_fusion
from mffzoo.models import create_pretrain_model
from mffzoo.train import train
from mffzoo.train.visualize import save_fusion_plot, save_reconstruction_grid


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    figs: list[Figure] = []
    real = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> Any:
        figs.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figs


def _texts(fig: Figure) -> str:
    out = [t.get_text() for t in fig.texts]
    if fig._suptitle is not None:
        out.append(fig._suptitle.get_text())
    for ax in fig.axes:
        out += [ax.get_ylabel(), ax.get_xlabel(), ax.get_title()]
        out += [t.get_text() for t in ax.texts]
        leg = ax.get_legend()
        if leg is not None:
            out += [t.get_text() for t in leg.get_texts()]
    return "\n".join(out)


def test_reconstruction_rows_say_what_they_show(tmp_path: Path, saved: list[Figure]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, :, :12] = 1.0  # 75 % hidden
    images = {"input": x, "masked": x * (1 - mask), "reconstruction": torch.randn(3, 3, 16, 16, generator=g),
              "pasted": x, "mask": mask}
    png = save_reconstruction_grid(images, tmp_path / "r.png", (0.5,) * 3, (0.25,) * 3)
    assert png.is_file()
    rows = [ax.get_ylabel() for ax in saved[0].axes if ax.get_ylabel()]
    assert rows[0] == "original" and rows[1].startswith("masked input")
    assert "masked patches" in rows[2] and "visible ones" in rows[2] and "unsupervised" in rows[2]
    assert rows[3].replace("\n", " ") == "visible + prediction"
    assert "75% of the patches hidden" in _texts(saved[0]) and "unconstrained" in _texts(saved[0])


def test_norm_pix_reconstructions_say_the_colours_are_the_true_patches(tmp_path: Path, saved: list[Figure],
                                                                       data_root: Path) -> None:
    """A norm-pix model predicts normalised pixels; the picture borrows each true patch's mean/std, and says so
    (only then: a raw-pixel target's prediction is shown as predicted)."""
    note = "prediction shown with each patch's true mean/std (norm_pix target"
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for norm_pix in (True, False):
        torch.manual_seed(0)
        model = create_pretrain_model("mff_vit_small", fusion_layers=[0, 3], norm_pix_loss=norm_pix, **TINY,
                                      **TINY_DECODER).eval()
        with torch.no_grad():
            out = model.reconstruct(imgs)
        save_reconstruction_grid(out, tmp_path / f"r{norm_pix}.png", (0.5,) * 3, (0.25,) * 3,
                                 norm_pix=model.norm_pix_loss)
        assert (note in _texts(saved[-1])) is norm_pix
    # and the training run's own PNG, from its recipe's model.norm_pix_loss (true by default)
    saved.clear()
    train(tiny_recipe(data_root, train={"epochs": 1}, publish={"tag": None}, log={"vis_every_epochs": 0}),
          output_dir=tmp_path / "run")
    recon = [f for f in saved if "masked input" in _texts(f)]
    assert len(recon) == 1 and note in _texts(recon[0])
    assert "after epoch 1 of 1, step 4, loss " in _texts(recon[0]) and "(epoch mean)" in _texts(recon[0])


def test_fusion_weights_are_plotted_as_deviation_with_values(tmp_path: Path, saved: list[Figure]) -> None:
    weights = [[0.25, 0.25, 0.25, 0.25], [0.245, 0.248, 0.252, 0.255], [0.24, 0.245, 0.255, 0.26]]
    records = [{"step": s, "fusion_weights": w} for s, w in zip((1, 2, 3), weights)]
    assert save_fusion_plot(records, [0, 2, 4, 5], tmp_path / "f.png").is_file()
    history, bars = saved[0].axes[:2]
    got = [line.get_ydata().tolist() for line in history.get_lines() if line.get_label().startswith("block")]
    want = (100 * (torch.tensor(weights, dtype=torch.float64) - 0.25)).T.tolist()
    assert len(got) == 4  # ±1 percentage point fills the axis instead of 1 % of it
    for g_row, w_row in zip(got, want):
        assert g_row == pytest.approx(w_row)
    assert [p.get_height() for p in bars.patches] == pytest.approx([-1.0, -0.5, 0.5, 1.0])
    text = _texts(saved[0])
    assert "block 0: 0.250 -> 0.240" in text and "block 5: 0.250 -> 0.260" in text
    assert "0.240\n-1.00" in text and "0.260\n+1.00" in text and "1/K = 0.250" in text

    run = {"weights": weights[-1], "fusion_layers": [0, 2, 4, 5], "history": {"step": [1, 2, 3], "weights": weights}}
    plot_fusion({"models": {"run": run}}, tmp_path / "a.png")
    assert "block 0: 0.250 -> 0.240" in _texts(saved[1]) and "0.240\n-1.00" in _texts(saved[1])


def test_frequency_plot_numbers_blocks_as_fusion_layers(tmp_path: Path, saved: list[Figure]) -> None:
    prof = {"frequencies": [0.0, 0.25, 0.5, 0.75], "blocks": [[0.0, -0.1 * i, -0.2 * i, -0.3 * i] for i in range(6)]}
    plot_frequency({"models": {"a": prof}}, tmp_path / "q.png")
    bar = saved[0].axes[-1]  # the colour bar
    assert "0 = first" in bar.get_ylabel()
    assert [int(t) for t in bar.get_yticks()] == [0, 1, 2, 3, 4, 5]


def test_filter_plot_names_clean_chance_and_data(tmp_path: Path, saved: list[Figure]) -> None:
    res = {"data": "/somewhere/demo-shapes", "head": "knn", "radii": [0.1, 0.5], "num_classes": 4, "num_val": 40,
           "models": {"mff": {"clean": 62.5, "low": [30.0, 60.0], "high": [40.0, 25.0]}}}
    plot_filters(res, tmp_path / "x.png")
    text = _texts(saved[0])
    assert "mff: clean (no filter) 62.5 %" in text and "chance (1/4 = 25.0 %)" in text
    assert "demo-shapes" in text and "40 images" in text and "4 classes" in text
    chance = [ln for ln in saved[0].axes[0].get_lines() if ln.get_label().startswith("chance")]
    assert chance and chance[0].get_ydata()[0] == pytest.approx(25.0)

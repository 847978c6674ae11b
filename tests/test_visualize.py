"""tools/visualize.py: every figure is written and not blank; the attention read through hooks equals
the attention recomputed by hand from the block's weights; k-means and the PE similarity."""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from any2point import build_model, load_config
from any2point.engine.trainer import Trainer
from tests import tiny
from tools.visualize import FIGURES, cls_attention, cls_similarity, kmeans_1d, main, pe_similarity

BERT = tiny.source("hf_bert", width=32)
BERT = {**BERT, "architecture": {**BERT["architecture"], "max_position_embeddings": 64}}
SOURCES = {"bert": BERT, **{name: tiny.source(name, width=32) for name in tiny.PAPER_SOURCES}}

pytestmark = pytest.mark.usefixtures("one_thread")


def any2point(source: str, tuner: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    tuner = tuner or {"type": "GuidedAdapter", "bottleneck": 4, "voxel_size": 0.5}
    if source == "bert":
        tuner["cell_size"] = 8
    return build_model({"type": "Any2Point", "num_classes": 3, "source": SOURCES[source], "tuner": tuner,
                        "tokenizer": {"type": "PointPNTokenizer", "k": 8}}).eval()


def cloud(n: int = 128) -> torch.Tensor:
    torch.manual_seed(1)
    return F.normalize(torch.randn(n, 3), dim=-1)


@pytest.fixture(scope="module")
def any2point_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a tiny Any2Point on a random-init BERT: a checkpoint with a log and curves."""
    root = tmp_path_factory.mktemp("a2p")
    cfg = {"model": {"type": "Any2Point", "num_classes": 3, "source": BERT,
                     "tokenizer": {"type": "PointPNTokenizer", "k": 8},
                     "tuner": {"type": "GuidedAdapter", "bottleneck": 4, "cell_size": 8}},
           "dataset": {"type": "SyntheticShapes", "num_points": 128, "train_size": 32, "val_size": 6, "test_size": 12,
                       "classes": ["sphere", "box", "torus"]},
           "scheduler": {"type": "CosineWarmup", "warmup_epochs": 0},
           "train": {"epochs": 1, "batch_size": 16, "num_workers": 0},
           "experiment": {"name": "a2p", "output_dir": str(root)}}
    (root / "a2p.yaml").write_text(yaml.safe_dump(cfg))
    Trainer(load_config(root / "a2p.yaml")).fit()
    return root / "a2p"


def assert_not_blank(path: Path) -> None:
    image = matplotlib.image.imread(path)[..., :3]
    assert image.shape[0] > 100 and image.shape[1] > 100
    drawn = (image < 0.9).any(-1).mean()
    assert drawn > 0.02 and image.std() > 0.05, f"{path.name} looks blank ({drawn:.3f} drawn)"


def test_every_figure_written_and_not_blank(any2point_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    assert main(["--ckpt", str(any2point_run / "ckpt-best.pth"), "--out", str(out), "--point", "5"]) == 0
    names = {"confusion.png", "per_class.png", "curves.png", "attention.png", "clusters.png", "pe_similarity.png"}
    assert {p.name for p in out.iterdir()} == names and len(names) == len(FIGURES) - 1  # all but parts
    for name in names:
        assert_not_blank(out / name)


def test_curves_from_log_alone_and_errors(any2point_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "log.txt").write_text((any2point_run / "log.txt").read_text())
    assert main(["--exp", str(exp), "--figures", "curves"]) == 0
    assert_not_blank(exp / "figures" / "curves.png")
    assert main(["--exp", str(tmp_path / "none"), "--figures", "curves"]) == 2
    assert "no TensorBoard logs" in capsys.readouterr().err
    assert main(["--ckpt", str(any2point_run / "ckpt-best.pth"), "--figures", "pe", "--point", "100000",
                 "--out", str(tmp_path)]) == 2
    assert "--point 100000" in capsys.readouterr().err


@pytest.mark.parametrize("source,prompts", [(s, 0) for s in sorted(SOURCES)] + [("dinov2", 3)])
def test_cls_attention_equals_hand_computation(source: str, prompts: int) -> None:
    model = any2point(source, {"type": "PromptTuning", "num_prompts": prompts} if prompts else None)
    block = model.source.blocks[-1]
    heads = 4
    attn = next(m for m in block.modules() if isinstance(m, torch.nn.MultiheadAttention) or type(m).__name__ in
                ("Attention", "BiasKVAttention", "BertSelfAttention"))
    with torch.no_grad():
        inputs = []
        handle = attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        centres, got = cls_attention(model, cloud(), -1)
        handle.remove()
    h = inputs[0][0]  # (T, C), the normalised tokens entering the attention
    t, c = h.shape
    if source == "bert":
        q, k = attn.query(h), attn.key(h)
    elif source == "dinov2":
        q, k, _ = attn.qkv(h).chunk(3, -1)
    else:
        q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    if source == "imagebind_audio":
        k = torch.cat([k, attn.bias_k[0]])  # the learned bias key, attended to by every query
    q, k = q.reshape(t, heads, -1).transpose(0, 1), k.reshape(len(k), heads, -1).transpose(0, 1)
    probs = (q @ k.transpose(1, 2) / (c // heads) ** 0.5).softmax(-1).mean(0)
    g = len(centres)
    assert centres.shape == (g, 3) and got.shape == (g,) and t == 1 + prompts + g
    torch.testing.assert_close(got, probs[0, 1 + prompts:1 + prompts + g], rtol=1e-4, atol=1e-6)


def test_cls_similarity_of_final_features() -> None:
    model = any2point("dinov2", {"type": "PromptTuning", "num_prompts": 2})
    points = cloud()
    normed = []
    handle = model.source.norm.register_forward_hook(lambda m, args, out: normed.append(out))
    with torch.no_grad():
        centres, similarity = cls_similarity(model, points)
    handle.remove()
    x = normed[0][0]  # (1 + prompts + G, C): [CLS], the 2 prompts, the point tokens
    assert x.shape[0] == 3 + len(centres)
    torch.testing.assert_close(similarity, F.cosine_similarity(x[3:], x[:1], dim=-1))


def test_kmeans_1d_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 0.05, 40) for m in (0.9, -0.2, 0.4)])
    labels = kmeans_1d(values, 3)
    assert set(labels[:40]) == {2} and set(labels[40:80]) == {0} and set(labels[80:]) == {1}
    # optimal: no split of the sorted values into 3 runs has a lower within-cluster sum of squares
    order = np.sort(values)

    def sse(parts):
        return sum(((p - p.mean()) ** 2).sum() for p in parts)
    best = min(sse([order[:i], order[i:j], order[j:]]) for i in range(1, 119) for j in range(i + 1, 120))
    got = sse([values[labels == k] for k in range(3)])
    assert got == pytest.approx(best)


@pytest.mark.parametrize("source", ["bert", "dinov2"])
def test_pe_similarity_per_view(source: str) -> None:
    model = any2point(source)
    points = cloud(64)
    views, mean = pe_similarity(model, points, 7)
    assert views.shape == (model.projection.num_views, 64) and mean.shape == (64,)
    torch.testing.assert_close(views[:, 7], torch.ones(len(views)))
    assert mean[7] == pytest.approx(1.0) and (views <= 1 + 1e-5).all()
    # the averaged PE is the PE the model adds to a token at that point
    from any2point.models.any2point.projection import normalize_to_unit_sphere

    table = model.source.pos_embed_1d if source == "bert" else model.source.pos_embed_2d
    pe = model.projection(points[None], table).pe[0]
    unit = normalize_to_unit_sphere(points[None])[0]
    assert torch.allclose(unit, normalize_to_unit_sphere(points[None])[0])
    torch.testing.assert_close(mean, F.cosine_similarity(pe, pe[7:8], dim=-1), rtol=1e-4, atol=1e-5)


def fig6_config(root: Path, name: str, **tuner) -> Path:
    """A tiny Any2Point config on a random-init BERT; ``tuner`` overrides stand in for the ablations."""
    cfg = {"model": {"type": "Any2Point", "num_classes": 3, "source": BERT,
                     "tokenizer": {"type": "PointPNTokenizer", "k": 8},
                     "tuner": {"type": "GuidedAdapter", "bottleneck": 4, "cell_size": 8, **tuner}},
           "dataset": {"type": "SyntheticShapes", "num_points": 128, "classes": ["sphere", "box", "torus"]},
           "experiment": {"name": name, "seed": 3}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def direct_panel(model: torch.nn.Module, points: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per point: the similarity of its nearest token's final feature to [CLS], read at the source's
    final norm, and that token's 3-means cluster (checked to be a Lloyd fixpoint, ordered by centre)."""
    normed = []
    handle = model.source.norm.register_forward_hook(lambda m, args, out: normed.append(out))
    with torch.no_grad():
        centres = model.encode(points[None]).centres[0]
    handle.remove()
    features = normed[0][0].double()
    tokens = features[-len(centres):]
    similarity = (tokens @ features[0] / tokens.norm(dim=-1) / features[0].norm()).numpy()
    clusters = kmeans_1d(similarity, 3)
    means = np.array([similarity[clusters == j].mean() for j in range(3)])
    assert (np.diff(means) > 0).all()
    assert (np.abs(similarity[:, None] - means[None]).argmin(1) == clusters).all()
    nearest = torch.cdist(points.double(), centres.double()).argmin(1).numpy()
    return similarity[nearest], clusters[nearest]


def test_fig6_comparison_draws_each_models_clusters(any2point_run: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import tools.visualize as visualize
    from any2point.config import load_config
    from any2point.datasets import build_dataset
    from any2point.engine import checkpoint
    from any2point.engine.seeds import run_seeds

    drawn = []
    save = visualize._save

    def capture(fig, path):
        drawn.append({ax.get_title(): np.asarray(ax.collections[0].get_array()) for ax in fig.axes if ax.name == "3d"})
        return save(fig, path)

    monkeypatch.setattr(visualize, "_save", capture)
    ckpt = any2point_run / "ckpt-best.pth"
    entries = {"Complete": ckpt,  # a trained checkpoint and two configs' models at their start
               "Max-mean pool.": fig6_config(tmp_path, "maxmean", pool="maxmean", ensemble=False),
               "3D-guided L.A.": fig6_config(tmp_path, "local3d", guidance="3d", cell_size=0.5)}
    out = tmp_path / "fig6"
    assert main(["--compare", *(f"{label}={path}" for label, path in entries.items()), "--out", str(out)]) == 0
    assert_not_blank(out / "clusters_compare.png")
    (panels,) = drawn
    assert len(panels) == 6

    cfg = load_config(any2point_run / "config.yaml")
    points = build_dataset(cfg.dataset, "test")[0]["points"]
    expected = []
    for label, path in entries.items():
        config = cfg if path == ckpt else load_config(path)
        torch.manual_seed(run_seeds(config.experiment)["init"])  # a config's model, as its training starts
        model = build_model(config.model)
        if path == ckpt:
            model.load_state_dict(checkpoint.load(ckpt)["model"], strict=False)
        expected.append(direct_panel(model.eval(), points))
    for label, (similarity, clusters) in zip(entries, expected):
        np.testing.assert_array_equal(panels[f"{label}: 3 clusters"], clusters)
        np.testing.assert_allclose(panels[f"{label}: cos([CLS], token)"], similarity, rtol=1e-5, atol=1e-6)
    for i, j in ((0, 1), (0, 2), (1, 2)):  # three different models: a swapped panel would show
        assert not np.allclose(expected[i][0], expected[j][0], atol=1e-3)


def test_fig6_comparison_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = fig6_config(tmp_path, "a")
    with pytest.raises(SystemExit):
        main(["--compare", f"A={cfg}", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--compare", f"A={cfg}", f"B={cfg}"])  # no --out
    assert main(["--compare", f"A={cfg}", f"B={tmp_path / 'missing.pth'}", "--out", str(tmp_path)]) == 2
    assert "--compare B: no such checkpoint or config" in capsys.readouterr().err
    pointnet = tmp_path / "pointnet.yaml"
    pointnet.write_text(yaml.safe_dump({"model": {"type": "PointNet", "num_classes": 3},
                                        "dataset": {"type": "SyntheticShapes", "classes": ["sphere", "box", "torus"]}}))
    assert main(["--compare", f"A={cfg}", f"B={pointnet}", "--out", str(tmp_path)]) == 2
    assert "need an Any2Point model" in capsys.readouterr().err

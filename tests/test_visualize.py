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
from tools.visualize import FIGURES, cls_attention, cls_similarity, kmeans_1d, main, pe_similarity

BERT = {"type": "HFEncoderSource", "pretrained": None, "cls_token_id": 1,
        "architecture": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": 16}}
SOURCES = {
    "bert": BERT,
    "clip_text": {"type": "CLIPTextSource", "width": 32, "depth": 2, "heads": 4},
    "dinov2": {"type": "TimmViTSource", "model_name": "vit_base_patch14_dinov2", "img_size": 56, "embed_dim": 32,
               "depth": 2, "num_heads": 4},
    "imagebind_audio": {"type": "ImageBindAudioSource", "embed_dim": 32, "depth": 2, "num_heads": 4,
                        "num_mel_bins": 36, "target_len": 56},
}

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

"""Point-PEFT: the 3D-pretrained sources (group tokenizer against a brute-force reference; strict
converters round-tripping the released ``pre-train.pth`` layouts, written here with random values of
the real shapes), the point-prior prompt's parameter-free attention against a direct computation,
the geometry-aware adapter's groups against brute force, the memory-bank files and tool on the
synthetic shapes, a few optimizer steps on a tiny 3D source changing exactly the declared tensors,
and the source / tuner combinations that are refused by name."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests import tiny
from omegaconf import OmegaConf

from any2point import build_model
from any2point.errors import CheckpointError, ConfigError
from any2point.models.point_peft.memory_bank import read_memory_bank, save_memory_bank
from any2point.models.sources.point_transformer import PointBERTSource, PointMAESource, group_points
from any2point.models.point_peft.tuner import geometry_neighbourhoods, point_prior_attention
from tools.build_memory_bank import build_bank
from tools.build_memory_bank import main as bank_main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {k: v for k, v in tiny.source("point_mae", width=32).items() if k != "type"}


def tiny_model(source: str = "PointMAESource", bank: str | None = None, **tuner: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dict(type="Any2Point", num_classes=4, source=dict(type=source, **TINY),
                            tuner=dict(type="PointPEFT", num_prompts=4, prompt_depth=2, group_size=4,
                                       memory_bank=bank, **tuner)))


def clouds(batch: int = 3, n: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, 3, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ the group tokenizer

def brute_force_fps(xyz: torch.Tensor, n: int) -> list[int]:
    picked, dist = [0], [math.inf] * len(xyz)
    for _ in range(n - 1):
        last = xyz[picked[-1]]
        dist = [min(d, float(((p - last) ** 2).sum())) for d, p in zip(dist, xyz)]
        picked.append(max(range(len(xyz)), key=lambda i: dist[i]))
    return picked


def test_group_points_equals_a_brute_force_fps_and_knn() -> None:
    pts = clouds(2, 60).double()
    centres, groups = group_points(pts, 10, 7)
    for b in range(2):
        picked = brute_force_fps(pts[b], 10)
        torch.testing.assert_close(centres[b], pts[b, picked])
        for g, c in enumerate(picked):
            order = sorted(range(60), key=lambda i: float(((pts[b, i] - pts[b, c]) ** 2).sum()))[:7]
            torch.testing.assert_close(groups[b, g], pts[b, order] - pts[b, c])


def test_group_tokens_equal_the_mini_pointnet_run_group_by_group() -> None:
    source = PointBERTSource(**TINY).eval()
    pts = clouds(2, 80)
    centres, tokens = source.tokenize(pts)
    _, groups = group_points(pts, 16, 8)
    assert tokens.shape == (2, 16, 32) and centres.shape == (2, 16, 3)
    enc = source.encoder
    for b in range(2):
        for g in range(16):
            x = groups[b, g].t().unsqueeze(0)  # (1, 3, K)
            f = enc.first_conv(x)
            f = torch.cat([f.max(dim=2, keepdim=True).values.expand(-1, -1, 8), f], dim=1)
            ref = source.reduce_dim(enc.second_conv(f).max(dim=2).values[0])
            torch.testing.assert_close(tokens[b, g], ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- released pre-train.pth layouts

def released_layout(layout: str) -> dict[str, torch.Tensor]:
    """Every tensor of a released ``pre-train.pth`` (real key names and shapes), random values."""
    g = torch.Generator().manual_seed(0)
    enc_out = 256 if layout == "point_bert" else 384
    enc = {"first_conv.0.weight": (128, 3, 1), "first_conv.0.bias": (128,), "first_conv.3.weight": (256, 128, 1),
           "first_conv.3.bias": (256,), "second_conv.0.weight": (512, 512, 1), "second_conv.0.bias": (512,),
           "second_conv.3.weight": (enc_out, 512, 1), "second_conv.3.bias": (enc_out,)}
    for bn, width in (("first_conv.1", 128), ("second_conv.1", 512)):
        enc.update({f"{bn}.weight": (width,), f"{bn}.bias": (width,), f"{bn}.running_mean": (width,),
                    f"{bn}.running_var": (width,), f"{bn}.num_batches_tracked": ()})
    encoder = {f"encoder.{k}": v for k, v in enc.items()}
    encoder.update({"pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,), "pos_embed.2.weight": (384, 128),
                    "pos_embed.2.bias": (384,), "norm.weight": (384,), "norm.bias": (384,)})
    for i in range(12):
        encoder.update({f"blocks.blocks.{i}.{k}": v for k, v in {
            "norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384),
            "attn.proj.weight": (384, 384), "attn.proj.bias": (384,), "norm2.weight": (384,), "norm2.bias": (384,),
            "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,), "mlp.fc2.weight": (384, 1536),
            "mlp.fc2.bias": (384,)}.items()})
    if layout == "point_mae":
        shapes = {f"MAE_encoder.{k}": v for k, v in encoder.items()}
        shapes.update({"mask_token": (1, 1, 384), "decoder_pos_embed.0.weight": (128, 3),
                       "MAE_decoder.blocks.blocks.0.norm1.weight": (384,), "MAE_decoder.norm.weight": (384,),
                       "increase_dim.0.weight": (96, 384, 1), "increase_dim.0.bias": (96,)})
    else:
        encoder.update({"reduce_dim.weight": (384, 256), "reduce_dim.bias": (384,), "cls_token": (1, 1, 384),
                        "cls_pos": (1, 1, 384), "mask_token": (1, 1, 384), "lm_head.weight": (8192, 384),
                        "cls_head.0.weight": (256, 384)})
        shapes = {f"transformer_q.{k}": v for k, v in encoder.items()}
        shapes.update({"transformer_k.norm.weight": (384,), "dvae.codebook": (8192, 256), "queue": (256, 16384)})
    out = {}
    for key, shape in shapes.items():
        out[f"module.{key}"] = (torch.randint(0, 100, shape, generator=g) if key.endswith("num_batches_tracked")
                                else torch.randn(shape, generator=g))
    return out


OURS = {"point_mae": ("MAE_encoder.", {}), "point_bert": ("transformer_q.", {"cls_pos": "cls_pos_embed"})}


@pytest.mark.parametrize("layout, cls", [("point_mae", PointMAESource), ("point_bert", PointBERTSource)])
def test_converters_load_a_released_layout_strictly_and_exactly(layout: str, cls: type, tmp_path: Path) -> None:
    released = released_layout(layout)
    path = tmp_path / "pre-train.pth"
    torch.save({"base_model": released, "optimizer": {}, "epoch": 300}, path)
    source = cls(pretrained=str(path))
    ours = dict(source.state_dict())
    ours.update({name: getattr(source, name) for name in source.table_names()})
    prefix, renames = OURS[layout]
    mapped = 0
    for key, value in released.items():
        key = key[len("module."):]
        if not key.startswith(prefix) or key.split(".")[1] in ("mask_token", "lm_head", "cls_head"):
            continue
        rest = key[len(prefix):].replace("blocks.blocks.", "blocks.")
        assert torch.equal(ours[renames.get(rest, rest)], value), key
        mapped += 1
    assert mapped == len(ours)  # every tensor of ours came from the file
    assert source.identity()["sha256"] is not None

    bad = dict(released, **{"module.MAE_encoder.extra.weight": torch.zeros(1)})
    torch.save({"base_model": bad}, path)
    with pytest.raises(CheckpointError, match="MAE_encoder.extra.weight"):
        cls(pretrained=str(path))
    missing = {k: v for k, v in released.items() if not k.endswith("blocks.blocks.3.mlp.fc1.bias")}
    torch.save(missing, path)  # a bare state dict, without base_model, loads too; here a key lacks
    with pytest.raises(CheckpointError, match=r"missing keys .*blocks\.3\.mlp\.fc1\.bias"):
        cls(pretrained=str(path))


def test_full_size_counts_on_meta_match_the_released_models() -> None:
    """22.1M for the released Point-BERT / Point-MAE fine-tuning (with their heads)."""
    with torch.device("meta"):
        mae = build_model(dict(type="Any2Point", num_classes=15, source=dict(type="PointMAESource", num_groups=128),
                               tuner=dict(type="FullFinetune")))
        peft = build_model(dict(type="Any2Point", num_classes=15, source=dict(type="PointMAESource", num_groups=128),
                                tuner=dict(type="PointPEFT")))
    assert mae.parameter_counts()["trainable"] == 22_093_327
    # Per block 2 x 12,688 (bottlenecks) + 768 (BN) + 3,072 (biases); 6 prompted blocks 3,840 + 6,536;
    # the group attention 28,032 and its norm 768; final norm 768; cls token and position 768.
    assert peft.parameter_counts()["trainable_without_head"] == 12 * 29_216 + 6 * 10_376 + 28_800 + 1_536


# ------------------------------------------------------------------------------- the prompt

def test_point_prior_attention_equals_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    feature, bank, k = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g), 4
    cache = point_prior_attention(feature, bank, k)
    assert cache.shape == (3, k + 2, 8)
    for b in range(3):
        f = feature[b].tolist()
        norm = math.sqrt(sum(v * v for v in f))
        sims = [sum(fi / norm * bi for fi, bi in zip(f, row)) for row in bank.tolist()]
        top = sorted(range(20), key=lambda i: -sims[i])[:k]
        weights = [math.exp(sims[i]) for i in top]
        weights = [w / sum(weights) for w in weights]
        mixed = [sum(w * bank[i, c].item() for w, i in zip(weights, top)) for c in range(8)]
        torch.testing.assert_close(cache[b, 0], feature[b])
        torch.testing.assert_close(cache[b, 1], torch.tensor(mixed), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache[b, 2:], bank[top])


def test_prompts_enter_the_first_blocks_and_leave_after_them() -> None:
    model = tiny_model().eval()
    tuner, seen = model.tuner, []
    original = model.source.forward_block

    def spy(index, x, *args, **kw):
        seen.append(x.shape[1])
        return original(index, x, *args, **kw)

    model.source.forward_block = spy
    assert model(clouds()).shape == (3, 4)
    # The frozen encoder's pass for the global feature (G tokens), then cls + P prompts + G tokens in
    # blocks 0 and 1, none in block 2.
    assert seen == [16, 16, 16, 1 + 4 + 16, 1 + 4 + 16, 1 + 16]
    assert tuner.num_prompts == 0


# ------------------------------------------------------------------------------ the adapter

def test_geometry_neighbourhoods_equal_brute_force() -> None:
    centres = clouds(2, 20).double()
    groups = geometry_neighbourhoods(centres, 6, 4, num_interp=3)
    for b in range(2):
        picked = brute_force_fps(centres[b], 6)
        assert groups.sampled[b].tolist() == picked
        for s, c in enumerate(picked):
            d = [float(((centres[b, i] - centres[b, c]) ** 2).sum()) for i in range(20)]
            assert groups.members[b, s].tolist() == sorted(range(20), key=lambda i: d[i])[:4]
        for t in range(20):
            d = [float(((centres[b, t] - centres[b, c]) ** 2).sum()) for c in picked]
            near = sorted(range(6), key=lambda s: d[s])[:3]
            w = torch.zeros(6, dtype=torch.float64)
            for s in near:
                w[s] = 1 / (d[s] + 1e-8)
            torch.testing.assert_close(groups.weights[b, t], w / w.sum())


# ------------------------------------------------------------------------------ memory bank

def test_bank_files_are_read_strictly_and_the_released_layout_converts(tmp_path: Path) -> None:
    released = torch.randn(8, 30)  # (C, M), as the released cache_shape.pt
    torch.save(released, tmp_path / "cache_shape.pt")
    with pytest.raises(CheckpointError, match="bare tensor.*convert"):
        read_memory_bank(tmp_path / "cache_shape.pt")
    assert bank_main(["--released", str(tmp_path / "cache_shape.pt"), "--out", str(tmp_path / "bank.pt")]) == 0
    assert torch.equal(read_memory_bank(tmp_path / "bank.pt"), released.t())
    torch.save({"features": released, "source": {}, "extra": 1}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="exactly"):
        read_memory_bank(tmp_path / "odd.pt")


def test_memory_bank_tool_on_the_synthetic_shapes(tmp_path: Path) -> None:
    cfg = {"model": {"type": "Any2Point", "num_classes": 4, "source": {"type": "PointMAESource", **TINY},
                     "tuner": {"type": "PointPEFT", "num_prompts": 4, "prompt_depth": 2, "group_size": 4,
                               "memory_bank": str(tmp_path / "bank.pt")}},
           "dataset": {"type": "SyntheticShapes", "num_points": 96, "train_size": 10, "val_size": 2,
                       "test_size": 4, "classes": ["sphere", "box", "cone", "torus"],
                       "transforms": {"train": [{"type": "RandomScale", "low": 0.5, "high": 2.0}], "test": []}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    torch.manual_seed(0)
    info = build_bank(str(path), batch_size=4)
    assert info == {"out": str(tmp_path / "bank.pt"), "features": [10, 32]}
    bank = read_memory_bank(tmp_path / "bank.pt")
    torch.manual_seed(0)
    again = build_bank(str(path), out=str(tmp_path / "again.pt"), batch_size=3)  # no augmentation: same
    assert again["features"] == [10, 32]
    torch.testing.assert_close(read_memory_bank(tmp_path / "again.pt"), bank)
    # The model reads it and its prompts retrieve from it.
    torch.manual_seed(0)
    model = build_model(cfg["model"]).eval()
    assert torch.equal(model.tuner.bank, bank)
    x = clouds()
    embedded = model.source.embed_points(x)
    context = model.tuner.prepare(embedded)
    torch.testing.assert_close(context.cache, point_prior_attention(model.source(embedded.tokens, embedded.pe), bank, 2))


def write_tiny_pretrained(folder: Path) -> Path:
    """A tiny random Point-MAE encoder saved in the released ``pre-train.pth`` layout."""
    torch.manual_seed(5)
    source = PointMAESource(**TINY)
    weights = folder / "pre.pth"
    torch.save({"base_model": {f"module.MAE_encoder.{k.replace('blocks.', 'blocks.blocks.', 1)}": v
                               for k, v in source.state_dict().items()}}, weights)
    return weights


def test_a_missing_or_foreign_bank_is_an_error_for_a_pretrained_source(tmp_path: Path) -> None:
    weights = write_tiny_pretrained(tmp_path)

    def build(bank: Path) -> torch.nn.Module:
        return build_model(dict(type="Any2Point", num_classes=4,
                                source=dict(type="PointMAESource", pretrained=str(weights), **TINY),
                                tuner=dict(type="PointPEFT", num_prompts=4, prompt_depth=2, group_size=4,
                                           memory_bank=str(bank))))

    with pytest.raises(FileNotFoundError, match="build_memory_bank"):
        build(tmp_path / "absent.pt")
    save_memory_bank(torch.randn(6, 32), {"name": "point_mae", "weights": "other.pth", "sha256": "ab" * 32},
                     tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="built with other source weights"):
        build(tmp_path / "foreign.pt")
    save_memory_bank(torch.randn(6, 32), {"name": "released cache_shape.pt", "weights": None, "sha256": None},
                     tmp_path / "released.pt")
    assert build(tmp_path / "released.pt").tuner.bank.shape == (6, 32)  # a converted release is not checked


# ----------------------------------------------------------------------- training, combinations

@pytest.mark.parametrize("source", ["PointMAESource", "PointBERTSource"])
def test_steps_change_exactly_the_declared_tensors(source: str, tmp_path: Path) -> None:
    save_memory_bank(torch.randn(12, 32), {"name": "test"}, tmp_path / "bank.pt")
    model = tiny_model(source, bank=str(tmp_path / "bank.pt"))
    model.train()
    assert {m.training for m in model.source.modules()} == {False}
    declared = {n for n, _ in model.named_parameters() if not n.startswith("source.")}
    declared |= {f"source.{n}" for n, _ in model.source.named_parameters()
                 if n.startswith("norm.") or (n.startswith("blocks.") and n.endswith(".bias"))}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == declared
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(clouds()), torch.tensor([0, 1, 3]))
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    params = dict(model.named_parameters())
    for key, value in model.state_dict().items():
        if key in params:
            assert torch.equal(value, before[key]) != (key in declared), key
        elif key.startswith("source."):
            assert torch.equal(value, before[key]), key  # the frozen encoder's BN statistics stay


def test_the_global_feature_uses_the_pretrained_biases() -> None:
    model = tiny_model().eval()
    x = clouds()
    embedded = model.source.embed_points(x)
    before = model.tuner.prepare(embedded).cache
    with torch.no_grad():
        for _, p in model.source.blocks.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    after = model.tuner.prepare(embedded).cache
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_refused_combinations_name_the_cause() -> None:
    with pytest.raises(ConfigError, match="point-prior prompt needs a 3D-pretrained source"):
        build_model(dict(type="Any2Point", num_classes=4,
                         source=dict(type="CLIPTextSource", width=32, depth=2, heads=4),
                         tokenizer=dict(type="PointPNTokenizer", k=8), tuner=dict(type="PointPEFT", prompt_depth=2)))
    with pytest.raises(ConfigError, match="tuner 'GuidedAdapter' needs the virtual projection"):
        build_model(dict(type="Any2Point", num_classes=4, source=dict(type="PointMAESource", **TINY)))
    with pytest.raises(ConfigError, match="model tokenizer: source 'PointBERTSource' tokenizes its own points"):
        build_model(dict(type="Any2Point", num_classes=4, source=dict(type="PointBERTSource", **TINY),
                         tokenizer=dict(type="PointPNTokenizer"), tuner=dict(type="FullFinetune")))


@pytest.mark.parametrize("tuner", [dict(type="FullFinetune"), dict(type="FrozenSource"),
                                   dict(type="PromptTuning", num_prompts=2), dict(type="AdapterTuning", bottleneck=4),
                                   dict(type="LoRA", rank=2, targets=["q", "v", "o"])])
def test_other_tuners_run_on_a_3d_source(tuner: dict) -> None:
    torch.manual_seed(0)
    model = build_model(dict(type="Any2Point", num_classes=4, source=dict(type="PointBERTSource", **TINY), tuner=tuner))
    logits = model(clouds())
    logits.sum().backward()
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------ the released ckpt-best.pth

def released_finetuned_layout() -> dict[str, torch.Tensor]:
    """Every tensor of Point-PEFT's released MAE ``ckpt-best.pth`` (real names and shapes), random values."""
    g = torch.Generator().manual_seed(1)
    state = {k.replace("MAE_encoder.", ""): v for k, v in released_layout("point_mae").items()
             if k.startswith("module.MAE_encoder.")}
    shapes = {"cls_token": (1, 1, 384), "cls_pos": (1, 1, 384), "prompt_cor": (10, 3),
              "blocks.attn1.qkv.weight": (54, 384), "blocks.attn1.proj.weight": (384, 18),
              "blocks.attn1.proj.bias": (384,), "blocks.norm3.weight": (384,), "blocks.norm3.bias": (384,),
              "cls_head_finetune.0.weight": (256, 768), "cls_head_finetune.0.bias": (256,),
              "cls_head_finetune.4.weight": (256, 256), "cls_head_finetune.4.bias": (256,),
              "cls_head_finetune.8.weight": (15, 256), "cls_head_finetune.8.bias": (15,)}
    for bn in ("cls_head_finetune.1", "cls_head_finetune.5"):
        shapes.update({f"{bn}.{n}": (256,) for n in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{bn}.num_batches_tracked"] = ()
    for i in range(12):
        p = f"blocks.blocks.{i}."
        shapes.update({p + "cp_adapter.ln1.weight": (8, 384), p + "cp_adapter.ln1.bias": (8,),
                       p + "cp_adapter.ln2.weight": (384, 8), p + "cp_adapter.ln2.bias": (384,),
                       p + "prompt_embeddings": (10, 384), p + "ad_gate": (1,)})
        for a in ("adapter", "adapter1"):
            shapes.update({p + f"{a}.ln1.weight": (16, 384), p + f"{a}.ln1.bias": (16,),
                           p + f"{a}.ln2.weight": (384, 16), p + f"{a}.ln2.bias": (384,)})
        shapes.update({p + f"out_transform.0.{n}": (384,) for n in ("weight", "bias", "running_mean", "running_var")})
        shapes[p + "out_transform.0.num_batches_tracked"] = ()
    for key, shape in shapes.items():
        state[f"module.{key}"] = (torch.randint(0, 100, shape, generator=g) if key.endswith("num_batches_tracked")
                                  else torch.randn(shape, generator=g))
    return state


def test_released_point_peft_checkpoint_converts_strictly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from any2point.engine.checkpoint import load_trainable_state_dict
    from tools.convert_ckpt import convert

    released = released_finetuned_layout()
    path = tmp_path / "ckpt-best.pth"
    torch.save({"base_model": released, "epoch": 250, "metrics": {"acc": 89.1}}, path)
    ckpt = convert(str(path), "point_peft_scanobjectnn_point_mae", str(tmp_path / "ours.pth"),
                   overrides=["model.tuner.memory_bank=null"])
    ours = ckpt["model"]
    r = {k[len("module."):]: v for k, v in released.items()}
    assert torch.equal(ours["tuner.prompts"][3], r["blocks.blocks.3.prompt_embeddings"])
    assert torch.equal(ours["tuner.cache_adapters.5.up.weight"], r["blocks.blocks.5.cp_adapter.ln2.weight"])
    assert torch.equal(ours["tuner.blocks.7.token_adapter.down.bias"], r["blocks.blocks.7.adapter1.ln1.bias"])
    assert torch.equal(ours["tuner.blocks.0.pool_norm.running_var"], r["blocks.blocks.0.out_transform.0.running_var"])
    assert torch.equal(ours["tuner.group_attention.qkv.weight"], r["blocks.attn1.qkv.weight"])
    assert torch.equal(ours["source.blocks.11.mlp.fc1.bias"], r["blocks.blocks.11.mlp.fc1.bias"])
    assert torch.equal(ours["cls_pos_embed"], r["cls_pos"])
    assert torch.equal(ours["head.0.weight"], torch.cat([r["cls_head_finetune.0.weight"][:, 384:],
                                                         r["cls_head_finetune.0.weight"][:, :384]], dim=1))
    report = capsys.readouterr().out
    assert "never uses" in report and "runs without prompts" in report and "prompt coordinates" in report
    cfg = OmegaConf.create(ckpt["config"])
    cfg.model.source.pretrained = None
    model = build_model(cfg.model)
    load_trainable_state_dict(model, ours, "converted")  # strict: exactly our trainable keys

    bad = dict(released, **{"module.blocks.blocks.0.extra.weight": torch.zeros(1)})
    torch.save({"base_model": bad}, path)
    with pytest.raises(CheckpointError, match=r"unknown keys .*blocks\.blocks\.0\.extra\.weight"):
        convert(str(path), "point_peft_scanobjectnn_point_mae", str(tmp_path / "ours.pth"),
                overrides=["model.tuner.memory_bank=null"])


def test_encode_is_the_released_fine_tuning_forward_with_pe_before_every_block() -> None:
    torch.manual_seed(0)
    model = build_model(dict(type="Any2Point", num_classes=4, source=dict(type="PointBERTSource", **TINY),
                             tuner=dict(type="FrozenSource"))).eval()
    assert model.pe_injection == "every_block"
    x = clouds()
    src = model.source
    centres, tokens = src.tokenize(x)
    pos = torch.cat([model.cls_pos_embed.expand(3, -1, -1), src.pos_embed(centres)], dim=1)
    h = torch.cat([model.cls_token.expand(3, -1, -1), tokens], dim=1)
    for block in src.blocks:
        h = h + pos
        h = h + block.attn(block.norm1(h))
        h = h + block.mlp(block.norm2(h))
    h = src.norm(h)
    encoded = model.encode(x)
    torch.testing.assert_close(encoded.cls, h[:, 0])
    torch.testing.assert_close(encoded.tokens, h[:, 1:])


@pytest.mark.parametrize("config, released", [("scanobjectnn_point_mae", 0.7e6), ("scanobjectnn_point_bert", 0.6e6)])
def test_scanobjectnn_configs_are_within_10_percent_of_the_released_counts(config: str, released: float) -> None:
    """The released README's 0.7M / 0.6M include the head (its full fine-tuning rows, 22.1M, do too)."""
    from tools.count_params import count_params

    root = Path(__file__).resolve().parents[1]
    counts = count_params(str(root / f"cfgs/point_peft/{config}.yaml"))
    assert abs(counts["trainable"] / released - 1) <= 0.10, counts
    full = count_params(str(root / f"cfgs/point_peft/{config}_full.yaml"))
    assert abs(full["trainable"] / 22.1e6 - 1) <= 0.005, full


def test_the_pe_figure_names_why_a_3d_source_has_none() -> None:
    from any2point.errors import UserError
    from tools.visualize import pe_similarity

    with pytest.raises(UserError, match="3D-pretrained and has none"):
        pe_similarity(tiny_model(), clouds(1)[0], 0)


def test_main_trains_tests_and_reloads_a_tiny_point_peft_run(tmp_path: Path) -> None:
    import json

    import main as entry

    save_memory_bank(torch.randn(12, 32), {"name": "test"}, tmp_path / "bank.pt")
    weights = write_tiny_pretrained(tmp_path)  # the frozen encoder comes from its file, as in a real run
    cfg = {"model": {"type": "Any2Point", "num_classes": 4,
                     "source": {"type": "PointMAESource", "pretrained": str(weights), **TINY},
                     "tuner": {"type": "PointPEFT", "num_prompts": 4, "prompt_depth": 2, "group_size": 4,
                               "memory_bank": str(tmp_path / "bank.pt")}},
           "dataset": {"type": "SyntheticShapes", "num_points": 96, "train_size": 8, "val_size": 4, "test_size": 8,
                       "classes": ["sphere", "box", "cone", "torus"]},
           "train": {"epochs": 1, "batch_size": 4, "num_workers": 0},
           "scheduler": {"type": "CosineWarmup", "warmup_epochs": 0},
           "experiment": {"name": "pp", "output_dir": str(tmp_path)}}
    path = tmp_path / "cfg.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    assert entry.main(["--config", str(path)]) == 0
    trained = json.loads((tmp_path / "pp/results.json").read_text())["confusion"]
    assert entry.main(["--test", "--ckpt", str(tmp_path / "pp/ckpt-best.pth"), "--results", "again.json"]) == 0
    assert json.loads((tmp_path / "pp/again.json").read_text())["confusion"] == trained

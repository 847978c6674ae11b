"""The parameters and buffers of a TorchScript archive, read without running any of its code.

OpenAI released CLIP as TorchScript archives (``torch.jit.save`` files). ``torch.jit.load`` compiles
the archive's code and runs it: a class's scripted ``__setstate__`` executes while the file loads,
so a weight file could write files or worse. This reader treats the archive as data only:

- ``<root>/data.pkl`` pickles the module tree: each module is an object of a ``__torch__.*`` class
  whose state is a dict of its attributes (parameters, buffers, submodules, plain values), and each
  tensor is ``torch._utils._rebuild_tensor_v2`` over a storage whose persistent id names the record
  ``<root>/data/<key>`` holding its raw little-endian bytes.
- ``<root>/code/__torch__/<module path>.py`` declares each class, with ``__parameters__`` and
  ``__buffers__`` lists that say which attributes ``state_dict()`` holds.

The pickle is read by an unpickler that knows only tensors, storages, ordered dicts, TorchScript's
typed-container tags and inert stand-ins for the ``__torch__`` classes (it calls nothing else), and
the class declarations are parsed with :mod:`ast`, never executed. A class that restores itself with
its own ``__setstate__`` is refused: only running that code could rebuild it. The result equals
``torch.jit.load(path).state_dict()`` for archives of plain modules.
"""
from __future__ import annotations

import ast
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from any2point.errors import CheckpointError

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class _Refused(Exception):
    """The archive needs something this reader does not do (it would have to run code)."""


@dataclass(frozen=True)
class _ClassDecl:
    """What a ``__torch__`` class declares: its state-dict attributes and whether it is a module."""

    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    is_module: bool
    has_setstate: bool


class _ScriptObject:
    """Inert stand-in for an object of a ``__torch__`` class: it only keeps the pickled state."""

    qualname = ""

    def __init__(self, *args: Any) -> None:  # the pickle passes no arguments to these classes
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _typed_list(value: Any, *_: Any) -> Any:
    """TorchScript's typed-container tags (``restore_type_tag``, ``build_intlist``...): the value itself."""
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    """A tensor viewing ``storage`` (a 1-D tensor of the record's elements), bounds checked."""
    if not isinstance(storage, Tensor) or not isinstance(offset, int) or not isinstance(size, tuple) \
            or not isinstance(stride, tuple) or len(size) != len(stride) \
            or not all(isinstance(v, int) and v >= 0 for v in size + stride) or offset < 0:
        raise _Refused("a tensor record with a malformed shape")
    if backward_hooks or metadata:
        raise _Refused("a tensor with hooks or metadata")
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel():
        raise _Refused("a tensor that reaches beyond its storage record")
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Tensor:
    if not isinstance(data, Tensor) or backward_hooks:
        raise _Refused("a malformed parameter")
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch.jit._pickle", name): _typed_list
       for name in ("restore_type_tag", "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")},
}


class _ArchiveReader:
    def __init__(self, archive: zipfile.ZipFile, root: str) -> None:
        self.archive, self.root = archive, root
        self.classes: dict[str, type[_ScriptObject]] = {}
        self.decls: dict[str, _ClassDecl] = {}
        self.storages: dict[str, Tensor] = {}

    def declaration(self, qualname: str) -> _ClassDecl:
        """Parse (never run) the code file declaring ``qualname``: ``__torch__.a.B`` is class ``B`` of
        ``code/__torch__/a.py``."""
        if qualname not in self.decls:
            module, _, name = qualname.rpartition(".")
            record = f"{self.root}/code/{module.replace('.', '/')}.py"
            try:
                tree = ast.parse(self.archive.read(record).decode("utf-8"))
            except (KeyError, SyntaxError, UnicodeDecodeError) as e:
                raise _Refused(f"no readable declaration of class {qualname} ({record}: {e})") from None
            classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
            if not classes:
                raise _Refused(f"class {qualname} is not declared in {record}")
            body = classes[0].body
            lists = {}
            for node in body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                        and node.targets[0].id in ("__parameters__", "__buffers__"):
                    lists[node.targets[0].id] = tuple(ast.literal_eval(node.value))
            self.decls[qualname] = _ClassDecl(
                parameters=lists.get("__parameters__", ()), buffers=lists.get("__buffers__", ()),
                is_module=any(isinstance(b, ast.Name) and b.id == "Module" for b in classes[0].bases),
                has_setstate=any(isinstance(n, ast.FunctionDef) and n.name == "__setstate__" for n in body))
        return self.decls[qualname]

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if self.declaration(qualname).has_setstate:
                raise _Refused(f"class {qualname} restores itself with its own __setstate__ code")
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        raise _Refused(f"it calls '{module}.{name}'")

    def storage(self, pid: Any) -> Tensor:
        """The elements of record ``data/<key>`` as a 1-D tensor (read once per key)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused(f"an unknown persistent id {pid!r:.80}")
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        if key not in self.storages:
            record = f"{self.root}/data/{key}"
            try:
                info = self.archive.getinfo(record)
            except KeyError:
                raise _Refused(f"the tensor record {record} is missing") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if info.file_size != numel * itemsize:
                raise _Refused(f"the tensor record {record} holds {info.file_size} bytes, not {numel} x {itemsize}")
            buffer = bytearray(info.file_size)
            with self.archive.open(info) as f:
                f.readinto(memoryview(buffer))
            self.storages[key] = torch.frombuffer(buffer, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return self.storages[key]

    def load(self) -> Any:
        reader = self

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                return reader.find_class(module, name)

            def persistent_load(self, pid: Any) -> Any:
                return reader.storage(pid)

        with self.archive.open(f"{self.root}/data.pkl") as f:
            return Unpickler(f).load()

    def state_dict(self, obj: Any, prefix: str = "", out: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
        """Parameters, then buffers, then each submodule's, as ``nn.Module.state_dict`` orders them."""
        out = {} if out is None else out
        if not isinstance(obj, _ScriptObject) or not isinstance(obj.state, dict):
            raise _Refused(f"the module at '{prefix or '<root>'}' is not stored as a mapping of its attributes")
        decl = self.declaration(obj.qualname)
        for name in decl.parameters + decl.buffers:
            value = obj.state.get(name)
            if value is None:  # an unset optional parameter (a bias=False layer): not in state_dict either
                continue
            if not isinstance(value, Tensor):
                raise _Refused(f"'{prefix}{name}' is declared a parameter or buffer but is not a tensor")
            out[prefix + name] = value.detach()  # without any hooks a pickled tensor state set
        for name, value in obj.state.items():
            if isinstance(value, _ScriptObject) and self.declaration(value.qualname).is_module:
                self.state_dict(value, f"{prefix}{name}.", out)
        return out


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript archive (OpenAI's released CLIP files), False for a ``torch.save`` file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_torchscript_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """``state_dict()`` of the TorchScript archive ``path``, read as data (see the module docstring);
    an archive that needs its code run, or a damaged one, is a :class:`CheckpointError` naming ``what``
    and the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            roots = sorted({n.split("/", 1)[0] for n in archive.namelist() if n.count("/") == 1
                            and n.endswith("/data.pkl")})
            if len(roots) != 1:
                raise _Refused("no single <root>/data.pkl record")
            byteorder = f"{roots[0]}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise _Refused("its tensors are stored big-endian")
            reader = _ArchiveReader(archive, roots[0])
            return reader.state_dict(reader.load())
    except _Refused as e:
        raise CheckpointError(f"{what}: refusing to load the TorchScript archive '{path}': {e}; weight files are "
                              f"read as data and never run (convert it on a trusted machine with "
                              f"torch.save(torch.jit.load(path).state_dict(), 'weights.pt'))") from None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{what}: cannot read the TorchScript archive '{path}' (corrupt or truncated): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

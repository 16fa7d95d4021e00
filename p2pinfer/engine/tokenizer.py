"""Text <-> token ids with the `tokenizers` library, chat prompts from the model's own jinja template."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from .catalog import ModelEntry
from .errors import ModelFileError, UnsupportedModelError


def _render_template(template: str, messages: list[dict], special: dict, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )
    except TemplateError as e:
        raise ModelFileError(f"chat template failed: {e}") from e


class IncrementalDecoder:
    """Streams text for token ids one at a time without ever emitting half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self._byte_of = tokenizer._token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._byte_of(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    def __init__(self, backend, chat_template: str | None, special: dict, eos_token_ids: tuple[int, ...],
                 add_bos: bool, bos_token_id: int | None, byte_level: bool):  # fmt: skip
        self.backend = backend  # tokenizers.Tokenizer
        self.chat_template = chat_template
        self.special = special  # bos_token / eos_token strings for templates
        self.eos_token_ids = eos_token_ids
        self.add_bos, self.bos_token_id = add_bos, bos_token_id
        self.byte_level = byte_level  # GPT-2 style vocabulary (else sentencepiece-style pieces)
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._special_ids = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> Tokenizer:
        if entry.format == "gguf":
            return _from_gguf(Path(entry.path), entry.eos_token_ids)
        return _from_hf_dir(Path(entry.path), entry.eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Raw text (special-token markers in it are recognised), with BOS only if the model asks for it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def render_chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise UnsupportedModelError("model has no chat template")
        return _render_template(self.chat_template, messages, self.special, add_generation_prompt)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # templates emit BOS themselves where the model wants it: don't add another
        return self.backend.encode(
            self.render_chat_text(messages, add_generation_prompt), add_special_tokens=False
        ).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def token_bytes(self, token_id: int) -> bytes:
        """Public name for what a token stands for, as bytes (logprobs report these)."""
        return self._token_bytes(token_id)

    def _token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (special tokens stream as nothing)."""
        piece = self.backend.id_to_token(token_id)
        if piece is None or piece in self._special_ids:
            return b""
        if self.byte_level:
            try:
                return bytes(self._byte_decoder[c] for c in piece)
            except KeyError:
                return piece.encode()
        # sentencepiece-style: '▁' is a space, <0xNN> is a raw byte
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies are written in)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _from_gguf(path: Path, eos_token_ids: tuple[int, ...]) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from .gguf_loader import gguf_field, open_gguf_reader

    r = open_gguf_reader(path)
    kind = gguf_field(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: tokenizer model {kind!r} not supported (only GPT-2 byte-level BPE)"
        )
    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    merges = gguf_field(r, "tokenizer.ggml.merges") or []
    types = gguf_field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False)
    tok = HFTokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    pre = gguf_field(r, "tokenizer.ggml.pre", "gpt2")
    if pre in ("smollm", "starcoder", "refact", "llama3", "llama-bpe", "qwen2", "deepseek-llm"):
        # these split digits one at a time before byte-level BPE, as their tokenizer.json files do
        splits = [pre_tokenizers.Digits(individual_digits=True), byte_level]
        if pre in ("llama3", "llama-bpe", "qwen2"):
            llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            splits = [
                pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens are matched whole, never split by BPE
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    )
    tok.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    )
    bos = gguf_field(r, "tokenizer.ggml.bos_token_id")
    eos = gguf_field(r, "tokenizer.ggml.eos_token_id")
    special = {
        "bos_token": tokens[bos] if bos is not None else "",
        "eos_token": tokens[eos] if eos is not None else "",
    }
    return Tokenizer(
        tok,
        gguf_field(r, "tokenizer.chat_template"),
        special,
        eos_token_ids,
        add_bos=bool(gguf_field(r, "tokenizer.ggml.add_bos_token", False)),
        bos_token_id=int(bos) if bos is not None else None,
        byte_level=True,
    )


def _from_hf_dir(path: Path, eos_token_ids: tuple[int, ...]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    from .hf_loader import read_json

    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelFileError(f"{path}: tokenizer.json missing")
    try:
        backend = HFTokenizer.from_file(str(tok_file))
    except Exception as e:
        raise ModelFileError(f"{tok_file}: cannot load tokenizer: {e}") from e
    cfg_file = path / "tokenizer_config.json"
    cfg = read_json(cfg_file) if cfg_file.is_file() else {}
    template = cfg.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def token_text(v):
        return v.get("content") if isinstance(v, dict) else v

    special = {k: token_text(cfg.get(k)) or "" for k in ("bos_token", "eos_token")}
    bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
    eos = tuple(eos_token_ids)
    if not eos and special["eos_token"] and backend.token_to_id(special["eos_token"]) is not None:
        eos = (backend.token_to_id(special["eos_token"]),)
    byte_level = '"ByteLevel"' in backend.to_str()
    add_bos = bool(cfg.get("add_bos_token", False))
    return Tokenizer(
        backend, template, special, eos, add_bos=add_bos, bos_token_id=bos_id, byte_level=byte_level
    )

"""The captioner of purification: an open_clip CoCa model that writes captions for images.

A captioner is an open_clip CoCa (a CLIP with a multimodal text decoder). Its sizes are data:
``src/rssqa/configs/clip/rs-coca-tiny.json`` is registered into open_clip's registry with the CLIP
configs (see :mod:`rssqa.models.clip`); the paper profile uses open_clip's ``coca_ViT-L-14``. Weights
come from a local checkpoint (what :func:`export_captioner` writes, or a state dict), or the model is
trained on the trusted tier by the purify stage.

Small captioners use a compact vocabulary (:class:`CaptionVocab`): the BPE tokens of open_clip's
tokenizer that the training captions use, renumbered ``0..V-1`` (``rs-coca-tiny`` has ``V = 2048``).
Projecting onto 2048 rather than 49408 tokens is what makes a tiny CoCa trainable on a CPU in
minutes. The vocabulary is saved next to the weights (``caption_vocab.json``); full-vocabulary
configs (``coca_ViT-L-14``) use open_clip's tokenizer unchanged.

Decoding: ``"greedy"`` is our own argmax loop over the model's towers which projects only the last
position onto the vocabulary (open_clip's ``generate`` projects every position at every step, which
makes the vocabulary projection the dominant cost of a small CoCa) and feeds one new token a step
through cached prefixes (open_clip's towers run the whole prefix again at every step): the same
tokens, 2.7 to 3.0 times as many captions a second for the demo's captioner (``bench/caption.py``);
``"beam_search"``, ``"top_k"`` and ``"top_p"`` call open_clip's :meth:`CoCa.generate`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from rssqa.errors import RSSQAError
from rssqa.models.clip import clip_config, create_clip, export_clip, load_clip
from rssqa.runs import atomic_write_json

SOT, EOT = 49406, 49407  # open_clip's BPE start / end of text tokens
BPE_VOCAB_SIZE = 49408
VOCAB_FILE = "caption_vocab.json"
_MARKERS = re.compile(r"<start_of_text>|<end_of_text>.*", re.DOTALL)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_SPACED_JOINER = re.compile(r"(?<=\w) ([-']) (?=\w)")  # BPE decodes "high-resolution" as "high - resolution"
_SPACED_CLITIC = re.compile(r"(?<=\w) (?='(s|t|re|ve|ll|d|m)\b)")  # and "house's" as "house 's"
_SPACE = re.compile(r"\s+")


class CaptionVocab:
    """A compact vocabulary: the BPE tokens a corpus uses, renumbered, for small captioners.

    Ids ``0..3`` are pad, start, end and unknown; ``4..V-1`` are the most frequent BPE tokens of the
    captions it was built from, in BPE-id order (frequency ties broken by BPE id, so the same captions
    give the same vocabulary). Tokens outside it become the unknown id.
    Calling it tokenises like open_clip's tokenizer, in compact ids.

    Args:
        bpe_ids: BPE ids of the compact ids ``4, 5, ...``.
        context_length: tokens per caption (the captioner's context length).
    """

    PAD, SOT, EOT, UNK = 0, 1, 2, 3

    def __init__(self, bpe_ids: Sequence[int], context_length: int = 32):
        self.bpe_ids = [int(i) for i in bpe_ids]
        self.context_length = context_length
        self.to_compact = torch.full((BPE_VOCAB_SIZE,), self.UNK, dtype=torch.long)
        self.to_compact[0], self.to_compact[SOT], self.to_compact[EOT] = self.PAD, self.SOT, self.EOT
        self.to_compact[torch.tensor(self.bpe_ids, dtype=torch.long)] = torch.arange(4, 4 + len(self.bpe_ids))
        self.to_bpe = torch.tensor([0, SOT, EOT, 0, *self.bpe_ids], dtype=torch.long)  # unknown decodes to nothing

    def __len__(self) -> int:
        return 4 + len(self.bpe_ids)

    @classmethod
    def build(cls, captions: Iterable[str], size: int, context_length: int = 32) -> CaptionVocab:
        """The (at most) ``size - 4`` most frequent BPE tokens of ``captions``."""
        counts: Counter[int] = Counter()
        for text in captions:
            counts.update(int(t) for t in open_clip.tokenize([text], context_length=77)[0] if int(t) not in (0, SOT, EOT))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - 4]
        return cls(sorted(i for i, _ in ranked), context_length)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenise ``B`` captions to ``B×context_length`` compact ids (truncated captions end with the end token)."""
        return self.to_compact[open_clip.tokenize(texts, context_length=context_length or self.context_length)]

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """``B×L`` compact ids -> caption strings."""
        return decode_tokens(self.to_bpe[tokens.cpu().clamp(0, len(self) - 1)])

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``folder/caption_vocab.json``."""
        atomic_write_json(os.path.join(folder, VOCAB_FILE), {"bpe_ids": self.bpe_ids, "context_length": self.context_length})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CaptionVocab:
        """Read ``folder/caption_vocab.json``."""
        path = os.path.join(folder, VOCAB_FILE)
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["bpe_ids"], int(data.get("context_length", 32)))
        except (OSError, ValueError, KeyError) as e:
            raise RSSQAError(f"{path}: unreadable caption vocabulary ({type(e).__name__}: {e})") from None


def vocab_size(model: torch.nn.Module) -> int:
    """Number of tokens the captioner's decoder predicts."""
    return int(model.text_decoder.text_projection.shape[1])


def needs_vocab(model: torch.nn.Module) -> bool:
    """True when the captioner was built for a compact vocabulary (not open_clip's full BPE one)."""
    return vocab_size(model) != BPE_VOCAB_SIZE


@dataclass
class GenerationConfig:
    """How captions are decoded.

    Attributes:
        method: ``"greedy"`` (fast argmax), ``"beam_search"``, ``"top_k"`` or ``"top_p"`` (open_clip).
        max_tokens: longest caption in tokens, start and end tokens included.
        min_tokens: shortest caption in tokens (the end token is forbidden before).
        num_beams: beams for ``beam_search``.
        top_k: k for ``top_k`` sampling; top_p: p for ``top_p`` sampling.
        batch_size: images per decoding batch.
    """

    method: str = "greedy"
    max_tokens: int = 24
    min_tokens: int = 4
    num_beams: int = 2
    top_k: int = 1
    top_p: float = 0.1
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "beam_search", "top_k", "top_p"):
            raise RSSQAError(f"generation.method: {self.method!r}; choose greedy, beam_search, top_k or top_p")
        if not 2 <= self.min_tokens < self.max_tokens:
            raise RSSQAError(f"generation: need 2 <= min_tokens < max_tokens, got {self.min_tokens}, {self.max_tokens}")


def is_captioner(model: torch.nn.Module) -> bool:
    """True for an open_clip CoCa (a model with a text decoder)."""
    return isinstance(model, open_clip.CoCa)


def create_captioner(
    name: str = "rs-coca-tiny", checkpoint: str | os.PathLike | None = None, **kw: Any
) -> tuple[torch.nn.Module, Callable, Callable, Callable | None]:
    """Build a CoCa captioner by registered name, randomly initialised or from a local checkpoint.

    Args:
        name: a CoCa config name (``"rs-coca-tiny"``, ``"coca_ViT-B-32"``, ``"coca_ViT-L-14"``).
        checkpoint: optional local weights (open_clip local dir or a state-dict file); a compact-vocabulary
            captioner needs its ``caption_vocab.json`` in that dir.
        **kw: passed on to :func:`rssqa.models.clip.create_clip`.

    Returns:
        ``(model, preprocess_train, preprocess_val, tokenizer)``. The tokenizer is open_clip's, or the
        checkpoint's :class:`CaptionVocab`; it is None for a fresh compact-vocabulary model (build one
        with :meth:`CaptionVocab.build` from the training captions).

    Raises:
        RSSQAError: the name is not a CoCa config, the checkpoint is missing, does not match, or lacks
            its vocabulary.
    """
    if "multimodal_cfg" not in clip_config(name):
        raise RSSQAError(f"captioner model {name!r}: not a CoCa config (no multimodal_cfg)")
    model, pre_train, pre_val, tokenizer = create_clip(name, checkpoint, **kw)
    if checkpoint is None:
        init_decoder(model.text_decoder)
    if needs_vocab(model):
        if checkpoint is None:
            return model, pre_train, pre_val, None
        if not os.path.isfile(os.path.join(checkpoint, VOCAB_FILE)):
            raise RSSQAError(f"{checkpoint}: {name!r} predicts {vocab_size(model)} tokens and needs its {VOCAB_FILE} next to the weights")
        tokenizer = CaptionVocab.load(checkpoint)
        _check_vocab(tokenizer, model, checkpoint)
    return model, pre_train, pre_val, tokenizer


def load_captioner(path: str | os.PathLike, **kw: Any) -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """Load a CoCa captioner (and its vocabulary) from an open_clip local directory."""
    model, pre_train, pre_val, tokenizer = load_clip(path, **kw)
    if not is_captioner(model):
        raise RSSQAError(f"{path}: not a CoCa model (no text decoder); a captioner must be a CoCa")
    if needs_vocab(model):
        tokenizer = CaptionVocab.load(path)
        _check_vocab(tokenizer, model, path)
    return model, pre_train, pre_val, tokenizer


def export_captioner(model: torch.nn.Module, name: str, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a captioner (open_clip local-dir format, plus its vocabulary when compact), atomically."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    export_clip(model, name, partial, tokenizer if not isinstance(tokenizer, CaptionVocab) else None)
    if isinstance(tokenizer, CaptionVocab):
        tokenizer.save(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
    return out_dir


@torch.no_grad()
def init_decoder(decoder: torch.nn.Module) -> None:
    """Initialise a fresh CoCa text decoder as open_clip intends to.

    open_clip 3.3 builds the decoder's vocabulary projection with ``torch.empty`` and never calls
    its ``init_parameters`` (which would fail: it looks for a ``transformer`` attribute). The
    projection then holds whatever memory held: usually zeros, sometimes huge values that blow the
    caption loss up to 1e25, and never the same twice. We apply the intended initialisation.
    """
    width, layers = decoder.width, decoder.layers
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    for block in [*decoder.resblocks, *decoder.cross_attn]:
        torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    torch.nn.init.normal_(decoder.text_projection, std=width**-0.5)


def _check_vocab(vocab: CaptionVocab, model: torch.nn.Module, where: Any) -> None:
    if len(vocab) > vocab_size(model):
        raise RSSQAError(f"{where}: {VOCAB_FILE} has {len(vocab)} tokens, the model predicts {vocab_size(model)}")


def decode_tokens(tokens: torch.Tensor) -> list[str]:
    """Turn ``B×L`` token ids into clean caption strings (markers and padding removed).

    open_clip's BPE decoder gives lower-case words with spaces before punctuation; those spaces are
    removed.
    """
    out = []
    for row in tokens.cpu():
        ids = [int(t) for t in row if int(t) != 0]
        text = _MARKERS.sub(" ", open_clip.decode(torch.tensor(ids, dtype=torch.long)))
        text = _SPACE.sub(" ", _SPACE_BEFORE_PUNCT.sub(r"\1", text)).strip()
        out.append(_SPACED_CLITIC.sub("", _SPACED_JOINER.sub(r"\1", text)))
    return out


@contextmanager
def _hidden_states(decoder: torch.nn.Module):
    # the decoder applies its vocabulary projection only when it has one; without it, it returns
    # the B×L×width hidden states, of which greedy decoding needs the last position only
    proj = decoder.text_projection
    decoder.text_projection = None
    try:
        yield proj
    finally:
        decoder.text_projection = proj


class _PrefixCache:
    """Incremental decoding over open_clip's CoCa towers: each step feeds only the newest token.

    Every self-attention block keeps the layer-normed inputs of the positions already decoded, so a
    step attends from one new position to them instead of running the whole prefix again (open_clip's
    towers recompute every position at every step; both are causal, so the earlier positions'
    outputs do not change). The text tower's appended class token is not needed for the decoder's
    input (CoCa passes it the tokens before it). Supports batch-first towers of open_clip's
    :class:`~open_clip.transformer.ResidualAttentionBlock`; :func:`incremental_ok` says whether a
    model has them.
    """

    def __init__(self, model: torch.nn.Module, image_embs: torch.Tensor):
        self.text, self.decoder = model.text, model.text_decoder
        self.image_embs = image_embs
        n_blocks = len(self.text.transformer.resblocks) + len(self.decoder.resblocks)
        self.past: list[torch.Tensor | None] = [None] * n_blocks
        # the text tower (with its class token) masks keys by the padding id at every position: the key of
        # a padding token, or (open_clip's legacy CoCa mask, ``correct_cls_mask=False``) the key after it
        self.pad_id = getattr(self.text, "pad_id", None) if self.text.cls_emb is not None else None
        self.shifted = not getattr(self.text, "correct_cls_mask", True)
        self.pads: torch.Tensor | None = None  # B×t: the keys masked so far
        self.last: torch.Tensor | None = None  # B: the previous token

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the cache rows ``rows`` (the rows still decoding)."""
        self.image_embs = self.image_embs[rows]
        self.past = [p[rows] if p is not None else None for p in self.past]
        self.pads = self.pads[rows] if self.pads is not None else None
        self.last = self.last[rows] if self.last is not None else None

    def _self_block(self, i: int, block: torch.nn.Module, x: torch.Tensor, pads: torch.Tensor | None = None) -> torch.Tensor:
        h = block.ln_1(x)
        self.past[i] = h if self.past[i] is None else torch.cat([self.past[i], h], dim=1)
        x = x + block.ls_1(block.attn(h, self.past[i], self.past[i], need_weights=False, key_padding_mask=pads)[0])
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Hidden state (before the vocabulary projection) after ``tokens`` (``B``) at ``position``."""
        text = self.text
        cast = text.transformer.get_cast_dtype()
        x = text.token_embedding(tokens).to(cast).unsqueeze(1) + text.positional_embedding[position].to(cast)
        pads = None
        if self.pad_id is not None:
            masked = self.last if self.shifted else tokens
            new = (masked == self.pad_id) if masked is not None else torch.zeros_like(tokens, dtype=torch.bool)
            self.pads = new.unsqueeze(1) if self.pads is None else torch.cat([self.pads, new.unsqueeze(1)], dim=1)
            self.last = tokens
            pads = self.pads if bool(self.pads.any()) else None
        for i, block in enumerate(text.transformer.resblocks):
            x = self._self_block(i, block, x, pads)
        first = len(text.transformer.resblocks)  # the decoder's caches follow the text tower's
        for i, (block, cross) in enumerate(zip(self.decoder.resblocks, self.decoder.cross_attn, strict=True), start=first):
            x = self._self_block(i, block, x)
            x = cross(x, k_x=self.image_embs, v_x=self.image_embs)
        return self.decoder.ln_final(x)[:, 0]


def incremental_ok(model: torch.nn.Module) -> bool:
    """Whether :class:`_PrefixCache` can decode with ``model`` (batch-first open_clip residual blocks)."""
    from open_clip.transformer import ResidualAttentionBlock

    text, decoder = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if text is None or decoder is None or not hasattr(text, "transformer"):
        return False
    blocks = [*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn]
    return (
        all(type(b) is ResidualAttentionBlock and b.attn.batch_first for b in blocks)
        and getattr(text.transformer, "batch_first", False) and getattr(decoder, "batch_first", False)
    )


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module, images: torch.Tensor, max_tokens: int = 24, min_tokens: int = 4, sot: int = SOT, eot: int = EOT,
    incremental: bool | None = None,
) -> torch.Tensor:
    """Argmax decoding with a CoCa: ``B×3×S×S`` preprocessed images -> ``B×max_tokens`` token ids.

    ``sot`` / ``eot`` are the start / end ids of the model's vocabulary; positions after the end are 0.

    Rows that have emitted the end token are dropped from the batch, so a batch costs what its
    longest caption costs for the few rows still running only. Deterministic: no sampling.
    ``incremental`` (default: whenever the model's blocks allow it) feeds one new token per step
    through cached prefixes (:class:`_PrefixCache`) instead of the whole prefix: the same tokens, at a
    cost that grows with the caption's length rather than with its square.
    """
    was_training = model.training
    model.eval()
    try:
        _, image_embs = model._encode_image(images)
        n = images.shape[0]
        out = torch.zeros((n, max_tokens), dtype=torch.long, device=images.device)
        out[:, 0] = sot
        running = torch.arange(n, device=images.device)
        decoder = model.text_decoder
        cache = _PrefixCache(model, image_embs) if (incremental_ok(model) if incremental is None else incremental) else None
        for step in range(1, max_tokens):
            with _hidden_states(decoder) as proj:
                if cache is not None:
                    hidden = cache.step(out[running, step - 1], step - 1)
                else:
                    _, token_embs = model._encode_text(out[running, :step])
                    hidden = decoder(image_embs[running], token_embs)[:, -1]
            logits = hidden @ proj
            logits[:, sot] = -torch.inf
            if step < min_tokens - 1:
                logits[:, eot] = -torch.inf
            nxt = eot if step == max_tokens - 1 else logits.argmax(-1)
            out[running, step] = nxt
            if step < max_tokens - 1:
                going = nxt != eot
                running = running[going]
                if cache is not None and not bool(going.all()):
                    cache.keep(going)
            if running.numel() == 0:
                break
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_captions(
    model: torch.nn.Module, images: torch.Tensor, cfg: GenerationConfig | None = None, tokenizer: Any = None
) -> list[str]:
    """Caption a batch of preprocessed images.

    Args:
        model: an open_clip CoCa.
        images: ``B×3×S×S`` float32, normalised as the captioner's preprocessing does.
        cfg: decoding settings.
        tokenizer: the captioner's :class:`CaptionVocab` (required for compact-vocabulary models), or
            None / open_clip's tokenizer for full-vocabulary ones.

    Returns:
        ``B`` captions (lower case, as the BPE vocabulary is).
    """
    cfg = cfg or GenerationConfig()
    if not is_captioner(model):
        raise RSSQAError(f"captioner: {type(model).__name__} has no text decoder; a captioner must be a CoCa")
    vocab = tokenizer if isinstance(tokenizer, CaptionVocab) else None
    if vocab is None and needs_vocab(model):
        raise RSSQAError(f"captioner: the model predicts {vocab_size(model)} tokens; pass its CaptionVocab")
    sot, eot = (vocab.SOT, vocab.EOT) if vocab is not None else (SOT, EOT)
    captions: list[str] = []
    for start in range(0, images.shape[0], cfg.batch_size):
        chunk = images[start : start + cfg.batch_size]
        if cfg.method == "greedy":
            tokens = greedy_decode(model, chunk, cfg.max_tokens, cfg.min_tokens, sot, eot)
        else:
            was_training = model.training
            model.eval()
            tokens = model.generate(
                chunk,
                seq_len=cfg.max_tokens,
                generation_type=cfg.method,
                num_beams=cfg.num_beams,
                num_beam_groups=1,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                min_seq_len=cfg.min_tokens,
                sot_token_id=sot,
                eos_token_id=eot,
                pad_token_id=0,
            )
            model.train(was_training)
        captions += vocab.decode(tokens) if vocab is not None else decode_tokens(tokens)
    return captions

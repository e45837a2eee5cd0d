"""Source tokenizers -> a fast tokenizer (`tokenizer.json`) that transformers 5.x loads without remote code.

A source with a `tokenizer.json` keeps it verbatim. A sentencepiece BPE model (InternLM2) is rebuilt as a
`tokenizers` BPE with the same pieces, merges ordered by piece score, byte fallback, and sentencepiece's
normalisation (dummy prefix "▁" before each text segment, spaces as "▁"); the tests check it encodes exactly as
sentencepiece does. Either way the result is wrapped in the generic fast class, so that loading it does not
rebuild parts of it.
"""

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from .reading import ConversionError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece piece types


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    config = _read_json(folder / "tokenizer_config.json")
    config.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if k not in config})
    if (folder / "tokenizer.json").exists():
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "tokenizer.model").exists():
        backend = sentencepiece_bpe(
            folder / "tokenizer.model",
            add_bos=config.get("add_bos_token", True),
            add_eos=config.get("add_eos_token", False),
            bos=_content(config.get("bos_token")),
            eos=_content(config.get("eos_token")),
        )
        _add_tokens(backend, folder, config)
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        backend = _native_fast_backend(folder)  # e.g. InternVL2-1B's Qwen2 tokenizer, saved without tokenizer.json
    else:
        raise ConversionError(f"No tokenizer.json, tokenizer.model or vocab.json + merges.txt in {folder}.")
    special = {name: _content(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    extra = [_content(token) for token in config.get("additional_special_tokens", [])]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        model_max_length=config.get("model_max_length", int(1e30)),
        **{key: value for key, value in special.items() if value is not None},
    )
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    for token in ("<img>", "</img>", "<IMG_CONTEXT>"):
        if token not in tokenizer.get_vocab():
            raise ConversionError(f"The source tokenizer has no {token} token; is this an InternVL2 checkpoint?")
    return tokenizer


def sentencepiece_bpe(path: Path, add_bos: bool, add_eos: bool, bos: str | None, eos: str | None) -> Tokenizer:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type != 2:
        raise ConversionError(
            f"{path.name} is a sentencepiece model of type {proto.trainer_spec.model_type}; only BPE (2)."
        )
    pieces = [(piece.piece, piece.score, piece.type) for piece in proto.pieces]
    vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
    unk = next((piece for piece, _, kind in pieces if kind == UNKNOWN), None)
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(pieces, vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1, right=0)] if spec.add_dummy_prefix else [])
    )
    # Control and user-defined pieces are matched whole in the text, before the model, as sentencepiece does.
    backend.add_special_tokens([piece for piece, _, kind in pieces if kind in (CONTROL, USER_DEFINED, UNKNOWN)])
    single, special = "$A:0", []
    if add_bos and bos:
        single, special = f"{bos}:0 {single}", [(bos, vocab[bos])]
    if add_eos and eos:
        single, special = f"{single} {eos}:0", special + [(eos, vocab[eos])]
    if special:
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} {single.replace('$A', '$B').replace(':0', ':1')}", special_tokens=special
        )
    return backend


def _merges(pieces, vocab):
    """BPE merges of a sentencepiece model: every split of a piece into two pieces, by the piece's score."""
    merges = []
    for piece, score, kind in pieces:
        if kind != NORMAL or len(piece) < 2:
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(score, vocab[left], vocab[right], left, right) for left, right in splits]
    merges.sort(key=lambda merge: (-merge[0], merge[1], merge[2]))
    return [(left, right) for _, _, _, left, right in merges]


def _add_tokens(backend: Tokenizer, folder: Path, config: dict):
    """Tokens added after the sentencepiece vocabulary (InternVL's <img>, <IMG_CONTEXT>, ...), at their ids."""
    added = {int(index): entry["content"] for index, entry in config.get("added_tokens_decoder", {}).items()}
    added.update({index: token for token, index in _read_json(folder / "added_tokens.json").items()})
    for index in sorted(added):
        token = added[index]
        if backend.token_to_id(token) == index:
            continue
        if index != backend.get_vocab_size():
            raise ConversionError(
                f"Added token {token!r} has id {index}, but the next free id is {backend.get_vocab_size()}."
            )
        backend.add_special_tokens([token])


def _native_fast_backend(folder: Path) -> Tokenizer:
    """The `tokenizers` pipeline transformers builds for a tokenizer class of its own (no remote code)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"Could not load the tokenizer in {folder} with transformers' own classes: {error}"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConversionError(f"The tokenizer in {folder} has no fast version to convert.")
    return tokenizer.backend_tokenizer


def _content(token):
    return token["content"] if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}

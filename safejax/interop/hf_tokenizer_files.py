"""The tokenizer files of an exported folder: tokenizer.json, tokenizer_config.json (with a chat
template rendering our dialogue template) and special_tokens_map.json.

With our SentencePiece vocabulary the tokenizer.json is converted (interop/sp_to_hf.py); an
imported tokenizer.json goes back out as it came in, with its reserved tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import seqio
import tokenizers

from safejax.data import dialogue

# data/dialogue.py's template in Jinja: a system message is folded into the next user turn, before
# its text and a blank line (data/conversations.py), each turn is MARKER + "Name: text" + END.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + [message['content']] -%}"
    "{%- elif message['role'] == 'user' -%}"
    "USER{{ 'USER_NAME: ' + (ns.system + [message['content']]) | join('\\n\\n') }}END"
    "{%- set ns.system = [] -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "ASSISTANT{{ 'ASSISTANT_NAME: ' + message['content'] }}END"
    "{%- else -%}{{ raise_exception('roles are system, user and assistant') }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANTASSISTANT_NAME:{%- endif -%}"
)


def chat_template(markers: dict[str, str], names: tuple[str, str] = ("User", "Assistant")) -> str:
    """CHAT_TEMPLATE with the role markers' texts (the tokenizer's own where import named them)."""
    words = {"USER_NAME": names[0], "ASSISTANT_NAME": names[1], "ASSISTANT": markers[dialogue.ASSISTANT],
             "USER": markers[dialogue.USER], "END": markers[dialogue.END_OF_TURN]}
    return re.sub("|".join(words), lambda m: words[m.group()], CHAT_TEMPLATE)


def exported_reserved(vocabulary: seqio.Vocabulary, reserved: dict[str, int]) -> dict[str, tuple[str, int]]:
    """Each reserved token's text and id in the exported tokenizer: an imported tokenizer's own
    (the token import named for it, a moved id 0 moved back), ours as they are."""
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return {token: (token, token_id) for token, token_id in reserved.items()}
    return {token: (vocabulary.reserved_tokens.get(token, token), vocabulary.tokenizer_id(token_id))
            for token, token_id in reserved.items()}


def _special_names(vocabulary: seqio.Vocabulary) -> dict[str, str | None]:
    """bos, eos, unk and pad tokens by name, as tokenizer_config.json names them."""
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        sp = vocabulary.tokenizer
        return {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
                "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(sp.pad_id())}
    tok, hf_id = vocabulary.tokenizer, vocabulary.tokenizer_id
    return {"eos_token": tok.id_to_token(hf_id(vocabulary.eos_id)), "pad_token": tok.id_to_token(0),
            **({"unk_token": tok.id_to_token(hf_id(vocabulary.unk_id))} if vocabulary.unk_id is not None else {})}


def write(vocabulary: seqio.Vocabulary, reserved: dict[str, tuple[str, int]], context: int, output: str) -> dict:
    """Writes the tokenizer files into `output` (`reserved`: exported_reserved); returns the special
    tokens' ids ({bos,eos,pad}_token_id, None where there is none)."""
    path = os.path.join(output, "tokenizer.json")
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        from safejax.interop import sp_to_hf

        sp_to_hf.tokenizer_from_sentencepiece(vocabulary.sentencepiece_model_file).save(path)
    else:
        shutil.copyfile(vocabulary.tokenizer_file, path)
    names = {k: v for k, v in _special_names(vocabulary).items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": context}
    if dialogue.USER in reserved:
        config["chat_template"] = chat_template({token: text for token, (text, _) in reserved.items()})
    with open(os.path.join(output, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(output, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({**names, "additional_special_tokens": [text for text, _ in reserved.values()]}, f, indent=2,
                  ensure_ascii=False)
    saved = tokenizers.Tokenizer.from_file(path)
    return {f"{role}_token_id": saved.token_to_id(names[f"{role}_token"]) if f"{role}_token" in names else None
            for role in ("bos", "eos", "pad")}

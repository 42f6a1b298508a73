"""Tiny checkpoints for tests and the ``tiny`` profile: a small BPE tokenizer and tiny random Qwen2 /
Llama models, built locally (no hub), saved with ``save_pretrained`` under ``cache_dir()/llm`` and
loaded back through the same loader real checkpoints use.

The tokenizer is a byte-level BPE trained on a few paragraphs written here, wrapped as a fast
tokenizer with special tokens and a chat template of the model's family: ChatML
(``<|im_start|>role ... <|im_end|>``, with Qwen2.5's ``<tool_call>`` format) for Qwen2, Llama 3
headers (``<|start_header_id|>`` ... ``<|eot_id|>``, with Llama 3.1's JSON tool calls) for Llama.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypedDict

from duplex.config import DEFAULT_SYSTEM_PROMPT, cache_dir

VERSION = "v2"  # v2: both templates have a tool format
ARCHS = ("qwen2", "llama")

# ChatML with the tool format of Qwen2.5's template: the tools in the system block, a call as
# <tool_call> JSON </tool_call> in the assistant's text, a result as a <tool_response> in a user turn
# (so the tiny profile calls tools through the same code as the default pretrained model).
CHATML_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' + (messages[0]['content'] if messages[0]['role'] == 'system' else '') -}}"
    "{{- '\\n\\n# Tools\\nCall one by writing <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.\\n<tools>' -}}"
    "{%- for t in tools -%}{{- '\\n' + (t | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls -%}"
    "{{- '<|im_start|>assistant' -}}{%- if message['content'] -%}{{- '\\n' + message['content'] -}}{%- endif -%}"
    "{%- for call in message.tool_calls -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' "
    "+ (call.function.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama 3's headers with the JSON tool calling of Llama 3.1's template (tools in the system block, as it
# writes them with tools_in_user_message=False): a call is the assistant's whole message, bare
# {"name": ..., "parameters": ...} JSON; a result is an ipython message, its content passed through
# tojson as Llama 3.1's template does (a string, too: Jinja counts strings as iterable).
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\nYou have access to the following "
    "functions. To call a function, please respond with JSON for a function call. Respond in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}. Do not use "
    "variables.\\n\\n' -}}"
    "{%- for t in tools -%}{{- (t | tojson) + '\\n\\n' -}}{%- endfor -%}"
    "{{- (messages[0]['content'] if messages[0]['role'] == 'system' else '') | trim + '<|eot_id|>' -}}"
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + messages[0]['content'] | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' -}}"
    "{%- if message.content is mapping or message.content is iterable -%}{{- message.content | tojson -}}"
    "{%- else -%}{{- message.content -}}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls -%}"
    "{%- set call = message.tool_calls[0].function -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + call.name + '\", \"parameters\": ' "
    "+ (call.arguments | tojson) + '}<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


class Specials(TypedDict):
    """An architecture's special tokens (``bos`` None where it has none) and chat template."""

    tokens: list[str]
    bos: str | None
    eos: str
    pad: str
    template: str


SPECIALS: dict[str, Specials] = {
    "qwen2": {"tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None,
              "eos": "<|im_end|>", "pad": "<|endoftext|>", "template": CHATML_TEMPLATE},
    "llama": {"tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"], "bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
              "pad": "<|end_of_text|>", "template": LLAMA3_TEMPLATE},
}

_CORPUS = """\
Hello, how are you today? I am fine, thank you. What can I do for you?
Could you tell me the weather for tomorrow? It will be sunny in the morning and rainy in the evening.
Sure, I can help with that. Let me think about it for a moment. That is a good question.
Yes. No. Maybe. Right. Okay. Mm-hm. Uh-huh. I see. Got it. Sounds good. Go on, please.
Wait, stop, that is not what I asked. Sorry, let me try again. Of course, no problem at all.
The train leaves at nine fifteen from platform four, and it arrives in the city an hour later.
My favourite food is pasta with tomatoes, garlic and a little olive oil. I also like fresh bread.
Do you know a good book about the history of music? There are many, but here is one I like.
Please set a timer for ten minutes, and remind me to call my sister when it rings.
And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, hundred.
Is the user's message a backchannel? Answer yes or no. Yes, it is. No, it is not.
I would like to book a table for two people on Friday evening at seven o'clock, near the river.
Thanks a lot, that was really helpful. Have a nice day, and talk to you soon. Goodbye!
"""


def corpus() -> list[str]:
    """The lines the tiny tokenizer is trained on."""
    return [line for line in (_CORPUS + DEFAULT_SYSTEM_PROMPT).splitlines() if line.strip()]


def build_tokenizer(arch: str, vocab_size: int = 768):
    """A byte-level BPE fast tokenizer with ``arch``'s special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["tokens"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    kwargs = {"eos_token": spec["eos"], "pad_token": spec["pad"]}
    if spec["bos"]:
        kwargs["bos_token"] = spec["bos"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.chat_template = spec["template"]
    return fast


def tiny_config(arch: str, vocab_size: int, eos_token_id: int, *, window: int = 4096):
    """A tiny config of the real architecture (2 layers, GQA, 16-dim heads)."""
    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=window, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  eos_token_id=eos_token_id, initializer_range=0.1)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def tiny_model_path(arch: str = "qwen2") -> Path:
    """Directory of the tiny ``arch`` checkpoint (model + tokenizer), built on first use."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    root = cache_dir() / "llm"
    path = root / f"tiny-{arch}-{VERSION}"
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=root))
    try:
        _build(arch, tmp)
        try:
            os.replace(tmp, path)  # atomic: a concurrent builder may have won, which is fine
        except OSError:
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _build(arch: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer(arch)
    eos = tokenizer.convert_tokens_to_ids(SPECIALS[arch]["eos"])
    config = tiny_config(arch, len(tokenizer), eos)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

"""Chat templates this package writes: Gemma 3's turn format, strict and lenient.

Gemma 3's turn format, as its instruction-tuned checkpoints are prompted:

    <bos><start_of_turn>user
    {system text}

    {first user text}<end_of_turn>
    <start_of_turn>model
    {assistant text}<end_of_turn>
    <start_of_turn>model

- System text has no turn of its own: a leading system message is written, then a blank line, at
  the start of the first user turn.
- The assistant's role is spelled ``model``.
- Turns alternate strictly, user first; anything else is refused with the message
  ``Conversation roles must alternate user/assistant/user/assistant/...``.
- Each message's text is trimmed of surrounding whitespace (the system text is not); content may
  be a string or a list of ``{"type": "text", "text": ...}`` parts, written one after another.
"""

from __future__ import annotations

GEMMA3_CHAT_TEMPLATE = """\
{%- macro text_of(content) -%}
  {%- if content is string -%}{{ content | trim }}
  {%- elif content is iterable and content is not mapping -%}
    {%- for part in content -%}
      {%- if part['type'] != 'text' -%}{{ raise_exception("Only text content is supported, got a '" ~ part['type'] ~ "' part") }}{%- endif -%}
      {{- part['text'] | trim -}}
    {%- endfor -%}
  {%- else -%}{{ raise_exception("Message content must be a string or a list of text parts") }}
  {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set turns = messages -%}
{%- set system = '' -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first = messages[0]['content'] -%}
  {%- set system = (first if first is string else first[0]['text']) ~ '\\n\\n' -%}
  {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if message['role'] != ('user' if loop.index0 is even else 'assistant') -%}
    {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") -}}
  {%- endif -%}
  {{- '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else 'user') ~ '\\n' -}}
  {{- system if loop.first else '' -}}
  {{- text_of(message['content']) ~ '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}
"""
"""Gemma 3's turn format (module docstring) as a Jinja chat template for `apply_chat_template`."""

# The lenient variant, for checkpoints that ship no template (a base model converted from GGUF):
# system text joins the next user turn, and no order of turns is refused.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{%- set ns.system = ns.system + (m.content | trim) + '\\n\\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else 'user') + '\\n' }}"
    "{%- if m.role == 'user' -%}{{ ns.system }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ (m.content | trim) + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system -%}{{ '<start_of_turn>user\\n' + ns.system | trim + '<end_of_turn>\\n' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Lenient Gemma 3 turns for checkpoints that ship no template; tools use the JSON tool-call
convention (`formats/json_calls.py`), and `<end_of_turn>` ends generation even where it is not a
single token."""

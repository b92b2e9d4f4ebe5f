"""Chat prompts: a tokenizer's chat template rendered in jinja2's sandbox.

Templates follow the Hugging Face convention (variables `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`; `raise_exception(msg)` to reject a conversation). They run in
`ImmutableSandboxedEnvironment`: a template can read what it is given and nothing else (no
attribute access to Python internals, no file or module access).
"""

from __future__ import annotations

from typing import Any

from craft.serving.protocol import ApiError


class _TemplateRejected(Exception):
    pass


def _raise(message: str) -> None:
    raise _TemplateRejected(message)


def compile_template(source: str) -> Any:
    """A compiled template; a syntax error is a ValueError naming the line."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template line {e.lineno}: {e.message}") from None


def render(template: Any, messages: list[dict[str, str]], tokenizer: Any, add_prompt: bool) -> str:
    """The prompt text of a conversation; a template that fails on it is a 400."""
    import jinja2

    def token(tid: int | None) -> str:
        if tid is None:
            return ""
        try:
            return tokenizer.decode([tid])
        except Exception:
            return ""

    try:
        return template.render(
            messages=messages,
            add_generation_prompt=add_prompt,
            bos_token=token(getattr(tokenizer, "bos_id", None)),
            eos_token=token(getattr(tokenizer, "eos_id", None)),
        )
    except _TemplateRejected as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise ApiError(400, f"messages: the chat template failed: {e}", param="messages") from None

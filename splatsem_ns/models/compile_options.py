"""Inductor options for chorus-splat's compiled losses (``ChorusSplatModelConfig.compile_options``), given on the
command line as KEY=VALUE strings and checked before training starts rather than at the first step's compile."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

OptionValue = Union[bool, int, float, str]


def inductor_options(entries: Sequence[str], mode: Optional[str] = None) -> Optional[Dict[str, OptionValue]]:
    """``entries`` ("cpp_wrapper=true", "combo_kernels=true", ...) as the ``options`` dict of ``torch.compile``:
    true/false become bools, numbers numbers, anything else stays a string. None when there are none.

    Raises:
        ValueError: for an entry without "=", an option inductor does not have, or options given together with
            ``mode`` (``torch.compile`` takes one or the other; "reduce-overhead" is the option
            ``triton.cudagraphs=true``).
    """
    if not entries:
        return None
    if mode is not None:
        raise ValueError(
            f"compile_options {list(entries)} and compile_mode={mode!r} were both given; torch.compile takes one or "
            "the other (compile_mode=reduce-overhead is the option triton.cudagraphs=true)."
        )
    from torch._inductor import list_options

    known = set(list_options())
    options: Dict[str, OptionValue] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"compile_options entry {entry!r}: write KEY=VALUE, e.g. cpp_wrapper=true")
        if key not in known:
            raise ValueError(
                f"compile_options: inductor has no option {key!r} (torch._inductor.list_options())"
            )
        options[key] = _value(value.strip())
    return options


def _value(text: str) -> OptionValue:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

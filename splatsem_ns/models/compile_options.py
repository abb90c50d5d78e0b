"""Inductor options for chorus-splat's compiled losses (``ChorusSplatModelConfig.compile_options``), given on the
command line as KEY=VALUE strings and checked before training starts rather than at the first step's compile."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

OptionValue = Union[bool, int, float, str]


def inductor_options(entries: Sequence[str]) -> Optional[Dict[str, OptionValue]]:
    """``entries`` ("cpp_wrapper=true", "combo_kernels=true", ...) as the ``options`` dict of ``torch.compile``:
    true/false become bools, numbers numbers, anything else stays a string. None when there are none.

    Raises:
        ValueError: for an entry without "=" or an option inductor does not have.
    """
    if not entries:
        return None
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


def compile_arguments(entries: Sequence[str], mode: Optional[str] = None) -> Dict[str, object]:
    """``torch.compile``'s ``mode`` and ``options`` for ``compile_options`` ``entries`` and ``compile_mode``.

    ``torch.compile`` refuses both at once, and the options have defaults, so a mode given beside them is passed as
    the options it stands for (``torch._inductor.list_mode_options``: "reduce-overhead" is
    ``triton.cudagraphs=true``), with the entries on top.

    Raises:
        ValueError: for a bad entry (``inductor_options``) or a mode inductor does not have.
    """
    options = inductor_options(entries)
    if mode is None:
        return {"mode": None, "options": options}
    from torch._inductor import list_mode_options

    try:
        implied = list_mode_options(mode)
    except RuntimeError as error:  # "Unrecognized mode=..., should be one of: ..."
        raise ValueError(f"compile_mode: {error}") from None
    if options is None:
        return {"mode": mode, "options": None}
    return {"mode": None, "options": {**implied, **options}}


def require_cpp_compiler() -> None:
    """Fail at once, and say how to go on, where ``cpp_wrapper=true`` (a default) cannot build its C++: without a
    C++ compiler inductor fails only inside the first step's compile, with a message about its own config.

    Raises:
        RuntimeError: no working C++ compiler (inductor looks for ``$CXX``, else ``g++``).
    """
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        raise RuntimeError(
            f"compile_options cpp_wrapper=true (on by default) builds the compiled losses' launchers as C++, and "
            f"no C++ compiler was found ({error}). Install one (e.g. apt install g++, or set CXX), or train "
            "without it: --pipeline.model.compile-options (nothing after it)."
        ) from None


def _value(text: str) -> OptionValue:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class HeldOptions:
    """Inductor options held process-wide over a span of code, e.g. one training iteration (``with held: ...``, or
    ``enter()`` and ``exit()`` from two callbacks).

    ``torch.compile(options=...)`` applies its options only while it compiles the forward. Up to torch 2.11 the
    backward is compiled later, lazily, at the first backward pass, outside those options: with ``cpp_wrapper=true``
    it is generated as C++ without the kernel binaries that C++ loads, and fails with "CudaKernelParamCache not
    populated" (pytorch/pytorch#178845; fixed in later releases). Holding the same options while the backward runs
    makes it compile as the forward did. Once compiled, neither pass reads them again."""

    def __init__(self, options: Dict[str, OptionValue]) -> None:
        self.options = dict(options)
        self._patch = None

    @property
    def held(self) -> bool:
        return self._patch is not None

    def enter(self) -> None:
        """Hold the options (again, if a span that raised never exited)."""
        import torch._inductor.config as inductor_config

        self.exit()
        self._patch = inductor_config.patch(self.options)
        self._patch.__enter__()
        _HELD.append(self)

    def exit(self) -> None:
        """Restore what the options replaced; nothing when not held."""
        if self._patch is not None:
            patch, self._patch = self._patch, None
            patch.__exit__(None, None, None)
            _HELD.remove(self)

    def __enter__(self) -> "HeldOptions":
        self.enter()
        return self

    def __exit__(self, *exc) -> None:
        self.exit()


_HELD: List[HeldOptions] = []
"""The options held now, in the order they were entered."""


def release_held_options() -> None:
    """Exit every ``HeldOptions`` still held, the last entered first: a training run that raised inside an iteration
    leaves its options held process-wide, which a later run in the same process must not inherit."""
    while _HELD:
        _HELD[-1].exit()

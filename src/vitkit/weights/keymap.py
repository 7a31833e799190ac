"""One key table for both directions: transformers on-disk names <-> timm names, written as templates.

A rule pairs two templates, e.g. `("encoder.stages.{s}.layers.{b}.dwconv.{w:weight|bias}",
"stages.{s}.blocks.{b}.conv_dw.{w}")`. Placeholders:

- `{i}`: a decimal index, the same number on both sides;
- `{i+1}` / `{i-1}`: an index that is offset on this side (`encoder.layers.{i}.downsample` <->
  `layers.{i+1}.downsample`: transformers' stage i ends where timm's stage i + 1 starts);
- `{w:weight|bias}`: one of the listed words (give the choices on one side, use `{w}` on the other);
- `{rest*}`: any non-empty remainder.

The importers (`hf_*_to_timm`) read a table with `to_timm`, the exporters (`weights/export_hf.py`) with `to_hf`,
so a rename is written once. Rules marked `export=False` are read-only aliases (e.g. transformers 5's live module
names): an exporter writes the names transformers' `save_pretrained` writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_PLACEHOLDER = re.compile(r"\{(\w+)(?:([+-]\d+)|:([\w|]+)|(\*))?\}")


def _specs(text: str) -> dict[str, str]:
    """The word list ("a|b") or "*" a template gives each of its non-index placeholders."""
    return {m.group(1): m.group(3) or "*" for m in _PLACEHOLDER.finditer(text) if m.group(3) or m.group(4)}


@dataclass(frozen=True)
class _Template:
    text: str
    specs: dict[str, str] = field(default_factory=dict)  # the rule's word lists, declared on either side
    regex: re.Pattern = field(init=False, repr=False, compare=False)
    offsets: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern, offsets, pos = [], {}, 0
        for m in _PLACEHOLDER.finditer(self.text):
            pattern.append(re.escape(self.text[pos : m.start()]))
            name, offset, words, rest = m.groups()
            spec = self.specs.get(name)
            words, rest = words or (spec if spec not in (None, "*") else None), rest or spec == "*"
            if words:
                pattern.append(f"(?P<{name}>{words})")
            elif rest:
                pattern.append(f"(?P<{name}>.+)")
            else:
                pattern.append(rf"(?P<{name}>\d+)")
                offsets[name] = int(offset or 0)
            pos = m.end()
        pattern.append(re.escape(self.text[pos:]))
        object.__setattr__(self, "regex", re.compile("".join(pattern)))
        object.__setattr__(self, "offsets", offsets)

    def parse(self, key: str) -> dict[str, str | int] | None:
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        values: dict[str, str | int] = dict(m.groupdict())
        for name, offset in self.offsets.items():
            values[name] = int(values[name]) - offset
            if values[name] < 0:  # e.g. timm `layers.0.downsample` has no transformers stage -1
                return None
        return values

    def format(self, values: dict[str, str | int]) -> str:
        def sub(m: re.Match) -> str:
            name, offset = m.group(1), m.group(2)
            value = values[name]
            return str(int(value) + int(offset)) if offset else str(value)

        return _PLACEHOLDER.sub(sub, self.text)


@dataclass(frozen=True)
class KeyRule:
    """transformers template `hf` <-> timm template `timm`; `export=False` makes it an import-only alias."""

    hf: str
    timm: str
    export: bool = True


class KeyTable:
    """Renames keys both ways with a list of `KeyRule`s; the first rule that matches wins."""

    def __init__(self, rules: list[KeyRule] | list[tuple[str, str]]):
        self.rules = [r if isinstance(r, KeyRule) else KeyRule(*r) for r in rules]
        self._pairs = []
        for r in self.rules:
            specs = {**_specs(r.hf), **_specs(r.timm)}
            self._pairs.append((_Template(r.hf, specs), _Template(r.timm, specs), r.export))

    def to_timm(self, key: str) -> str | None:
        """The timm name of a transformers key (without the model prefix), or None when no rule matches."""
        for hf, timm, _ in self._pairs:
            values = hf.parse(key)
            if values is not None:
                return timm.format(values)
        return None

    def to_hf(self, key: str) -> str | None:
        """The transformers on-disk name of a timm key, or None when no (exportable) rule matches."""
        for hf, timm, export in self._pairs:
            values = timm.parse(key) if export else None
            if values is not None:
                return hf.format(values)
        return None
